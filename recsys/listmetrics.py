"""Quality of ranked lists against held-out positives: recall@K, nDCG@K, coverage, novelty.

A list is user_id, item_id, rank (1 = best). Truth is the (user_id, item_id) pairs the users
consumed in the test window. Every truth user counts: a user without a list scores 0. Recall is
micro-averaged (the share of all test positives found, so heavy users weigh more, as in
`candidate_recall`); nDCG@K is averaged over users. Paired differences between two lists are
taken over the same users, with standard errors (the ratio-estimator linearisation for recall).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError
from recsys.vectors import ItemVectors

__all__ = ["compare_lists", "intra_list_similarity", "list_metrics", "per_user", "recall_ceiling"]


def _check(df: pl.DataFrame, name: str, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"list metrics: {name} is missing column(s) {missing}")


def per_user(lists: pl.DataFrame, truth: pl.DataFrame, k: int) -> pl.DataFrame:
    """user_id, n (test positives), hits (in the top k), ndcg (binary gains), one row per truth
    user, sorted by user_id."""
    if k < 1:
        raise ConfigError(f"list metrics: k must be >= 1, got {k}")
    _check(lists, "lists", ("user_id", "item_id", "rank"))
    _check(truth, "truth", ("user_id", "item_id"))
    t = truth.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique()
    top = lists.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("rank")
    ).filter(pl.col("rank") <= k)
    hits = (
        top.join(t, on=["user_id", "item_id"], how="semi")
        .group_by("user_id")
        .agg(pl.len().alias("hits"), (1.0 / (pl.col("rank") + 1).log(2)).sum().alias("dcg"))
    )
    ideal = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    out = (
        t.group_by("user_id")
        .len("n")
        .join(hits, on="user_id", how="left")
        .with_columns(pl.col("hits").fill_null(0), pl.col("dcg").fill_null(0.0))
        .sort("user_id")
    )
    idcg = ideal[np.minimum(out["n"].to_numpy(), k) - 1]
    return out.with_columns(pl.Series("ndcg", out["dcg"].to_numpy() / idcg)).drop("dcg")


def list_metrics(
    lists: pl.DataFrame,
    truth: pl.DataFrame,
    k: int,
    *,
    catalogue_size: int,
    popularity: pl.DataFrame | None = None,
    n_users: int | None = None,
) -> dict[str, float]:
    """recall@k, ndcg@k, coverage (distinct items in the top k of all lists / catalogue size),
    novelty (mean self-information -log2 p(item) of the listed items, p = share of `n_users`
    who consumed it before; `popularity` item_id, users), users (truth users)."""
    pu = per_user(lists, truth, k)
    top = lists.filter(pl.col("rank") <= k)
    out = {
        f"recall@{k}": float(pu["hits"].to_numpy().sum() / max(int(pu["n"].to_numpy().sum()), 1)),
        f"ndcg@{k}": float(pu["ndcg"].to_numpy().mean()) if pu.height else math.nan,
        "coverage": top["item_id"].n_unique() / max(catalogue_size, 1),
        "users": float(pu.height),
    }
    if popularity is not None and n_users:
        p = top.select(pl.col("item_id").cast(pl.String)).join(
            popularity.select(pl.col("item_id").cast(pl.String), "users"), on="item_id", how="left"
        )
        share = (p["users"].fill_null(0).cast(pl.Float64) + 1.0) / (n_users + 1.0)
        out["novelty"] = float(-np.log2(share.to_numpy()).mean()) if p.height else math.nan
    return out


def _paired(a: pl.DataFrame, b: pl.DataFrame) -> tuple[float, float, float, float]:
    """(recall diff, se, ndcg diff, se) of lists a minus b over the same truth users."""
    j = a.join(b, on="user_id", suffix="_b")
    n = j["n"].to_numpy().astype(float)
    d = j["hits"].to_numpy().astype(float) - j["hits_b"].to_numpy().astype(float)
    users = n.size
    if users < 2:
        return math.nan, math.nan, math.nan, math.nan
    diff = d.sum() / n.sum()
    se = math.sqrt(users / (users - 1) * np.sum((d - diff * n) ** 2)) / n.sum()
    dn = (j["ndcg"] - j["ndcg_b"]).to_numpy()
    return float(diff), float(se), float(dn.mean()), float(dn.std(ddof=1) / math.sqrt(users))


def compare_lists(
    lists: Mapping[str, pl.DataFrame],
    truth: pl.DataFrame,
    k: int,
    *,
    versus: str,
    catalogue_size: int,
    popularity: pl.DataFrame | None = None,
    n_users: int | None = None,
) -> list[dict[str, float | str]]:
    """One row per named list: its `list_metrics`, plus recall and nDCG minus those of the
    `versus` list, paired over truth users, with standard errors."""
    if versus not in lists:
        raise ConfigError(f"compare_lists: versus {versus!r} is not among {sorted(lists)}")
    base = per_user(lists[versus], truth, k)
    rows: list[dict[str, float | str]] = []
    for name, frame in lists.items():
        m = list_metrics(
            frame, truth, k, catalogue_size=catalogue_size, popularity=popularity, n_users=n_users
        )
        dr, dr_se, dn, dn_se = _paired(per_user(frame, truth, k), base)
        rows.append(
            {
                "list": name,
                **m,
                "recall_diff": dr,
                "recall_diff_se": dr_se,
                "ndcg_diff": dn,
                "ndcg_diff_se": dn_se,
                "versus": versus,
            }
        )
    return rows


def recall_ceiling(truth: pl.DataFrame, known: pl.Series, k: int) -> dict[str, float]:
    """The most recall@k that any top-k lists made at the cut-off can reach.

    A user `known` at the cut-off could at best get k of their own test positives; the others
    have nothing before it to tell them apart, so the best any list can do for them is one list
    for all: the k items most of them went on to consume (an oracle that sees the test split).
    Returns recall (that bound), cold_share (share of the truth pairs of users not known) and
    k. Where most positives are cold, no personalisation can lift lists far above popular."""
    if k < 1:
        raise ConfigError(f"recall ceiling: k must be >= 1, got {k}")
    _check(truth, "truth", ("user_id", "item_id"))
    t = truth.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)).unique()
    is_known = pl.col("user_id").is_in(known.cast(pl.String).unique().implode())
    warm, cold = t.filter(is_known), t.filter(~is_known)
    warm_hits = int(warm.group_by("user_id").len()["len"].clip(upper_bound=k).sum())
    cold_hits = int(
        cold.group_by("item_id").len().sort(["len", "item_id"], descending=[True, False])
        .head(k)["len"].sum()
    )  # fmt: skip
    total = max(t.height, 1)
    return {
        "recall": (warm_hits + cold_hits) / total,
        "cold_share": cold.height / total,
        "k": float(k),
    }


def intra_list_similarity(lists: pl.DataFrame, vectors: ItemVectors, k: int) -> float:
    """Mean pairwise cosine of the items within each user's top k (items without a vector are
    skipped), averaged over users with at least two such items; NaN if none."""
    top = lists.filter(pl.col("rank") <= k).sort(["user_id", "rank"])
    rows, found = vectors.lookup(top["item_id"])
    top = top.with_columns(pl.Series("__row", rows)).filter(pl.Series(found))
    sims = []
    for _, g in top.group_by("user_id", maintain_order=True):
        v = vectors.matrix[g["__row"].to_numpy()].astype(np.float32)
        m = v.shape[0]
        if m < 2:
            continue
        s = v @ v.T
        sims.append((s.sum() - np.trace(s)) / (m * (m - 1)))
    return float(np.mean(sims)) if sims else math.nan
