"""Every behavioural feature from raw counts: the groups of `features.groups`, assembled.

Both entry points (`point_in_time_features` for training rows, `snapshot_features` for serving)
first gather the same raw columns - counts as of the moment `AT`, named "<table>.<stat>" after
the snapshot tables (listed in `features.groups`) - and then call `derive_features`; the live
state and the serving fast path call `derive_numpy`, its twin, or one group's `arrays`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.events import GROUPS
from features.formulas import Raw
from features.groups import GROUPS as FEATURE_GROUPS
from features.groups import ITEM_GROUPS, USER_GROUPS
from features.groups.user_category import table_of

GROUP_TABLES = {g: table_of(g) for g in GROUPS}  # category -> user_category, ...


def item_feature_names(config: FeatureConfig) -> list[str]:
    """The features that depend on the candidate item only (and on AT)."""
    return [n for g in ITEM_GROUPS for n in g.names(config)]


def user_feature_names(config: FeatureConfig | None = None) -> list[str]:
    """The features that depend on the user (and, for groups and user_item, the candidate)."""
    return [n for g in USER_GROUPS for n in g.names(config or FeatureConfig())]


def feature_names(config: FeatureConfig) -> list[str]:
    """All feature columns, in the stable order the ranker uses.

    Per window w of `config.windows`: item_shows_w, item_clicks_w, item_ctr_w (smoothed),
    item_interactions_w; then item_age_hours, item_hours_since_click; user_shows, user_clicks,
    user_ctr, user_history; user_category_{shows,clicks,ctr,share}; the same for
    user_subcategory; user_item_shows, user_item_history.
    """
    return [n for g in FEATURE_GROUPS for n in g.names(config)]


def prefixed(table_stats: pl.DataFrame, table: str) -> pl.DataFrame:
    """`table_stats` with its columns renamed to the raw names "<table>.<column>"."""
    return table_stats.rename({c: f"{table}.{c}" for c in table_stats.columns})


def derive_features(raw: pl.DataFrame, config: FeatureConfig) -> pl.DataFrame:
    """Feature columns (Float64, `feature_names(config)` order, raw's row order) from raw counts.

    Undefined values are null: item age with neither published_at nor a timestamped event
    before AT; hours since click for an item never clicked; user_category_* / user_subcategory_*
    when the candidate has no category / subcategory (or is unknown). Counts with no events are
    0, CTRs with no shows are `ctr_prior`, shares with no history are 0.
    """
    exprs = [e for g in FEATURE_GROUPS for e in g.exprs(config)]
    names = feature_names(config)
    return raw.select(e.cast(pl.Float64).alias(n) for e, n in zip(exprs, names, strict=True))


def derive_numpy(raw: Raw, config: FeatureConfig) -> np.ndarray:
    """The numpy twin of `derive_features` for one request or the live state: the same
    formulas in the same order, (n, F) float64 with NaN for null.

    raw: the raw columns under their raw names as float64 arrays of one length n, NaN = null;
    AT and the timestamps (items.published_at, items.last_click_at, items.first_seen_at) as
    epoch microseconds (exact in float64), items.category / items.subcategory as bool arrays
    "the candidate has one". tests/test_features.py checks both paths agree on random inputs.
    """
    cols = [a for g in FEATURE_GROUPS for a in g.arrays(raw, config)]
    return np.column_stack(cols).astype(np.float64, copy=False)
