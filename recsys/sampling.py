"""Impressions for data sets that have none (MovieLens, H&M): each timed positive becomes a shown
list of itself plus sampled negatives, so the ranker and the metrics work the same way on them."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.data.schema import IMPRESSIONS, ITEMS, conform
from recsys.errors import ConfigError


def impressions_from_interactions(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    *,
    negatives: int = 20,
    max_impressions: int | None = None,
    seed: int = 0,
    popular_share: float = 0.5,
) -> pl.DataFrame:
    """Canonical impressions: one per timed interaction, the positive first then `negatives`
    items, `clicked` set accordingly. A `popular_share` of the negatives is the item of a
    random earlier interaction (popularity-proportional, as of the positive's time: the kind of
    item retrieval puts beside it, so the ranker learns to order popular candidates, not only
    to tell them from random ones); the rest are drawn uniformly from the items published
    before it.

    `max_impressions` keeps a uniform sample of the positives (seeded) to bound the cost.
    Interactions without a time (history from before the log) yield no impression.
    """
    if not 0.0 <= popular_share <= 1.0:
        raise ConfigError(f"sampling: popular_share must be in [0, 1], got {popular_share}")
    rng = np.random.default_rng(seed)
    timed = interactions.filter(pl.col("ts").is_not_null()).sort("ts", "user_id", "item_id")
    past_items = timed["item_id"].to_numpy()
    past_ts = timed["ts"].dt.epoch("us").to_numpy()
    pos = interactions.filter(pl.col("ts").is_not_null()).select("user_id", "item_id", "ts")
    if max_impressions is not None and pos.height > max_impressions:
        keep = np.sort(rng.choice(pos.height, max_impressions, replace=False))
        pos = pos[keep]
    pos = pos.with_row_index("k")
    # Negatives only among items already published at the positive's time (else their age
    # would give them away); items without a publication time count as always there.
    by_pub = (
        conform(ITEMS, items)
        .select("item_id", pl.col("published_at").dt.epoch("us").fill_null(np.iinfo(np.int64).min))
        .sort("published_at")
    )
    catalogue = by_pub["item_id"].to_numpy()
    eligible = np.searchsorted(
        by_pub["published_at"].to_numpy(), pos["ts"].dt.epoch("us").to_numpy(), side="left"
    )
    eligible = np.maximum(eligible, 1)  # at least the first item
    n = pos.height
    neg_idx = (rng.random((n, negatives)) * eligible[:, None]).astype(np.int64)
    negs = catalogue[neg_idx]
    n_pop = round(popular_share * negatives)
    if n_pop:
        before = np.searchsorted(past_ts, pos["ts"].dt.epoch("us").to_numpy(), side="left")
        pick = (rng.random((n, n_pop)) * before[:, None]).astype(np.int64)
        has = before > 0  # the first interactions have no past: keep their uniform draws
        negs[has, :n_pop] = past_items[pick[has]]
    neg = pl.DataFrame(
        {
            "k": np.repeat(np.arange(n, dtype=np.uint32), negatives),
            "item_id": negs.ravel(),
            "position": np.tile(np.arange(1, negatives + 1, dtype=np.int32), n),
        }
    ).join(pos.select("k", "user_id", "ts"), on="k")
    shown = pl.concat(
        [
            pos.with_columns(pl.lit(True).alias("clicked"), pl.lit(0, pl.Int32).alias("position")),
            neg.with_columns(pl.lit(False).alias("clicked")),
        ],
        how="diagonal",
    )
    shown = (
        shown.with_columns(pl.format("s{}", pl.col("k")).alias("impression_id"))
        .sort("k", "position")
        .unique(["impression_id", "item_id"], keep="first", maintain_order=True)
    )
    return conform(IMPRESSIONS, shown)
