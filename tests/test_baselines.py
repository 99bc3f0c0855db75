"""One contract suite run over every Scorer (baselines and the LightGBM ranker alike), on a tiny
table where the right answer is obvious: in each impression item "best" is the most popular and
the closest to the user's history."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import polars as pl
import pytest

from recsys.baselines import (
    ColumnScorer,
    LGBMScorer,
    PopularityScorer,
    RandomScorer,
    Scorer,
    add_scores,
)
from recsys.errors import DataError
from recsys.ranker import RankerConfig, train_ranker

FEATURES = ["item_clicks_all", "sem_cos_mean"]


def known_table() -> pl.DataFrame:
    """3 impressions x 4 items; "best" leads on both columns; one missing value per column."""
    return pl.DataFrame(
        {
            "impression_id": ["m1"] * 4 + ["m2"] * 4 + ["m3"] * 4,
            "user_id": ["u1"] * 4 + ["u2"] * 4 + ["u1"] * 4,
            "item_id": ["a", "best", "b", "c", "d", "e", "best", "f", "best", "g", "h", "i"],
            "clicked": [False, True, False, False] * 2 + [True, False, False, False],
            "item_clicks_all": [3.0, 90.0, 10.0, None, 5.0, 1.0, 80.0, 0.0, 70.0, 2.0, 4.0, 8.0],
            "sem_cos_mean": [
                0.1,
                0.9,
                float("nan"),
                -0.2,
                0.3,
                0.0,
                0.8,
                0.1,
                0.95,
                0.2,
                0.4,
                -0.5,
            ],
        }
    )


@functools.cache  # train once, on first use (not at collection)
def lgbm_scorer() -> LGBMScorer:
    """A ranker trained on synthetic impressions where the click goes to the item with the
    highest popularity + semantic match: it learns that both columns help."""
    rng = np.random.default_rng(0)
    n_groups, size = 300, 6
    pop = rng.uniform(0, 100, n_groups * size)
    sem = rng.uniform(-1, 1, n_groups * size)
    utility = (pop / 100 + sem + 0.2 * rng.normal(size=pop.size)).reshape(n_groups, size)
    frame = pl.DataFrame(
        {
            "impression_id": np.repeat(np.arange(n_groups), size),
            "clicked": (utility == utility.max(axis=1, keepdims=True)).ravel(),
            "item_clicks_all": pop,
            "sem_cos_mean": sem,
        }
    )
    config = RankerConfig(
        n_estimators=40, early_stopping_rounds=0, min_data_in_leaf=5, num_threads=1
    )
    ranker = train_ranker(frame.head(1200), frame.tail(600), FEATURES, config)
    return LGBMScorer("lgbm", ranker)


SCORERS: dict[str, Callable[[], Scorer]] = {
    "random": lambda: RandomScorer(seed=7),
    "popularity": lambda: PopularityScorer(),
    "popularity_callable": lambda: PopularityScorer(
        lambda f: f["item_clicks_all"].fill_null(0).to_numpy(), name="popularity_fn"
    ),
    "column": lambda: ColumnScorer("semantic_frozen", "sem_cos_mean"),
    "lgbm": lgbm_scorer,
}


@pytest.fixture(params=list(SCORERS), ids=list(SCORERS))
def scorer(request: pytest.FixtureRequest) -> Scorer:
    return SCORERS[request.param]()


def test_satisfies_the_protocol(scorer: Scorer) -> None:
    assert isinstance(scorer, Scorer)
    assert isinstance(scorer.name, str) and scorer.name


def test_one_finite_float_per_row(scorer: Scorer) -> None:
    table = known_table()
    scores = scorer.score(table)
    assert isinstance(scores, np.ndarray)
    assert scores.shape == (table.height,) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    assert scorer.score(table.head(0)).shape == (0,)


def test_deterministic(scorer: Scorer) -> None:
    table = known_table()
    np.testing.assert_array_equal(scorer.score(table), scorer.score(table))


@pytest.mark.parametrize("name", [n for n in SCORERS if n != "random"])
def test_obvious_best_item_ranks_first(name: str) -> None:
    """Every scorer with a preference (all but random) puts the known best item first."""
    scorer = SCORERS[name]()
    table = add_scores(known_table(), [scorer])
    firsts = (
        table.sort(scorer.name, descending=True)
        .group_by("impression_id", maintain_order=True)
        .first()
    )
    assert firsts["item_id"].to_list() == ["best"] * 3


def test_random_differs_by_seed() -> None:
    table = known_table()
    assert not np.array_equal(RandomScorer(1).score(table), RandomScorer(2).score(table))


def test_missing_values_and_direction() -> None:
    table = known_table()
    assert PopularityScorer().score(table)[3] == 0.0  # null clicks -> 0
    assert ColumnScorer("s", "sem_cos_mean", fill_value=-1.0).score(table)[2] == -1.0
    np.testing.assert_array_equal(
        ColumnScorer("neg", "item_clicks_all", higher_is_better=False).score(table),
        -PopularityScorer().score(table),
    )


def test_errors_name_the_column_or_problem() -> None:
    table = known_table()
    with pytest.raises(DataError, match="scorer 'popularity': frame has no column 'clicks_7d'"):
        PopularityScorer("clicks_7d").score(table)
    with pytest.raises(DataError, match=r"returned shape \(2,\), expected \(12,\)"):
        PopularityScorer(lambda f: np.ones(2)).score(table)
    with pytest.raises(DataError, match="scorer names repeat"):
        add_scores(table, [RandomScorer(0), RandomScorer(1)])
    with pytest.raises(DataError, match=r"missing feature column\(s\) \['sem_cos_mean'\]"):
        lgbm_scorer().score(table.drop("sem_cos_mean"))


def test_scores_in_chunks_are_the_scores_of_the_whole_frame() -> None:
    """The nightly's evaluation scores its rows a chunk at a time: every scorer scores a row
    alone and the random baseline continues its stream, so the scores are bit for bit those
    of the rows scored as one frame, whatever the chunk size (one chunk empty)."""
    from recsys.evaluation import score_chunks, score_rows

    rng = np.random.default_rng(5)
    n = 50
    frame = pl.DataFrame({
        "request_id": np.repeat(np.arange(10), 5), "user_id": [f"u{i % 7}" for i in range(n)],
        "item_id": [f"i{i}" for i in range(n)], "clicked": rng.random(n) < 0.3,
        "x": rng.normal(size=n),
    })  # fmt: skip
    scorers: list[Scorer] = [RandomScorer(seed=3), ColumnScorer("col", "x")]
    whole = score_rows(frame, scorers)
    for size in (1, 7, 50):
        pieces = [frame.slice(lo, size) for lo in range(0, n, size)]
        assert score_chunks([frame.head(0), *pieces], scorers).equals(whole)
    assert not np.array_equal(
        score_rows(frame.slice(7), scorers)["random"].to_numpy(), whole["random"][7:].to_numpy()
    )  # without the offset a piece would get the stream's start again
