"""Semantic features and item vectors: known cosines on 2-D vectors, point in time, NaN rules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.errors import ConfigError, DataError
from recsys.semantic import SEMANTIC_FEATURES, semantic_features, user_profile_vectors
from recsys.vectors import ItemVectors

S2 = math.sqrt(0.5)


def day(d: int) -> datetime:
    return datetime(2026, 1, d, tzinfo=UTC)


@pytest.fixture
def vectors() -> ItemVectors:
    # east, north, north-east (unnormalised on purpose), west
    return ItemVectors.from_arrays(
        ["e", "n", "ne", "w"], np.array([[1, 0], [0, 1], [2, 2], [-1, 0]], dtype=float)
    )


def requests(rows: Sequence[tuple[str, str, datetime | None, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "request_id": pl.String,
            "user_id": pl.String,
            "ts": pl.Datetime("us", "UTC"),
            "item_id": pl.String,
        },
        orient="row",
    )


def history(rows: Sequence[tuple[str, str, datetime | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"user_id": pl.String, "item_id": pl.String, "ts": pl.Datetime("us", "UTC")},
        orient="row",
    )


def feats(out: pl.DataFrame, i: int) -> dict[str, float]:
    return {f: out[f][i] for f in SEMANTIC_FEATURES}


# --- ItemVectors -----------------------------------------------------------------------------


def test_vectors_are_unit_and_lookup_marks_unknown(vectors: ItemVectors) -> None:
    assert vectors.matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors.matrix, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(vectors.matrix[vectors.index["ne"]], [S2, S2], rtol=1e-6)
    rows, found = vectors.lookup(["w", "nope", "e"])
    assert found.tolist() == [True, False, True]
    assert rows.tolist() == [3, -1, 0]


def test_vectors_parquet_round_trip(tmp_path: Path, vectors: ItemVectors) -> None:
    df = pl.DataFrame(
        {
            "item_id": vectors.ids,
            "vector": pl.Series(vectors.matrix.tolist(), dtype=pl.List(pl.Float32)),
            "text_hash": ["h"] * len(vectors),
            "encoder_id": ["enc"] * len(vectors),
        }
    )
    df.write_parquet(tmp_path / "item_vectors.parquet")
    back = ItemVectors.from_parquet(tmp_path / "item_vectors.parquet")
    assert back.ids == vectors.ids
    np.testing.assert_allclose(back.matrix, vectors.matrix, rtol=1e-6)


def test_vectors_reject_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate item ids"):
        ItemVectors.from_arrays(["a", "a"], np.eye(2))
    with pytest.raises(DataError, match=r"zero or not finite .* re-encode"):
        ItemVectors.from_arrays(["a", "b"], np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(DataError, match=r"shape \(3, dim\)"):
        ItemVectors.from_arrays(["a", "b", "c"], np.eye(2))
    with pytest.raises(DataError, match="run the embedding step"):
        ItemVectors.from_parquet(tmp_path / "missing.parquet")


# --- semantic_features -----------------------------------------------------------------------


def test_known_cosines_on_2d_vectors(vectors: ItemVectors) -> None:
    hist = history([("u", "e", day(1)), ("u", "n", day(2))])
    out = semantic_features(
        requests([("r", "u", day(5), "ne"), ("r", "u", day(5), "e")]), hist, vectors
    )
    ne, e = feats(out, 0), feats(out, 1)
    # mean of e and n points north-east
    assert ne["sem_cos_mean"] == pytest.approx(1.0)
    assert ne["sem_cos_max"] == pytest.approx(S2)
    assert ne["sem_cos_top3"] == pytest.approx(S2)  # mean of the two cosines, both sqrt(1/2)
    assert e["sem_cos_mean"] == pytest.approx(S2)
    assert e["sem_cos_max"] == pytest.approx(1.0)
    assert e["sem_cos_top3"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert ne["sem_history_len"] == 2


def test_recency_weights_favour_recent_history(vectors: ItemVectors) -> None:
    # e is 7 days older than n: weights 0.5 and 1 with a 7-day half-life -> mean (0.5, 1)
    hist = history([("u", "e", day(1)), ("u", "n", day(8))])
    out = semantic_features(requests([("r", "u", day(9), "n")]), hist, vectors)
    expected = 1.0 / math.sqrt(0.5**2 + 1.0)
    assert out["sem_cos_recency"][0] == pytest.approx(expected, rel=1e-5)
    assert out["sem_cos_mean"][0] == pytest.approx(S2, rel=1e-5)
    # undated history gets the oldest dated weight (0.5 here): mean of e, w cancels in x
    hist = history([("u", "e", day(1)), ("u", "n", day(8)), ("u", "w", None)])
    out = semantic_features(requests([("r", "u", day(9), "n")]), hist, vectors)
    assert out["sem_cos_recency"][0] == pytest.approx(1.0, rel=1e-5)


def test_point_in_time_ignores_history_at_or_after_the_request(vectors: ItemVectors) -> None:
    base = history([("u", "e", None), ("u", "n", day(2))])
    req = requests([("r1", "u", day(3), "ne"), ("r2", "u", day(3), "w")])
    before = semantic_features(req, base, vectors)
    later = pl.concat(
        [base, history([("u", "w", day(3)), ("u", "w", day(4)), ("v", "ne", day(1))])]
    )
    after = semantic_features(req, later, vectors)
    assert before.equals(after)
    # a request without a time sees everything
    now = semantic_features(requests([("r3", "u", None, "w")]), later, vectors)
    assert now["sem_history_len"][0] == 4
    assert now["sem_cos_max"][0] == pytest.approx(1.0)


def test_max_history_keeps_the_most_recent(vectors: ItemVectors) -> None:
    hist = history([("u", "w", None), ("u", "w", day(1)), ("u", "n", day(2)), ("u", "e", day(3))])
    out = semantic_features(requests([("r", "u", day(9), "w")]), hist, vectors, max_history=2)
    assert out["sem_history_len"][0] == 2
    assert out["sem_cos_max"][0] == pytest.approx(0.0, abs=1e-6)  # both w rows fell out


def test_nan_for_no_history_or_unknown_candidate(vectors: ItemVectors) -> None:
    hist = history([("u", "e", day(1)), ("u", "unknown-item", day(1))])
    req = requests(
        [
            ("r1", "nobody", day(5), "e"),  # user without history
            ("r2", "u", day(1), "e"),  # history only at the request time
            ("r3", "u", day(5), "not-embedded"),  # candidate without a vector
            ("r4", "u", day(5), "w"),
        ]
    )
    out = semantic_features(req, hist, vectors)
    for i in range(3):
        assert all(math.isnan(out[f][i]) for f in SEMANTIC_FEATURES[:4])
    assert out["sem_history_len"].to_list() == [0, 0, 1, 1]  # items without a vector not counted
    assert out["sem_cos_mean"][3] == pytest.approx(-1.0)


def test_rows_and_order_preserved_and_columns_added(vectors: ItemVectors) -> None:
    hist = history([("u", "e", day(1)), ("v", "n", day(1))])
    rows = [(f"r{i}", "uv"[i % 2], day(2 + i % 3), ["e", "n", "w", "ne"][i % 4]) for i in range(23)]
    req = requests(rows).with_columns(extra=pl.int_range(23))
    out = semantic_features(req, hist, vectors)
    assert out.columns == [*req.columns, *SEMANTIC_FEATURES]
    assert out.select(req.columns).equals(req)
    expected = [
        float(
            vectors.matrix[vectors.index[it]] @ vectors.matrix[vectors.index["en"[int(u == "v")]]]
        )
        for _, u, _, it in rows
    ]
    np.testing.assert_allclose(out["sem_cos_mean"].to_numpy(), expected, atol=1e-6)


def test_chunking_matches_direct_computation(
    vectors: ItemVectors, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    items = [f"i{i}" for i in range(40)]
    vec = ItemVectors.from_arrays(items, rng.normal(size=(40, 8)))
    n_hist = 300
    hist = pl.DataFrame(
        {
            "user_id": rng.choice(["a", "b", "c", "d"], n_hist),
            "item_id": rng.choice(items, n_hist),
            "ts": [day(1) + timedelta(hours=float(h)) for h in rng.uniform(0, 200, n_hist)],
        }
    )
    req = pl.DataFrame(
        {
            "user_id": rng.choice(["a", "b", "c", "d", "e"], 200),
            "ts": [day(1) + timedelta(hours=float(h)) for h in rng.integers(0, 200, 200)],
            "item_id": rng.choice(items, 200),
        }
    )
    full = semantic_features(req, hist, vec, max_history=7)
    monkeypatch.setattr("recsys.semantic._CHUNK_SLOTS", 9)  # many tiny chunks
    chunked = semantic_features(req, hist, vec, max_history=7)
    for f in SEMANTIC_FEATURES:  # equal up to float32 rounding of differently padded products
        np.testing.assert_allclose(chunked[f].to_numpy(), full[f].to_numpy(), atol=1e-6)
    # one row by hand: mean of the 7 latest history vectors before the request time
    row = full.filter(pl.col("sem_history_len") == 7).row(0, named=True)
    window = (
        hist.filter((pl.col("user_id") == row["user_id"]) & (pl.col("ts") < row["ts"]))
        .sort("ts")
        .tail(7)
    )
    h = vec.matrix[[vec.index[i] for i in window["item_id"]]]
    c = vec.matrix[vec.index[row["item_id"]]]
    centre = h.mean(axis=0)
    cos = h @ c
    assert row["sem_cos_mean"] == pytest.approx(
        float(centre @ c / np.linalg.norm(centre)), abs=1e-5
    )
    assert row["sem_cos_max"] == pytest.approx(float(cos.max()), abs=1e-5)
    assert row["sem_cos_top3"] == pytest.approx(float(np.sort(cos)[-3:].mean()), abs=1e-5)


def test_bad_arguments_name_the_problem(vectors: ItemVectors) -> None:
    hist = history([("u", "e", day(1))])
    req = requests([("r", "u", day(2), "e")])
    with pytest.raises(ConfigError, match="max_history must be >= 1"):
        semantic_features(req, hist, vectors, max_history=0)
    with pytest.raises(ConfigError, match="half_life_days must be > 0"):
        semantic_features(req, hist, vectors, half_life_days=0)
    with pytest.raises(DataError, match=r"requests: missing column\(s\) \['item_id'\]"):
        semantic_features(req.drop("item_id"), hist, vectors)


def test_user_profile_vectors(vectors: ItemVectors) -> None:
    hist = history(
        [("u", "e", day(1)), ("u", "n", day(2)), ("v", "w", None), ("x", "not-embedded", None)]
    )
    ids, mat = user_profile_vectors(hist, vectors)
    assert ids == ["u", "v"]  # x has no embedded history
    np.testing.assert_allclose(mat, [[S2, S2], [-1.0, 0.0]], atol=1e-6)
    ids, mat = user_profile_vectors(hist, vectors, max_history=1)
    np.testing.assert_allclose(mat[0], [0.0, 1.0], atol=1e-6)  # only the latest: n
