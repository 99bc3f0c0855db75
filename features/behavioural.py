"""Behavioural features per training row: each (request, candidate) as of its own time.

    point_in_time_features(requests, data, config) -> requests + feature_names(config) columns

Counts come only from events strictly before each row's ts (see `features.events`), so a
model trained on them never sees the future, including the other items and the click of the
same impression.
"""

from __future__ import annotations

import polars as pl

from features.config import FeatureConfig
from features.derive import GROUP_TABLES, derive_features, feature_names, prefixed
from features.events import (
    AT,
    GROUPS,
    Events,
    group_stats,
    item_stats,
    prepare_events,
    user_item_stats,
    user_stats,
)
from features.requests import check_requests, utc_ts
from recsys.data.dataset import Dataset

REQUEST_COLUMNS = ("request_id", "user_id", "ts", "item_id")
ITEM_META = ("category", "subcategory", "published_at")


def point_in_time_features(
    requests: pl.DataFrame, data: Dataset, config: FeatureConfig | None = None
) -> pl.DataFrame:
    """The features of each (request, candidate) row from events strictly before its ts.

    requests: request_id (str), user_id (str), ts (datetime; naive is read as UTC), item_id (str),
        n rows, any extra columns kept. data: the dataset whose events are counted (impressions
        and interactions may be empty). Returns the n rows in the same order with the
        `feature_names(config)` columns appended (Float64, null where undefined; see
        `features.derive.derive_features`). Interactions with a null ts count as before every row.
    """
    return features_as_of(requests, prepare_events(data), config)


def features_as_of(
    requests: pl.DataFrame, events: Events, config: FeatureConfig | None = None
) -> pl.DataFrame:
    """`point_in_time_features` from the prepared event logs (`prepare_events(data)`): a large
    log's requests are asked in chunks against logs prepared once. Each row's features are the
    same whichever other rows are asked with it."""
    config = config or FeatureConfig()
    where = "point_in_time_features"
    check_requests(requests, REQUEST_COLUMNS, feature_names(config), where)
    queries = requests.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)
    ).with_columns(utc_ts(requests, where).alias(AT))
    raw = raw_as_of(queries, events, config)
    return requests.hstack(derive_features(raw, config).get_columns())


def raw_as_of(queries: pl.DataFrame, events: Events, config: FeatureConfig) -> pl.DataFrame:
    """The raw columns `derive_features` reads, for queries (user_id, item_id, AT), in order."""
    q = queries.join(
        events.items.select("item_id", *ITEM_META), on="item_id", how="left", maintain_order="left"
    )
    parts = [
        q.select(AT, *[pl.col(c).alias(f"items.{c}") for c in ITEM_META]),
        prefixed(item_stats(events, q, config.windows), "items"),
        prefixed(user_stats(events, q), "users"),
        *[prefixed(group_stats(events, q, g), GROUP_TABLES[g]) for g in GROUPS],
        prefixed(user_item_stats(events, q), "user_item"),
    ]
    return pl.concat(parts, how="horizontal")
