"""Lookups prepared once per bundle, so a request costs dict lookups and array slices.

Histories.build(history, vectors, as_of)   every user's stored history, windowed as
                                            `recsys.semantic.semantic_features` does
NightlyLists.build(recommendations)        the nightly lists, per user, in rank order
Catalogue.build(bundle, index, histories)  the users, items and categories the model knows
                                           (grown by live events, serving/live.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from features.live import epoch_us
from recsys.bundle import Bundle
from recsys.vectors import ItemVectors


@dataclass(frozen=True)
class Histories:
    """Every user's stored history in the order `semantic_features` windows it.

    Rows sorted by (user, ts with nulls first, row of bundle.history); user u owns rows
    ptr[u] = (lo, hi). item_ids (H,) str, vrow (H,) int64 row of the vector matrix or -1,
    ts (H,) float64 epoch microseconds (NaN: no time). Only rows before the snapshot's as_of.
    """

    ptr: dict[str, tuple[int, int]]
    item_ids: np.ndarray
    vrow: np.ndarray
    ts: np.ndarray

    @classmethod
    def build(cls, history: pl.DataFrame, vectors: ItemVectors, as_of: datetime) -> Histories:
        ts = (
            pl.col("ts").dt.epoch("us")
            if "ts" in history.columns and isinstance(history.schema["ts"], pl.Datetime)
            else pl.lit(None, dtype=pl.Int64)
        )
        h = (
            history.select(
                pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), ts.alias("t")
            )
            .with_row_index("__h")
            .filter(pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null())
            .filter(pl.col("t").is_null() | (pl.col("t") < epoch_us(as_of)))
            .sort(["user_id", "t", "__h"], nulls_last=False)
        )
        item_ids = h["item_id"].to_numpy().astype(object)
        vrow = np.fromiter((vectors.index.get(i, -1) for i in item_ids), np.int64, len(item_ids))
        bounds = (
            h.select("user_id")
            .with_row_index("__r")
            .group_by("user_id", maintain_order=True)
            .agg(pl.col("__r").min().alias("lo"), pl.len().alias("n"))
        )
        ptr = {
            u: (int(lo), int(lo) + int(n))
            for u, lo, n in zip(
                bounds["user_id"].to_list(),
                bounds["lo"].to_list(),
                bounds["n"].to_list(),
                strict=True,
            )
        }
        return cls(ptr, item_ids, vrow, h["t"].cast(pl.Float64).fill_null(np.nan).to_numpy())


@dataclass(frozen=True)
class NightlyLists:
    """The nightly lists: user u's rows are lo:hi of item_ids / scores, in rank order."""

    ptr: dict[str, tuple[int, int]]
    item_ids: list[str]
    scores: np.ndarray
    generated_at: str | None

    @classmethod
    def build(cls, recs: pl.DataFrame | None) -> NightlyLists:
        if recs is None or recs.height == 0:
            return cls({}, [], np.zeros(0), None)
        r = recs.sort(["user_id", "rank"]).with_row_index("__r")
        b = r.group_by("user_id", maintain_order=True).agg(
            pl.col("__r").min().alias("lo"), pl.len().alias("n")
        )
        ptr = {
            u: (int(lo), int(lo) + int(n))
            for u, lo, n in zip(
                b["user_id"].to_list(), b["lo"].to_list(), b["n"].to_list(), strict=True
            )
        }
        gen = r["generated_at"].max() if "generated_at" in r.columns else None
        return cls(
            ptr,
            r["item_id"].to_list(),
            r["score"].cast(pl.Float64).to_numpy(),
            gen.isoformat() if isinstance(gen, datetime) else None,
        )


@dataclass
class Catalogue:
    """Who and what the model knows: users with a profile or a history, items with features or
    a vector, and each item's category. Live events (serving/live.py) add to it: the sets in
    place (read by membership only), `item_category` and `categories` by replacing them, since
    requests iterate those (rules)."""

    known_users: set[str]
    known_items: set[str]
    item_category: dict[str, str]
    categories: set[str]

    @classmethod
    def build(cls, bundle: Bundle, index: Any, histories: Histories) -> Catalogue:
        """`index`: the snapshot's numpy index (`user_row`, `item_row`)."""
        known_users = set(index.user_row) | set(histories.ptr)
        known_items = set(index.item_row) | set(bundle.vectors.index)
        cat = bundle.snapshot.tables["items"].select(
            pl.col("item_id").cast(pl.String), pl.col("category").cast(pl.String)
        )
        item_category: dict[str, str] = dict(cat.drop_nulls().iter_rows())
        return cls(known_users, known_items, item_category, set(item_category.values()))
