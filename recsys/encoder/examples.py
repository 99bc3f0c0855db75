"""Training examples for the encoder: who saw what, what they clicked, what they had read.

An example is a user's history (their last `history_len` interactions strictly before the
moment), the item they clicked, and the items shown to them then and not clicked. Data sets
without clicks in impressions (MovieLens, H&M) give one example per timed interaction after a
user's first, with no shown items (the loop samples negatives). Built with polars joins (an
as-of join finds each moment's latest earlier interaction); no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from recsys.data.dataset import Dataset
from recsys.encoder.text import DEFAULT_TEMPLATE, item_texts
from recsys.errors import DataError

_NO_TIME = datetime(1900, 1, 1, tzinfo=UTC)  # interactions without a time: before the log


@dataclass(frozen=True)
class Examples:
    """Training examples over the catalogue's row index (0..n_items-1).

    history: (n, history_len) int32, -1 = padding; positive: (n,) int32;
    shown: (n, s) int32 shown-but-not-clicked items, -1 = padding (s >= 1);
    ts: (n,) int64 microseconds since the epoch (the moment of the example).
    texts: item text per catalogue row; source: "impressions" or "interactions".
    """

    history: np.ndarray
    positive: np.ndarray
    shown: np.ndarray
    ts: np.ndarray
    item_ids: list[str]
    texts: list[str]
    source: str
    fallback_texts: int = 0
    without_history: int = 0

    def __len__(self) -> int:
        return int(self.positive.shape[0])

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(
            self.history[idx],
            self.positive[idx],
            self.shown[idx],
            self.ts[idx],
            self.item_ids,
            self.texts,
            self.source,
            self.fallback_texts,
            self.without_history,
        )


def _padded(col: str, width: int) -> pl.Expr:
    return (
        pl.concat_list([pl.col(col), pl.lit(-1, pl.Int32).repeat_by(width)])
        .list.head(width)
        .list.to_array(width)
    )


def build_examples(
    data: Dataset, *, history_len: int = 5, template: str = DEFAULT_TEMPLATE, max_shown: int = 50
) -> Examples:
    """Examples from `data`: one per click when impressions hold clicks, else one per timed
    interaction after a user's first. History = the user's interactions strictly before the
    moment, most recent `history_len`; examples whose user has no history are left out (and
    counted in `without_history`)."""
    items = data.items
    if items.height == 0:
        raise DataError("items: the catalogue is empty; nothing to fine-tune on")
    texts, n_fallback = item_texts(items, template)
    idmap = items.select("item_id", pl.int_range(pl.len(), dtype=pl.Int32).alias("idx"))
    inter = (
        data.interactions.join(idmap, on="item_id")
        .with_columns(pl.col("ts").fill_null(_NO_TIME))
        .sort("user_id", "ts", maintain_order=True)
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("user_id").alias("pos"))
    )
    seqs = inter.group_by("user_id", maintain_order=True).agg(pl.col("idx").alias("seq"))
    h = history_len
    clicks = data.impressions.filter(pl.col("clicked"))
    if clicks.height:
        source = "impressions"
        # pos = index of the user's latest interaction strictly before the impression.
        ex = _click_examples(data.impressions, idmap, inter, max_shown)
    else:
        source = "interactions"
        ex = inter.filter(pl.col("ts") > _NO_TIME).select(
            "user_id",
            "ts",
            pl.col("idx").alias("positive"),
            "pos",
            pl.lit(None, pl.List(pl.Int32)).alias("shown"),
        )
        ex = ex.with_columns(pl.col("pos") - 1)  # the history ends just before this interaction
    offset, length = (pl.col("pos") + 1 - h).clip(0), pl.min_horizontal(pl.col("pos") + 1, h)
    total = ex.height
    ex = (
        ex.filter(pl.col("pos") >= 0)
        .join(seqs, on="user_id", how="left")
        .with_columns(pl.col("seq").list.slice(offset, length).alias("history"))
        .sort("ts", "user_id", maintain_order=True)
    )
    longest = ex.select(pl.col("shown").list.len().max()).item()
    s = max(1, min(max_shown, int(longest or 0)))
    arrays = ex.select(
        _padded("history", h).alias("history"),
        pl.col("positive"),
        _padded("shown", s).fill_null(pl.lit([-1] * s, pl.Array(pl.Int32, s))).alias("shown"),
        pl.col("ts").dt.epoch("us").alias("ts"),
    )
    return Examples(
        history=arrays["history"].to_numpy().astype(np.int32).reshape(-1, h),
        positive=arrays["positive"].to_numpy().astype(np.int32),
        shown=arrays["shown"].to_numpy().astype(np.int32).reshape(-1, s),
        ts=arrays["ts"].to_numpy().astype(np.int64),
        item_ids=items["item_id"].to_list(),
        texts=texts,
        source=source,
        fallback_texts=n_fallback,
        without_history=total - ex.height,
    )


def _click_examples(
    impressions: pl.DataFrame, idmap: pl.DataFrame, inter: pl.DataFrame, max_shown: int
) -> pl.DataFrame:
    """One row per click: impression_id, user_id, ts, positive (catalogue row), shown (the
    impression's other rows, at most max_shown), pos (index of the user's latest interaction
    strictly before the impression, null for none)."""
    imp = impressions.join(idmap, on="item_id")
    shown = (
        imp.filter(~pl.col("clicked"))
        .group_by("impression_id")
        .agg(pl.col("idx").head(max_shown).alias("shown"))
    )
    return (
        imp.filter(pl.col("clicked"))
        .select("impression_id", "user_id", "ts", pl.col("idx").alias("positive"))
        .join(shown, on="impression_id", how="left")
        .sort("ts")
        .join_asof(
            inter.select("user_id", "ts", "pos").sort("ts"),
            on="ts",
            by="user_id",
            strategy="backward",
            allow_exact_matches=False,
            check_sortedness=False,  # both sides are sorted by ts just above
        )
    )


def split_by_time(ex: Examples, val_fraction: float) -> tuple[Examples, Examples]:
    """(train, validation): validation = examples at or after the (1 - val_fraction) time
    quantile, so it is the latest time slice; no example of it is older than a training one."""
    n = len(ex)
    if val_fraction <= 0 or n < 2:
        return ex, ex.take(np.arange(0))
    order = np.argsort(ex.ts, kind="stable")
    cut = ex.ts[order[int(n * (1 - val_fraction))]]
    val = ex.ts >= cut
    if val.all():  # one moment only: fall back to the last rows
        val = np.zeros(n, dtype=bool)
        val[order[int(n * (1 - val_fraction)) :]] = True
    return ex.take(np.flatnonzero(~val)), ex.take(np.flatnonzero(val))
