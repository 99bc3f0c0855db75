"""Item vectors: the table of catalogue embeddings, and incremental re-embedding.

item_vectors.parquet: item_id (str), vector (array[float32, dim]), text_hash (str),
encoder_id (str); one row per catalogue item, in catalogue order.

An item keeps its previous vector when its text hash and the encoder id are both unchanged;
new or changed items are embedded; items gone from the catalogue are dropped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.encoder.text import item_texts, text_hashes
from recsys.errors import DataError

COLUMNS: tuple[str, ...] = ("item_id", "vector", "text_hash", "encoder_id")


def vectors_frame(
    item_ids: Sequence[str], vectors: np.ndarray, hashes: Sequence[str], encoder_id: str
) -> pl.DataFrame:
    """The item vectors table for `vectors` (n, dim) float32 (row i for item_ids[i])."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(item_ids):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(item_ids)} ids")
    return pl.DataFrame(
        {
            "item_id": pl.Series(list(item_ids), dtype=pl.String),
            "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])),
            "text_hash": pl.Series(list(hashes), dtype=pl.String),
            "encoder_id": pl.Series([encoder_id] * len(item_ids), dtype=pl.String),
        }
    )


def empty_vectors() -> pl.DataFrame:
    """An item vectors table with no rows (vector as list[float32]: no dimension known)."""
    return pl.DataFrame(
        schema={
            "item_id": pl.String,
            "vector": pl.List(pl.Float32),
            "text_hash": pl.String,
            "encoder_id": pl.String,
        }
    )


def read_item_vectors(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The item vectors table at `path` (vector as array[float32, dim]); `DataError` if bad."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no item vectors file; run `recsys embed` to write it")
    try:
        df = pl.read_parquet(p)
    except Exception as e:  # polars raises several types for unreadable files
        raise DataError(f"{p}: unreadable item vectors file ({e}); delete it and re-embed") from e
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{p}: item vectors file lacks column(s) {missing}; expected {list(COLUMNS)}; "
            "delete it and re-embed"
        )
    vec = df.schema["vector"]
    if isinstance(vec, pl.List) and df.height:
        dims = df["vector"].list.len().unique()
        if dims.len() != 1:
            raise DataError(f"{p}: vectors of different lengths; delete it and re-embed")
        df = df.with_columns(pl.col("vector").cast(pl.Array(pl.Float32, int(dims[0]))))
    elif not isinstance(vec, pl.Array | pl.List):
        raise DataError(f"{p}: column vector is {vec}, expected an array of float32")
    return df.select(COLUMNS)


def load_item_vectors(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """(item ids, vectors (n, dim) float32) from an item vectors file."""
    df = read_item_vectors(path)
    if df.height == 0:
        return [], np.zeros((0, 0), dtype=np.float32)
    vectors = df["vector"].to_numpy()
    return df["item_id"].to_list(), np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class EmbedPlan:
    """What an incremental embedding run must do.

    todo: items to embed (item_id, text, text_hash), in catalogue order.
    reused: previous rows kept as they are (COLUMNS).
    order: item_id in catalogue order (the output's row order).
    dropped: previous rows whose item left the catalogue.
    fallback_texts: items whose text came from the fallback (see `item_texts`).
    """

    todo: pl.DataFrame
    reused: pl.DataFrame
    order: pl.DataFrame
    dropped: int
    fallback_texts: int


def plan_embedding(
    items: pl.DataFrame, template: str, encoder_id: str, previous: pl.DataFrame | None
) -> EmbedPlan:
    """Split the catalogue into items to embed and previous vectors to keep."""
    texts, n_fallback = item_texts(items, template)
    ids = items["item_id"].cast(pl.String)
    current = pl.DataFrame(
        {"item_id": ids, "text": pl.Series(texts, dtype=pl.String), "text_hash": text_hashes(texts)}
    )
    if current["item_id"].is_duplicated().any():
        dups = current.filter(pl.col("item_id").is_duplicated())["item_id"].unique().head(5)
        raise DataError(f"items: duplicate item_id(s) {dups.to_list()}; validate the dataset first")
    if previous is None or previous.height == 0:
        return EmbedPlan(current, empty_vectors(), current.select("item_id"), 0, n_fallback)
    reused = previous.join(
        current.select("item_id", "text_hash"), on=["item_id", "text_hash"], how="semi"
    ).filter(pl.col("encoder_id") == encoder_id)
    todo = current.join(reused.select("item_id"), on="item_id", how="anti")
    dropped = previous.join(current.select("item_id"), on="item_id", how="anti").height
    return EmbedPlan(todo, reused.select(COLUMNS), current.select("item_id"), dropped, n_fallback)


def through_head(
    plan: EmbedPlan, base: pl.DataFrame, base_id: str, weight: np.ndarray, encoder_id: str
) -> tuple[pl.DataFrame, EmbedPlan]:
    """For an encoder that is a base model followed by a projection head W alone: (vectors of
    the items of `plan.todo` whose text `base` (the base model's item vectors table) holds
    under `base_id`, as normalize(W v), the plan left for the encoder itself).

    The result equals embedding those texts with the encoder (`recsys.encoder.model.apply_head`
    computes the same map), for the cost of one matrix product."""
    known = base.filter(pl.col("encoder_id") == base_id).unique(
        subset="text_hash", keep="first", maintain_order=True
    )
    hit = plan.todo.join(known.select("text_hash", "vector"), on="text_hash", how="inner",
                         maintain_order="left")  # fmt: skip
    if hit.height == 0:
        return empty_vectors(), plan
    v = np.ascontiguousarray(hit["vector"].to_numpy(), dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    out = v @ w.T
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    rows = vectors_frame(hit["item_id"].to_list(), out, hit["text_hash"].to_list(), encoder_id)
    todo = plan.todo.join(hit.select("item_id"), on="item_id", how="anti", maintain_order="left")
    return rows, dataclasses.replace(plan, todo=todo)


def assemble(plan: EmbedPlan, *fresh: pl.DataFrame) -> pl.DataFrame:
    """Reused plus freshly embedded rows (all COLUMNS), in catalogue order."""
    parts = [f.select(COLUMNS) for f in (plan.reused, *fresh) if f.height]
    if not parts:
        return empty_vectors()
    for other in parts[1:]:
        if other.schema["vector"] != parts[0].schema["vector"]:
            raise DataError(
                f"previous vectors are {parts[0].schema['vector']}, new ones "
                f"{other.schema['vector']}; delete the item vectors file and re-embed"
            )
    out = plan.order.join(pl.concat(parts), on="item_id", how="left", maintain_order="left")
    if out["vector"].null_count():
        raise RuntimeError("internal error: an item has no vector after embedding")
    return out


def embed_catalogue(
    embed: Callable[[list[str]], np.ndarray],
    items: pl.DataFrame,
    template: str,
    encoder_id: str,
    previous: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, EmbedPlan]:
    """In-process incremental embedding: (item vectors table, the plan it followed).

    embed: texts → (n, dim) float32 unit vectors (e.g. `TextEncoder.embed`).
    """
    plan = plan_embedding(items, template, encoder_id, previous)
    texts = plan.todo["text"].to_list()
    fresh = empty_vectors()
    if texts:
        ids, hashes = plan.todo["item_id"].to_list(), plan.todo["text_hash"].to_list()
        fresh = vectors_frame(ids, embed(texts), hashes, encoder_id)
    return assemble(plan, fresh), plan
