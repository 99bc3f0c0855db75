"""The one definition of every behavioural feature, from raw counts.

Both entry points (`point_in_time_features` for training rows, `snapshot_features` for serving)
first gather the same raw columns - counts as of the moment `AT`, named "<table>.<stat>" after
the snapshot tables - and then call `derive_features`. The numpy fast path reuses the item
columns derived here and `smoothed_ctr`/`share_np` for the per-user part.

Raw columns (nullable; a null count means no event):
    AT                                   moment the features describe (Datetime UTC)
    items.{shows,clicks,interactions}_{w} per window w; items.last_click_at, items.first_seen_at,
    items.published_at, items.category, items.subcategory
    users.{shows,clicks,history}
    user_category.{shows,clicks,history}, user_subcategory.{shows,clicks,history}
    user_item.{shows,history}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.events import AT, GROUPS

# Hours are microseconds times this constant in both paths: polars turns a column divided by a
# literal into a multiplication by its reciprocal, so a division here would differ from numpy's
# in the last bit.
HOURS_PER_US = 1.0 / 3_600_000_000.0

GROUP_TABLES = {g: f"user_{g}" for g in GROUPS}  # category -> user_category, ...
ITEM_TIME_FEATURES = ("item_age_hours", "item_hours_since_click")

T = TypeVar("T", pl.Expr, np.ndarray, float)


def item_window_names(window: str) -> list[str]:
    return [f"item_{s}_{window}" for s in ("shows", "clicks", "ctr", "interactions")]


def item_feature_names(config: FeatureConfig) -> list[str]:
    """The features that depend on the candidate item only (and on AT)."""
    names = [n for w in config.windows for n in item_window_names(w)]
    return [*names, *ITEM_TIME_FEATURES]


def user_feature_names() -> list[str]:
    """The features that depend on the user (and, for groups and user_item, the candidate)."""
    names = ["user_shows", "user_clicks", "user_ctr", "user_history"]
    for table in GROUP_TABLES.values():
        names += [f"{table}_{s}" for s in ("shows", "clicks", "ctr", "share")]
    return [*names, "user_item_shows", "user_item_history"]


def feature_names(config: FeatureConfig) -> list[str]:
    """All feature columns, in the stable order the ranker uses.

    Per window w of `config.windows`: item_shows_w, item_clicks_w, item_ctr_w (smoothed),
    item_interactions_w; then item_age_hours, item_hours_since_click; user_shows, user_clicks,
    user_ctr, user_history; user_category_{shows,clicks,ctr,share}; the same for
    user_subcategory; user_item_shows, user_item_history.
    """
    return [*item_feature_names(config), *user_feature_names()]


def smoothed_ctr(clicks: T, shows: T, config: FeatureConfig) -> T:
    """(clicks + prior * weight) / (shows + weight); works on polars expressions and arrays."""
    return (clicks + config.ctr_prior * config.prior_weight) / (shows + config.prior_weight)  # type: ignore[return-value]


def share_expr(part: pl.Expr, total: pl.Expr) -> pl.Expr:
    """part / total, 0 when total is 0 (part <= total always, so part / max(total, 1))."""
    return part / pl.max_horizontal(total, pl.lit(1.0))


def share_np(part: np.ndarray, total: float) -> np.ndarray:
    """The numpy twin of `share_expr` (same operations, same numbers)."""
    return part / np.maximum(total, 1.0)  # type: ignore[no-any-return]


def prefixed(table_stats: pl.DataFrame, table: str) -> pl.DataFrame:
    """`table_stats` with its columns renamed to the raw names "<table>.<column>"."""
    return table_stats.rename({c: f"{table}.{c}" for c in table_stats.columns})


def _count(name: str) -> pl.Expr:
    return pl.col(name).fill_null(0.0).cast(pl.Float64)


def _hours_since(name: str) -> pl.Expr:
    return (pl.col(AT) - pl.col(name)).dt.total_microseconds().cast(pl.Float64) * HOURS_PER_US


def derive_features(raw: pl.DataFrame, config: FeatureConfig) -> pl.DataFrame:
    """Feature columns (Float64, `feature_names(config)` order, raw's row order) from raw counts.

    Undefined values are null: item age with neither published_at nor a timestamped event
    before AT; hours since click for an item never clicked; user_category_* / user_subcategory_*
    when the candidate has no category / subcategory (or is unknown). Counts with no events are
    0, CTRs with no shows are `ctr_prior`, shares with no history are 0.
    """
    exprs: list[pl.Expr] = []
    for w in config.windows:
        shows, clicks = _count(f"items.shows_{w}"), _count(f"items.clicks_{w}")
        exprs += [shows, clicks, smoothed_ctr(clicks, shows, config)]
        exprs.append(_count(f"items.interactions_{w}"))
    exprs.append(
        (pl.col(AT) - pl.coalesce("items.published_at", "items.first_seen_at"))
        .dt.total_microseconds()
        .cast(pl.Float64)
        * HOURS_PER_US
    )
    exprs.append(_hours_since("items.last_click_at"))

    shows, clicks, history = _count("users.shows"), _count("users.clicks"), _count("users.history")
    exprs += [shows, clicks, smoothed_ctr(clicks, shows, config), history]
    for group, table in GROUP_TABLES.items():
        known = pl.col(f"items.{group}").is_not_null()
        g_shows, g_clicks = _count(f"{table}.shows"), _count(f"{table}.clicks")
        g_share = share_expr(_count(f"{table}.history"), history)
        for e in (g_shows, g_clicks, smoothed_ctr(g_clicks, g_shows, config), g_share):
            exprs.append(pl.when(known).then(e))
    exprs += [_count("user_item.shows"), _count("user_item.history")]

    names = feature_names(config)
    return raw.select(e.cast(pl.Float64).alias(n) for e, n in zip(exprs, names, strict=True))


def derive_numpy(raw: Mapping[str, np.ndarray], config: FeatureConfig) -> np.ndarray:
    """The numpy twin of `derive_features` for the serving hot path: the same formulas in the
    same order, (n, F) float64 with NaN for null.

    raw: the raw columns under their raw names as float64 arrays of one length n, NaN = null;
    AT and the timestamps (items.published_at, items.last_click_at, items.first_seen_at) as
    epoch microseconds (exact in float64), items.category / items.subcategory as bool arrays
    "the candidate has one". tests/test_features.py checks both paths agree on random inputs.
    """

    def count(name: str) -> np.ndarray:  # fill_null(0.0)
        v = raw[name]
        return np.where(np.isnan(v), 0.0, v)

    at = raw[AT]
    cols: list[np.ndarray] = []
    for w in config.windows:
        shows, clicks = count(f"items.shows_{w}"), count(f"items.clicks_{w}")
        cols += [
            shows,
            clicks,
            smoothed_ctr(clicks, shows, config),
            count(f"items.interactions_{w}"),
        ]
    born = np.where(np.isnan(raw["items.published_at"]), raw["items.first_seen_at"],
                    raw["items.published_at"])  # fmt: skip
    cols.append((at - born) * HOURS_PER_US)
    cols.append((at - raw["items.last_click_at"]) * HOURS_PER_US)
    shows, clicks, history = count("users.shows"), count("users.clicks"), count("users.history")
    cols += [shows, clicks, smoothed_ctr(clicks, shows, config), history]
    for group, table in GROUP_TABLES.items():
        known = raw[f"items.{group}"].astype(bool)
        g_shows, g_clicks = count(f"{table}.shows"), count(f"{table}.clicks")
        g_share = share_np(count(f"{table}.history"), history)  # type: ignore[arg-type]
        for e in (g_shows, g_clicks, smoothed_ctr(g_clicks, g_shows, config), g_share):
            cols.append(np.where(known, e, np.nan))
    cols += [count("user_item.shows"), count("user_item.history")]
    return np.column_stack(cols).astype(np.float64, copy=False)
