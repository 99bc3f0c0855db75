"""Candidate generation: each user's nearest items by profile vector, plus popular recent items.

Retrieval is an exact matrix product in chunks of users (about 8M scores, 32 MB, per chunk), so
it stays exact up to about a million items without an approximate index. Items the user already
consumed and items outside `eligible` are never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError
from recsys.vectors import ItemVectors

__all__ = ["candidate_recall", "retrieve_candidates"]

_CHUNK_SCORES = 1 << 23  # users per chunk = this // n_items

CANDIDATE_SCHEMA = pl.Schema(
    {"user_id": pl.String, "item_id": pl.String, "source": pl.String, "sem_score": pl.Float32}
)


def _exclusion_pairs(
    exclude: pl.DataFrame | None, users: pl.DataFrame, keys: pl.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """(user position, item key) of each exclusion whose user and item are in play, by user."""
    if exclude is None or exclude.height == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    missing = [c for c in ("user_id", "item_id") if c not in exclude.columns]
    if missing:
        raise DataError(f"exclude: missing column(s) {missing}; it needs user_id and item_id")
    pairs = (
        exclude.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        .join(users, on="user_id", how="inner")
        .join(keys, on="item_id", how="inner")
        .unique()
        .sort("__u", "__key")
    )
    return pairs["__u"].to_numpy().astype(np.int64), pairs["__key"].to_numpy().astype(np.int64)


def retrieve_candidates(
    user_ids: Sequence[str],
    user_matrix: np.ndarray,
    vectors: ItemVectors,
    *,
    k_semantic: int = 100,
    popular: Sequence[str] | None = None,
    k_popular: int = 50,
    exclude: pl.DataFrame | None = None,
    eligible: set[str] | None = None,
    cold_users: Sequence[str] = (),
) -> pl.DataFrame:
    """Candidates per user: the `k_semantic` items nearest the user's profile vector, plus the
    `k_popular` best of `popular` the user has not consumed.

    user_ids (u,), user_matrix (u, d): profile vectors (unit rows, e.g. from
        `semantic.user_profile_vectors`); rows with NaN get popular items only.
    popular: item ids, best first (e.g. most clicked recently); need not have vectors.
    exclude: user_id, item_id pairs never to return (already consumed).
    eligible: if given, only these item ids are returned (e.g. items still fresh).
    cold_users: users without a profile vector; they get popular items only.

    Returns user_id, item_id, source ("semantic" | "popular" | "both"), sem_score (Float32
    cosine to the profile; NaN where the user or item has no vector). Users in input order
    (profiled users, then cold users); within a user, semantic and both rows by sem_score
    descending, then popular-only rows in popularity order.
    """
    for key, value in (("k_semantic", k_semantic), ("k_popular", k_popular)):
        if value < 0:
            raise ConfigError(f"retrieve_candidates: {key} must be >= 0, got {value}")
    mat = np.asarray(user_matrix, dtype=np.float32)
    n_sem_users = len(user_ids)
    if mat.ndim != 2 or mat.shape[0] != n_sem_users:
        raise DataError(
            f"retrieve_candidates: user_matrix must be ({n_sem_users}, dim) for "
            f"{n_sem_users} user ids, got {mat.shape}"
        )
    if n_sem_users and len(vectors) and mat.shape[1] != vectors.dim:
        raise DataError(
            f"retrieve_candidates: user vectors have dim {mat.shape[1]} but item vectors "
            f"{vectors.dim}; build both with the same encoder"
        )
    all_users = [str(u) for u in user_ids] + [str(u) for u in cold_users]
    if len(set(all_users)) != len(all_users):
        raise DataError("retrieve_candidates: user ids repeat (in user_ids or cold_users)")
    n_users, n_items = len(all_users), len(vectors)

    # Item keys: rows of vectors.matrix, then popular items without a vector (n_items + j).
    item_ok = np.ones(n_items, dtype=bool)
    if eligible is not None:
        item_ok[:] = False
        rows, found = vectors.lookup(sorted(eligible))
        item_ok[rows[found]] = True
    pop = pl.Series("item_id", list(popular or []), dtype=pl.String).drop_nulls()
    pop = pop.filter(pop.is_first_distinct())
    if eligible is not None:
        pop = pop.filter(pop.is_in(pl.Series(sorted(eligible), dtype=pl.String)))
    pop_row, pop_found = vectors.lookup(pop)
    n_extra = int((~pop_found).sum())
    pop_key = pop_row.copy()
    pop_key[~pop_found] = n_items + np.arange(n_extra)
    key_ids = pl.concat([pl.Series(vectors.ids, dtype=pl.String), pop.filter(~pop_found)])
    keys = pl.DataFrame({"item_id": key_ids, "__key": np.arange(key_ids.len(), dtype=np.int64)})
    users = pl.DataFrame({"user_id": all_users, "__u": np.arange(n_users, dtype=np.int64)})
    ex_u, ex_key = _exclusion_pairs(exclude, users, keys)
    # pop rank of each key (-1 if not popular), to find exclusions inside the popular list
    rank_of_key = np.full(key_ids.len(), -1, dtype=np.int64)
    rank_of_key[pop_key] = np.arange(pop.len())

    sem_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pop_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    step = max(1, _CHUNK_SCORES // max(n_items, 1))
    has_profile = np.zeros(n_users, dtype=bool)
    has_profile[:n_sem_users] = np.isfinite(mat).all(axis=1) if n_sem_users else False
    for lo in range(0, n_users, step):
        hi = min(lo + step, n_users)
        b = hi - lo
        e_lo, e_hi = np.searchsorted(ex_u, [lo, hi])
        eu, ekey = ex_u[e_lo:e_hi] - lo, ex_key[e_lo:e_hi]

        sem_hi = min(hi, n_sem_users)
        scores = np.full((b, n_items), -np.inf, dtype=np.float32)  # (b, n_items) cosines
        if sem_hi > lo and n_items:
            scores[: sem_hi - lo] = mat[lo:sem_hi] @ vectors.matrix.T
            scores[~has_profile[lo:hi]] = -np.inf
        pop_scores = np.full((b, pop.len()), np.nan, dtype=np.float32)  # (b, P)
        if n_items:
            pop_scores[:, pop_found] = scores[:, pop_row[pop_found]]
            pop_scores[np.isneginf(pop_scores)] = np.nan
        scores[:, ~item_ok] = -np.inf
        in_matrix = ekey < n_items
        scores[eu[in_matrix], ekey[in_matrix]] = -np.inf

        k = min(k_semantic, n_items)
        if k:
            top = np.argpartition(scores, n_items - k, axis=1)[:, n_items - k :]  # (b, k) unordered
            top_s = np.take_along_axis(scores, top, axis=1)
            ok = np.isfinite(top_s)
            uu = np.broadcast_to(np.arange(lo, hi)[:, None], top.shape)
            sem_parts.append((uu[ok], top[ok], top_s[ok]))

        n_pop = pop.len()
        if k_popular and n_pop:
            ranks_ex = rank_of_key[ekey]
            hit = ranks_ex >= 0
            allowed = np.ones((b, n_pop), dtype=bool)
            allowed[eu[hit], ranks_ex[hit]] = False
            take = allowed & (np.cumsum(allowed, axis=1) <= k_popular)
            uu, rr = np.nonzero(take)
            pop_parts.append((uu + lo, rr, pop_scores[uu, rr]))

    def cat(
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], i: int, dtype: type
    ) -> np.ndarray:
        return np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype)

    sem = pl.DataFrame(
        {
            "__u": cat(sem_parts, 0, np.int64).astype(np.int64),
            "__key": cat(sem_parts, 1, np.int64).astype(np.int64),
            "__sem": cat(sem_parts, 2, np.float32).astype(np.float32),
        }
    )
    pop_ranks = cat(pop_parts, 1, np.int64).astype(np.int64)
    pops = pl.DataFrame(
        {
            "__u": cat(pop_parts, 0, np.int64).astype(np.int64),
            "__key": pop_key[pop_ranks],
            "__rank": pop_ranks,
            "__pop_sem": cat(pop_parts, 2, np.float32).astype(np.float32),
        }
    )
    merged = (
        sem.join(pops, on=["__u", "__key"], how="full", coalesce=True)
        .with_columns(
            pl.when(pl.col("__sem").is_null())
            .then(pl.lit("popular"))
            .when(pl.col("__rank").is_null())
            .then(pl.lit("semantic"))
            .otherwise(pl.lit("both"))
            .alias("source"),
            pl.coalesce("__sem", "__pop_sem").fill_null(float("nan")).alias("sem_score"),
        )
        .with_columns(
            (pl.col("source") == "popular").alias("__pop_only"),
            pl.when(pl.col("source") == "popular")
            .then(pl.col("__rank").cast(pl.Float64))
            .otherwise(-pl.col("sem_score").cast(pl.Float64))
            .alias("__order"),
        )
        .sort(["__u", "__pop_only", "__order", "__key"])
    )
    return merged.select(
        pl.Series("user_id", all_users, dtype=pl.String).gather(merged["__u"]),
        key_ids.gather(merged["__key"]).alias("item_id"),
        pl.col("source"),
        pl.col("sem_score").cast(pl.Float32),
    )


def candidate_recall(candidates: pl.DataFrame, truth: pl.DataFrame, k: int | None = None) -> float:
    """Fraction of the (user_id, item_id) pairs in `truth` found among `candidates`.

    Micro-averaged over distinct truth pairs; truth users without candidates count as misses.
    With `k`, only each user's first k candidate rows (in frame order, i.e. best first for
    `retrieve_candidates` output) count. NaN if `truth` is empty.
    """
    if k is not None and k < 1:
        raise ConfigError(f"candidate_recall: k must be >= 1 or None, got {k}")
    for name, df in (("candidates", candidates), ("truth", truth)):
        missing = [c for c in ("user_id", "item_id") if c not in df.columns]
        if missing:
            raise DataError(f"candidate_recall: {name} is missing column(s) {missing}")
    cand = candidates.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    if k is not None:
        cand = cand.filter(pl.int_range(pl.len()).over("user_id") < k)
    pairs = truth.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)
    ).unique()
    if pairs.height == 0:
        return float("nan")
    hits = pairs.join(cand.unique(), on=["user_id", "item_id"], how="semi").height
    return hits / pairs.height
