"""Features relative to the other candidates of the same request: within-request ranks and
z-scores.

Raw counts and ages drift with the log: an item shown 47 times is average in a week-old log and
rare in a month-old one, and the trees of a ranker trained on one place test rows in leaves they
never saw. Where a candidate stands among the items it competes with in one request (the
impression, the API call, one user's retrieved candidates) means the same at any log length, and
it is what LambdaRank ranks by anyway. So the ranker sees, for each such base column c:

    c_rank  the average rank of the row's value among the request's non-missing values, scaled
            to (0, 1]: (1 + rows below + (tied rows - 1) / 2) / non-missing rows. Highest = 1.
    c_z     (value - request mean) / request standard deviation (population), 0 when every
            value is equal; both over the request's non-missing values.

Missing (NaN) stays missing. One numpy kernel (`within_request`) serves the batch frames (many
requests at once) and the API (one request), so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

__all__ = ["SUFFIXES", "relative_columns", "with_relative", "within_request"]

SUFFIXES = ("_rank", "_z")


def relative_columns(base: Sequence[str]) -> list[str]:
    """The names `within_request` gives its output columns: c_rank, c_z per base column c."""
    return [f"{c}{s}" for c in base for s in SUFFIXES]


def within_request(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Within-request ranks and z-scores (see the module docstring).

    x: (n, f) float64, NaN = missing; groups: (n,) int64 request codes in [0, G).
    Returns (n, 2f) float64, columns (c0_rank, c0_z, c1_rank, ...) as `relative_columns`.
    """
    x = np.asarray(x, dtype=np.float64)
    n, f = x.shape
    g = np.asarray(groups, dtype=np.int64)
    out = np.full((n, 2 * f), np.nan)
    if n == 0:
        return out
    n_groups = int(g.max()) + 1
    if n_groups == 1 and g.min() == 0:
        return _one_request(x)
    for j in range(f):
        v = x[:, j]
        ok = ~np.isnan(v)
        count = np.bincount(g, weights=ok.astype(np.float64), minlength=n_groups)
        denom = np.maximum(count, 1.0)
        mean = np.bincount(g, weights=np.where(ok, v, 0.0), minlength=n_groups) / denom
        dev = np.where(ok, v - mean[g], 0.0)
        std = np.sqrt(np.bincount(g, weights=dev * dev, minlength=n_groups) / denom)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(std[g] > 0, dev / std[g], 0.0)
        out[:, 2 * j + 1] = np.where(ok, z, np.nan)

        # Average ranks: sort by (request, value), NaN last within a request; a run of equal
        # values in one request is one block and shares the mean of its positions.
        order = np.lexsort((v, g))
        gs, vs = g[order], v[order]
        pos = np.arange(n)
        new_group = np.concatenate([[True], gs[1:] != gs[:-1]])
        new_block = new_group | np.concatenate([[True], vs[1:] != vs[:-1]])
        group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
        starts = np.flatnonzero(new_block)
        ends = np.concatenate([starts[1:], [n]]) - 1
        block = np.cumsum(new_block) - 1
        avg = (starts[block] + ends[block]) / 2.0 - group_start + 1.0  # 1-based, ascending
        ranked = np.where(np.isnan(vs), np.nan, avg / np.maximum(count[gs], 1.0))
        out[order, 2 * j] = ranked
    return out


def _one_request(x: np.ndarray) -> np.ndarray:
    """`within_request` of a single request (the API's case), all columns at once: the same
    operations in the same order (sums accumulate row by row, as bincount does), so the same
    bits, without a Python loop over columns."""
    n, f = x.shape
    ok = ~np.isnan(x)
    count = np.cumsum(ok.astype(np.float64), axis=0)[-1]
    denom = np.maximum(count, 1.0)
    mean = np.cumsum(np.where(ok, x, 0.0), axis=0)[-1] / denom
    dev = np.where(ok, x - mean, 0.0)
    std = np.sqrt(np.cumsum(dev * dev, axis=0)[-1] / denom)
    out = np.empty((n, 2 * f))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(std > 0, dev / std, 0.0)
    out[:, 1::2] = np.where(ok, z, np.nan)

    order = np.argsort(x, axis=0, kind="stable")  # NaN last, as lexsort puts them
    xs = np.take_along_axis(x, order, axis=0)
    pos = np.arange(n, dtype=np.float64)[:, None]
    differs = xs[1:] != xs[:-1]
    first = np.vstack([np.ones((1, f), dtype=bool), differs])  # a block of equal values starts
    last = np.vstack([differs, np.ones((1, f), dtype=bool)])  # ... and ends
    starts = np.maximum.accumulate(np.where(first, pos, 0.0), axis=0)
    ends = np.minimum.accumulate(np.where(last, pos, float(n))[::-1], axis=0)[::-1]
    avg = (starts + ends) / 2.0 + 1.0
    ranked = np.where(np.isnan(xs), np.nan, avg / np.maximum(count, 1.0))
    rank = np.empty((n, f))
    np.put_along_axis(rank, order, ranked, axis=0)
    out[:, 0::2] = rank
    return out


def group_codes(ids: pl.Series) -> np.ndarray:
    """(n,) int64 codes of a request-id column: equal ids share a code (order irrelevant)."""
    return ids.rank("dense").cast(pl.Int64).to_numpy() - 1


def with_relative(frame: pl.DataFrame, base: Sequence[str], group_col: str) -> pl.DataFrame:
    """`frame` with `relative_columns(base)` appended (Float64), requests keyed by `group_col`.

    Existing columns of those names are replaced."""
    if not base:
        return frame
    x = frame.select(pl.col(list(base)).cast(pl.Float64).fill_null(np.nan)).to_numpy()
    rel = within_request(x, group_codes(frame[group_col]))
    names = relative_columns(base)
    return frame.with_columns(
        pl.Series(name, rel[:, i], dtype=pl.Float64) for i, name in enumerate(names)
    )
