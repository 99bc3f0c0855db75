"""The formulas the feature groups share, each in a polars and a numpy form that give the same
bits (tests/test_features.py checks them on random inputs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.events import AT

# Hours are microseconds times this constant in both forms: polars turns a column divided by a
# literal into a multiplication by its reciprocal, so a division here would differ from numpy's
# in the last bit.
HOURS_PER_US = 1.0 / 3_600_000_000.0

T = TypeVar("T", pl.Expr, np.ndarray, float)

Raw = Mapping[str, np.ndarray]  # raw columns as float64 arrays, NaN = null (see derive.py)


def smoothed_ctr(clicks: T, shows: T, config: FeatureConfig) -> T:
    """(clicks + prior * weight) / (shows + weight); works on polars expressions and arrays."""
    return (clicks + config.ctr_prior * config.prior_weight) / (shows + config.prior_weight)  # type: ignore[return-value]


def share_expr(part: pl.Expr, total: pl.Expr) -> pl.Expr:
    """part / total, 0 when total is 0 (part <= total always, so part / max(total, 1))."""
    return part / pl.max_horizontal(total, pl.lit(1.0))


def share_np(part: np.ndarray, total: np.ndarray | float) -> np.ndarray:
    """The numpy twin of `share_expr` (same operations, same numbers)."""
    return part / np.maximum(total, 1.0)  # type: ignore[no-any-return]


def count_expr(name: str) -> pl.Expr:
    """A raw count as a number: no event (null) is 0."""
    return pl.col(name).fill_null(0.0).cast(pl.Float64)


def count_np(raw: Raw, name: str) -> np.ndarray:
    """The numpy twin of `count_expr`."""
    v = raw[name]
    return np.where(np.isnan(v), 0.0, v)


def hours_since_expr(name: str) -> pl.Expr:
    """Hours from the raw time column `name` to the moment AT (null when `name` is)."""
    return (pl.col(AT) - pl.col(name)).dt.total_microseconds().cast(pl.Float64) * HOURS_PER_US
