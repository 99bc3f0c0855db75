"""Within-request ranks and z-scores: known answers, one request equals many, NaN stays NaN."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.relative import relative_columns, with_relative, within_request


def test_known_answers_with_ties_and_missing() -> None:
    x = np.array([[3.0], [1.0], [3.0], [np.nan], [2.0]])
    out = within_request(x, np.zeros(5, dtype=np.int64))
    # 4 non-missing values 1, 2, 3, 3: ranks 1, 2, 3.5, 3.5 out of 4
    np.testing.assert_allclose(out[[0, 1, 2, 4], 0], [3.5 / 4, 1 / 4, 3.5 / 4, 2 / 4])
    mean, std = 2.25, np.std([3.0, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(out[[0, 1, 4], 1], [(3 - mean) / std, (1 - mean) / std, -0.25 / std])
    assert np.isnan(out[3]).all()


def test_constant_request_has_zero_z_and_mid_rank() -> None:
    out = within_request(np.array([[5.0], [5.0]]), np.zeros(2, dtype=np.int64))
    np.testing.assert_allclose(out, [[0.75, 0.0], [0.75, 0.0]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.one_of(st.none(), st.integers(-3, 3))),
        min_size=1,
        max_size=40,
    )
)
def test_many_requests_at_once_equal_each_alone(rows: list[tuple[int, int | None]]) -> None:
    """The batch path (every request in one call) gives each request what the API path (one
    request per call) gives it, to the bit."""
    groups = np.array([g for g, _ in rows], dtype=np.int64)
    x = np.array([[np.nan if v is None else float(v), float(i % 3)] for i, (_, v) in
                  enumerate(rows)])  # fmt: skip
    together = within_request(x, groups)
    for g in np.unique(groups):
        sel = groups == g
        alone = within_request(x[sel], np.zeros(int(sel.sum()), dtype=np.int64))
        np.testing.assert_array_equal(together[sel], alone)


def test_with_relative_names_and_groups() -> None:
    frame = pl.DataFrame({"req": ["b", "a", "b", "a"], "v": [1.0, 7.0, 2.0, None]})
    out = with_relative(frame, ["v"], "req")
    assert out.columns == ["req", "v", *relative_columns(["v"])] == ["req", "v", "v_rank", "v_z"]
    assert out["v_rank"].to_list()[:3] == [0.5, 1.0, 1.0]
    assert np.isnan(out["v_rank"][3])


def _small_log(seed: int) -> tuple[Any, Any, pl.DataFrame]:
    """A generated log, random 8-d item vectors and its impressions as feature requests."""
    from recsys.generate import GeneratorConfig, generate
    from recsys.vectors import ItemVectors

    data, _ = generate(GeneratorConfig(n_items=60, n_users=40, n_shown=600, seed=seed))
    rng = np.random.default_rng(0)
    ids = data.items["item_id"].to_list()
    vectors = ItemVectors.from_arrays(ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
    req = data.impressions.select(
        pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
    )
    return data, vectors, req


def test_refresh_gives_rows_the_state_at_the_start_of_their_period() -> None:
    """With refresh "1d", a row at t gets exactly the features an online row at t truncated to
    the day gets (the bundle a daily nightly serves), and never a count from within its day."""
    from features import FeatureConfig
    from recsys.featurize import FeatureSpec, matrix, point_in_time_frame

    data, vectors, req = _small_log(seed=1)
    req = req.tail(300)
    daily = FeatureSpec(FeatureConfig(), refresh="1d")
    online = FeatureSpec(FeatureConfig(), refresh="online")
    got = matrix(point_in_time_frame(daily, req, data, vectors), daily.columns)
    moved = req.with_columns(pl.col("ts").dt.truncate("1d"))
    want = matrix(point_in_time_frame(online, moved, data, vectors), online.columns)
    np.testing.assert_array_equal(got, want)
    fresh = matrix(point_in_time_frame(online, req, data, vectors), online.columns)
    assert not np.array_equal(np.nan_to_num(got), np.nan_to_num(fresh))  # the day's events differ


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.integers(1, 6))
def test_one_request_kernel_equals_the_grouped_one_on_floats(seed: int, n: int, f: int) -> None:
    """The single-request kernel (the API's) and the grouped one give the same bits on real
    values with ties and missing values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * 10.0 ** rng.integers(-3, 4)
    x[rng.random((n, f)) < 0.3] = x[0, 0]  # ties
    x[rng.random((n, f)) < 0.2] = np.nan
    grouped = within_request(np.vstack([x, x]), np.repeat([0, 1], n))[:n]  # the general path
    np.testing.assert_array_equal(within_request(x, np.zeros(n, dtype=np.int64)), grouped)


def test_frozen_cosines_are_the_semantic_kernel_on_the_frozen_vectors() -> None:
    """frozen_semantic: the same cosines from the frozen encoder's vectors (a companion in its
    own row order is put in the tuned one's), with their within-request columns; the nightly
    hides only the tuned encoder's columns on the rows it was tuned on."""
    from features import FeatureConfig
    from recsys.errors import DataError
    from recsys.featurize import FeatureSpec, point_in_time_frame
    from recsys.generate import GeneratorConfig, generate
    from recsys.semantic import FROZEN_SEMANTIC, semantic_features
    from recsys.vectors import ItemVectors

    data, _ = generate(GeneratorConfig(n_items=60, n_users=40, n_shown=600, seed=2))
    rng = np.random.default_rng(1)
    ids = data.items["item_id"].to_list()
    tuned = ItemVectors.from_arrays(ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
    frozen = ItemVectors.from_arrays(ids[::-1], rng.standard_normal((len(ids), 6)))
    req = data.impressions.select(
        pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
    ).tail(300)
    spec = FeatureSpec(FeatureConfig(), frozen_semantic=True)
    with pytest.raises(DataError, match="with_frozen"):
        point_in_time_frame(spec, req, data, tuned)
    with pytest.raises(DataError, match="lack 1 items"):
        tuned.with_frozen(ItemVectors(frozen.ids[1:], frozen.matrix[1:],
                                      {i: n for n, i in enumerate(frozen.ids[1:])}))  # fmt: skip
    got = point_in_time_frame(spec, req, data, tuned.with_frozen(frozen))
    want = semantic_features(req, data.interactions, frozen)
    for c in FROZEN_SEMANTIC:
        np.testing.assert_array_equal(got[c].to_numpy(), want[c.removesuffix("_frozen")].to_numpy())
    assert (
        {"sem_cos_mean_frozen_rank", "sem_cos_top3_frozen_z"}
        <= set(spec.columns)
        <= set(got.columns)
    )
    hidden = set(spec.tuned_semantic)
    assert "sem_cos_mean" in hidden and "sem_cos_mean_rank" in hidden
    assert not hidden & {c for c in spec.columns if "_frozen" in c}
    assert not hidden & set(spec.behavioural) and "sem_history_len" not in hidden
    plain = FeatureSpec(FeatureConfig())
    assert not [c for c in plain.columns if "_frozen" in c] and "sem_history_len" in set(
        plain.tuned_semantic
    )


def test_features_in_chunks_are_the_whole_frame_bit_for_bit() -> None:
    """The nightly computes a large log's feature table in chunks of whole requests (memory set
    by the chunk size): concatenated, the chunks are the one-piece frame, every value the same
    bits, at any chunk size, and no request is split."""
    from features import FeatureConfig
    from recsys.featurize import FeatureSpec, point_in_time_chunks, point_in_time_frame

    data, vectors, req = _small_log(seed=2)
    extra = data.impressions.select("clicked", pl.col("ts").dt.offset_by("1h"))
    for spec in (FeatureSpec(FeatureConfig()), FeatureSpec(FeatureConfig(), refresh="1d")):
        whole = point_in_time_frame(spec, req, data, vectors).with_columns(extra.get_columns())
        for chunk_rows in (1, 37, 250, 10_000):
            parts = list(point_in_time_chunks(spec, req, data, vectors, chunk_rows=chunk_rows,
                                              extra=extra))  # fmt: skip
            assert len(parts) == (1 if chunk_rows >= req.height else len(parts))
            # a chunk ends with the request that reaches chunk_rows
            assert all(p.height < chunk_rows + p["request_id"].value_counts()["count"].max()
                       for p in parts)  # fmt: skip
            ids_seen = [set(p["request_id"].unique().to_list()) for p in parts]
            assert sum(map(len, ids_seen)) == req["request_id"].n_unique()  # none split
            assert pl.concat(parts).equals(whole), chunk_rows
        assert len(parts) == 1 and len(list(point_in_time_chunks(
            spec, req, data, vectors, chunk_rows=37))) > 10  # fmt: skip


def test_request_chunks_need_contiguous_requests() -> None:
    from recsys.errors import DataError
    from recsys.featurize import chunkable_rows, request_chunks, requests_contiguous

    ids = pl.Series(["a", "a", "b", "c", "c", "c", "d"])
    assert request_chunks(ids, None) == [(0, 7)]
    assert request_chunks(ids, 1) == [(0, 2), (2, 3), (3, 6), (6, 7)]
    assert request_chunks(ids, 2) == [(0, 2), (2, 6), (6, 7)]  # c starts before row 2 + 2
    assert request_chunks(ids, 3) == [(0, 3), (3, 6), (6, 7)]
    assert request_chunks(ids, 100) == [(0, 7)]
    with pytest.raises(DataError, match="next to each other"):
        request_chunks(pl.Series(["a", "b", "a"]), 1)
    assert requests_contiguous(ids) and not requests_contiguous(pl.Series(["a", "b", "a"]))
    assert chunkable_rows(ids, 2) == 2 and chunkable_rows(ids, 7) is None  # one piece anyway
    assert chunkable_rows(pl.Series(["a", "b", "a"]), 1) is None  # built whole
    assert chunkable_rows(ids, None) is None
