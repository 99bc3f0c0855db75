"""Metrics: hand-computed known answers, ties, skipped impressions, and bounded property tests."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.errors import DataError
from recsys.metrics import evaluation_table, impression_metrics, ranking_metrics_at_k

INV_LOG2_3 = 1.0 / math.log2(3.0)  # discount at rank 2


def imp(groups: list[list[tuple[int, float]]]) -> pl.DataFrame:
    """Impressions from [[(clicked, score), ...], ...]."""
    rows = [(f"m{g}", c, s) for g, items in enumerate(groups) for c, s in items]
    return pl.DataFrame(rows, schema=["impression_id", "clicked", "score"], orient="row")


def test_perfect_ranking_scores_one() -> None:
    m = impression_metrics(imp([[(1, 0.9), (0, 0.5), (0, 0.1)]]))
    assert m["auc"] == 1.0 and m["mrr"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1.0) and m["ndcg@10"] == pytest.approx(1.0)
    assert m["n_impressions"] == 1 and m["n_skipped"] == 0


def test_click_at_rank_two() -> None:
    m = impression_metrics(imp([[(0, 0.9), (1, 0.5), (0, 0.1)]]))
    assert m["auc"] == pytest.approx(0.5)  # above one of two non-clicks
    assert m["mrr"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx(INV_LOG2_3)


def test_two_clicks_and_cutoff() -> None:
    # clicks at ranks 1 and 6 of 6: MIND MRR = (1 + 1/6) / 2
    scores = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    m = impression_metrics(imp([[(int(i in (0, 5)), s) for i, s in enumerate(scores)]]))
    assert m["mrr"] == pytest.approx((1 + 1 / 6) / 2)
    ideal = 1 + INV_LOG2_3
    assert m["ndcg@5"] == pytest.approx(1 / ideal)  # rank 6 is past the cutoff
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / ideal)
    assert m["auc"] == pytest.approx(4 / 8)  # 4 of the 8 (click, non-click) pairs are ordered


def test_average_over_impressions() -> None:
    m = impression_metrics(imp([[(1, 0.9), (0, 0.5), (0, 0.1)], [(0, 0.9), (1, 0.5), (0, 0.1)]]))
    assert m["auc"] == pytest.approx(0.75)
    assert m["mrr"] == pytest.approx(0.75)
    assert m["ndcg@10"] == pytest.approx((1 + INV_LOG2_3) / 2)
    assert m["n_impressions"] == 2


def test_ties_take_the_expectation_over_tied_orders() -> None:
    # all tied: the click is at rank 1 or 2 with equal chance
    m = impression_metrics(imp([[(1, 0.3), (0, 0.3)]]))
    assert m["auc"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["ndcg@5"] == pytest.approx((1 + INV_LOG2_3) / 2)
    # a tie below the top: click shares ranks 2..3 with a non-click
    m = impression_metrics(imp([[(0, 0.9), (1, 0.3), (0, 0.3)]]))
    assert m["auc"] == pytest.approx(0.25)  # loses to 0.9, ties (1/2) with the other
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_ties_do_not_depend_on_row_order() -> None:
    a = impression_metrics(imp([[(1, 0.3), (0, 0.3), (0, 0.3), (1, 0.1)]]))
    b = impression_metrics(imp([[(0, 0.3), (1, 0.1), (0, 0.3), (1, 0.3)]]))
    assert a == b


def test_impressions_without_click_or_without_non_click_are_skipped() -> None:
    m = impression_metrics(
        imp([[(1, 0.9), (0, 0.5)], [(0, 0.9), (0, 0.1)], [(1, 0.1), (1, 0.2)], [(1, 0.5)]])
    )
    assert m["n_impressions"] == 1 and m["n_skipped"] == 3
    assert m["auc"] == 1.0 and m["mrr"] == 1.0


def test_nothing_to_score_gives_nan() -> None:
    m = impression_metrics(imp([[(0, 0.9), (0, 0.1)]]))
    assert m["n_impressions"] == 0 and math.isnan(m["auc"]) and math.isnan(m["ndcg@10"])


def test_bad_inputs_say_what_to_do() -> None:
    with pytest.raises(DataError, match="null/NaN values in score column 'score'"):
        impression_metrics(imp([[(1, float("nan")), (0, 0.1)]]))
    with pytest.raises(DataError, match=r"missing column\(s\) \['pred'\]"):
        impression_metrics(imp([[(1, 0.5), (0, 0.1)]]), score_col="pred")


def test_evaluation_table_one_row_per_model() -> None:
    df = imp([[(1, 0.9), (0, 0.5), (0, 0.1)], [(0, 0.9), (1, 0.5), (0, 0.1)]]).with_columns(
        reverse=-pl.col("score"), user_id=pl.lit("u"), item_id=pl.lit("i")
    )
    table = evaluation_table(df, ["score", "reverse"])
    assert table.columns == ["model", "auc", "mrr", "ndcg@5", "ndcg@10", "n_impressions"]
    assert table["model"].to_list() == ["score", "reverse"]
    assert table["auc"].to_list() == pytest.approx([0.75, 0.25])
    assert table["mrr"].to_list() == pytest.approx([0.75, (1 / 3 + 1 / 2) / 2])


def test_ranking_metrics_at_k_known_answer() -> None:
    ranked = pl.DataFrame(
        {
            "user_id": ["u"] * 4 + ["v"] * 2,
            "item_id": ["a", "b", "c", "d", "x", "y"],
            "rank": [1, 2, 3, 4, 1, 2],
        }
    )
    relevant = pl.DataFrame(
        {"user_id": ["u", "u", "v", "w"], "item_id": ["b", "d", "x", "z"]}
    )  # w has no list: counts as 0
    m = ranking_metrics_at_k(ranked, relevant, ks=(1, 2, 4))
    # u: hits at 2 and 4 of R=2; v: hit at 1 of R=1; w: nothing
    ideal2 = 1 + INV_LOG2_3
    assert m["recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["ndcg@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["ndcg@2"] == pytest.approx((INV_LOG2_3 / ideal2 + 1 + 0) / 3)
    assert m["recall@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["ndcg@4"] == pytest.approx(((INV_LOG2_3 + 1 / math.log2(5)) / ideal2 + 1) / 3)
    assert m["n_users"] == 3


@st.composite
def impressions(draw: st.DrawFn) -> pl.DataFrame:
    n_groups = draw(st.integers(1, 5))
    rows = []
    for g in range(n_groups):
        size = draw(st.integers(1, 8))
        for _ in range(size):
            score = draw(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 0.25, 1.0, 3.0]))
            rows.append((f"m{g}", draw(st.booleans()), score))
    return pl.DataFrame(rows, schema=["impression_id", "clicked", "score"], orient="row")


@settings(max_examples=60, deadline=None)
@given(impressions())
def test_metrics_bounded_and_invariant_to_monotone_transforms(df: pl.DataFrame) -> None:
    m = impression_metrics(df)
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert math.isnan(m[key]) == (m["n_impressions"] == 0)
        if m["n_impressions"]:
            assert -1e-12 <= m[key] <= 1 + 1e-12
    transformed = impression_metrics(df.with_columns(score=np.exp(pl.col("score")) * 3 + 7))
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert transformed[key] == pytest.approx(m[key], nan_ok=True)
    shuffled = impression_metrics(df.sample(fraction=1.0, shuffle=True, seed=1))
    assert shuffled == pytest.approx(m, nan_ok=True)
