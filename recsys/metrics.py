"""Ranking metrics: MIND-style per-impression AUC, MRR and nDCG, and top-k metrics per user.

Impression metrics (`impression_metrics`) follow the MIND benchmark definitions, computed per
impression and then averaged over impressions:

- AUC: probability that a clicked item scores above a non-clicked one of the same impression;
- MRR: mean over the clicked items of 1 / rank (rank 1 = highest score);
- nDCG@k: sum over clicked items in the top k of 1 / log2(rank + 1), divided by the same sum for
  the ideal order (all clicks first). Gains are binary (2**clicked - 1).

Ties are resolved by their expectation under a uniformly random order of the tied items, so the
result never depends on row order: AUC uses average ranks (a tied click / non-click pair counts
1/2); a clicked item in a block of tied scores over ranks a..b gets the mean of 1/r (MRR) and of
the discount (nDCG) over r = a..b.

Impressions without both a click and a non-click are skipped for every metric (AUC is undefined
there and nDCG/MRR say nothing about ranking); the count is returned as `n_skipped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError

__all__ = [
    "evaluation_table",
    "impression_metrics",
    "paired_difference",
    "per_impression_metrics",
    "ranking_metrics_at_k",
]


def _cumulative_discount(n: int, k: int | None) -> np.ndarray:
    """D[r] = sum_{p=1..r} [p <= k] / log2(p + 1) for r = 0..n (k None: no cutoff)."""
    p = np.arange(1, n + 1, dtype=np.float64)
    disc = 1.0 / np.log2(p + 1.0)
    if k is not None:
        disc[p > k] = 0.0
    return np.concatenate([[0.0], np.cumsum(disc)])


def _check_columns(df: pl.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; got {df.columns}")


def impression_metrics(
    df: pl.DataFrame,
    score_col: str = "score",
    group_col: str = "impression_id",
    label_col: str = "clicked",
    *,
    ks: Sequence[int] = (5, 10),
) -> dict[str, float]:
    """AUC, MRR and nDCG@k per impression, averaged over impressions (see the module docstring).

    df: one row per shown item: `group_col` (impression id), `label_col` (bool or 0/1 click),
        `score_col` (float; higher = ranked higher; null or NaN is an error).
    Returns {"auc", "mrr", "ndcg@5", "ndcg@10" (one per k in ks), "n_impressions" (impressions
    scored), "n_skipped" (impressions without both a click and a non-click)}; the metrics are NaN
    when no impression qualifies.
    """
    per, n_groups = per_impression_metrics(df, score_col, group_col, label_col, ks=ks)
    out: dict[str, float] = {}
    for name in ("auc", "mrr", *(f"ndcg@{k}" for k in ks)):
        out[name] = float(per[name].mean()) if per.height else float("nan")  # type: ignore[arg-type]
    out["n_impressions"] = float(per.height)
    out["n_skipped"] = float(n_groups - per.height)
    return out


def per_impression_metrics(
    df: pl.DataFrame,
    score_col: str = "score",
    group_col: str = "impression_id",
    label_col: str = "clicked",
    *,
    ks: Sequence[int] = (5, 10),
) -> tuple[pl.DataFrame, int]:
    """(one row per scored impression: `group_col`, auc, mrr, ndcg@k..., sorted by the group;
    the number of impressions in df). Same definitions and skips as `impression_metrics`."""
    _check_columns(df, (group_col, label_col, score_col), "impression_metrics")
    if any(k < 1 for k in ks):
        raise ConfigError(f"impression_metrics: every k in ks must be >= 1, got {list(ks)}")
    d = df.select(
        pl.col(group_col).alias("g"),
        (pl.col(label_col).cast(pl.Float64) > 0).cast(pl.Float64).alias("y"),
        pl.col(score_col).cast(pl.Float64).alias("s"),
    )
    bad = d.select((pl.col("s").is_null() | pl.col("s").is_nan()).sum()).item()
    if bad:
        raise DataError(
            f"impression_metrics: {bad} null/NaN values in score column {score_col!r}; fill them "
            "(e.g. with the lowest score) before evaluating"
        )
    if d["y"].null_count():
        raise DataError(f"impression_metrics: null labels in {label_col!r}; drop those rows")
    d = d.with_columns(pl.len().over("g").alias("n"), pl.col("y").sum().over("g").alias("n_pos"))
    n_groups = d["g"].n_unique()
    d = d.filter((pl.col("n_pos") > 0) & (pl.col("n_pos") < pl.col("n")))
    d = d.with_columns(
        pl.col("s").rank("min", descending=True).over("g").alias("r_lo"),
        pl.col("s").rank("max", descending=True).over("g").alias("r_hi"),
        pl.col("s").rank("average").over("g").alias("r_auc"),
    )
    n_max = int(d["n"].max()) if d.height else 0  # type: ignore[arg-type]
    lo = d["r_lo"].to_numpy().astype(np.int64)
    hi = d["r_hi"].to_numpy().astype(np.int64)
    width = (hi - lo + 1).astype(np.float64)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_max + 1))])
    cols = {"rr": (harmonic[hi] - harmonic[lo - 1]) / width}
    for k in ks:
        disc = _cumulative_discount(n_max, k)
        cols[f"disc{k}"] = (disc[hi] - disc[lo - 1]) / width
    d = d.with_columns(pl.Series(name, v) for name, v in cols.items())

    y = pl.col("y")
    per = (
        d.group_by("g")
        .agg(
            pl.col("n").first(),
            pl.col("n_pos").first(),
            (y * pl.col("r_auc")).sum().alias("rank_sum"),
            (y * pl.col("rr")).sum().alias("rr_sum"),
            *[(y * pl.col(f"disc{k}")).sum().alias(f"dcg{k}") for k in ks],
        )
        .sort("g")
    )
    n_pos = per["n_pos"].to_numpy()
    n_neg = per["n"].to_numpy() - n_pos
    out = {"auc": (per["rank_sum"].to_numpy() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)}
    out["mrr"] = per["rr_sum"].to_numpy() / n_pos
    for k in ks:
        ideal = _cumulative_discount(n_max, k)[n_pos.astype(np.int64)]
        out[f"ndcg@{k}"] = per[f"dcg{k}"].to_numpy() / ideal
    table = per.select(pl.col("g").alias(group_col)).with_columns(
        pl.Series(name, v, dtype=pl.Float64) for name, v in out.items()
    )
    return table, n_groups


def paired_difference(
    scores: pl.DataFrame,
    model: str,
    reference: str,
    metric: str = "auc",
    *,
    group_col: str = "impression_id",
    label_col: str = "clicked",
) -> tuple[float, float]:
    """(mean over impressions of model's metric minus reference's, its standard error).

    Both are scored on the same impressions, so the impression-to-impression variance that
    both share cancels: the standard error is std(differences) / sqrt(n)."""
    a, _ = per_impression_metrics(scores, model, group_col, label_col)
    b, _ = per_impression_metrics(scores, reference, group_col, label_col)
    out = _paired(a, b, metric)
    return out["auc_diff"], out["auc_diff_se"]


def evaluation_table(
    scores: pl.DataFrame,
    models: Sequence[str],
    *,
    group_col: str = "impression_id",
    label_col: str = "clicked",
    ks: Sequence[int] = (5, 10),
    versus: str | Sequence[str] | None = None,
) -> pl.DataFrame:
    """One row per model: model, auc, mrr, ndcg@k..., n_impressions.

    scores: impression_id, clicked and one score column per name in `models` (user_id, item_id
    and other columns are ignored). Rows keep the order of `models`. versus: a model of
    `models`, or several (the one with the highest AUC is taken), each row is compared with on
    the same impressions: adds versus (its name), auc_diff (mean paired difference of
    per-impression AUC) and auc_diff_se (its standard error).
    """
    _check_columns(scores, [*models], "evaluation_table")
    refs = [versus] if isinstance(versus, str) else list(versus or [])
    unknown = [r for r in refs if r not in models]
    if unknown:
        raise ConfigError(f"evaluation_table: versus {unknown} not among {list(models)}")
    per = {m: per_impression_metrics(scores, m, group_col, label_col, ks=ks)[0] for m in models}
    names = ["auc", "mrr", *(f"ndcg@{k}" for k in ks)]
    rows = []
    for m in models:
        p = per[m]
        row: dict[str, Any] = {"model": m}
        row |= {n: float(p[n].mean()) if p.height else float("nan") for n in names}  # type: ignore[arg-type]
        row["n_impressions"] = p.height
        rows.append(row)
    schema = {"model": pl.String} | {n: pl.Float64 for n in names} | {"n_impressions": pl.Int64}
    if refs:
        ref = max(refs, key=lambda r: next(x["auc"] for x in rows if x["model"] == r))
        for row in rows:
            row |= {"versus": ref} | _paired(per[row["model"]], per[ref], "auc")
        schema |= {"versus": pl.String, "auc_diff": pl.Float64, "auc_diff_se": pl.Float64}
    order = ["model", "auc", "mrr", *names[2:], "n_impressions", *list(schema)[len(names) + 2 :]]
    return pl.DataFrame(rows, schema=schema, orient="row").select(order)


def _paired(a: pl.DataFrame, b: pl.DataFrame, metric: str) -> dict[str, float]:
    """auc_diff, auc_diff_se of per-impression tables a - b (same impressions, same order)."""
    diff = (a[metric] - b[metric]).to_numpy()
    if diff.size == 0:
        return {"auc_diff": float("nan"), "auc_diff_se": float("nan")}
    se = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return {"auc_diff": float(np.mean(diff)), "auc_diff_se": se}


def ranking_metrics_at_k(
    ranked: pl.DataFrame, relevant: pl.DataFrame, ks: Sequence[int] = (10, 50)
) -> dict[str, float]:
    """nDCG@k and recall@k of top-k lists against held-out relevant items (MovieLens protocol).

    ranked: user_id, item_id, rank (smaller = better; only the order within a user matters,
        ties broken by item_id).
    relevant: user_id, item_id (held-out positives).
    Per user, with R = number of relevant items and hits at positions p (1-based):
      nDCG@k   = sum_{hits, p <= k} 1/log2(p + 1) / sum_{p=1..min(k, R)} 1/log2(p + 1)
      recall@k = hits in the top k / min(k, R)      (normalised so a perfect list scores 1)
    averaged over the users in `relevant` (a user without a ranked list scores 0).
    Returns {"ndcg@k", "recall@k" for each k, "n_users"}; NaN metrics if `relevant` is empty.
    """
    _check_columns(ranked, ("user_id", "item_id", "rank"), "ranking_metrics_at_k: ranked")
    _check_columns(relevant, ("user_id", "item_id"), "ranking_metrics_at_k: relevant")
    if any(k < 1 for k in ks):
        raise ConfigError(f"ranking_metrics_at_k: every k in ks must be >= 1, got {list(ks)}")
    rel = relevant.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)
    ).unique()
    n_rel = rel.group_by("user_id").agg(pl.len().alias("n_rel"))
    lists = (
        ranked.select(
            pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("rank")
        )
        .unique(subset=["user_id", "item_id"], keep="first")
        .sort("user_id", "rank", "item_id")
        .with_columns(pl.int_range(1, pl.len() + 1).over("user_id").alias("pos"))
    )
    hits = lists.join(rel, on=["user_id", "item_id"], how="inner")
    k_max = max(ks)
    disc = _cumulative_discount(k_max, None)
    out: dict[str, float] = {}
    for k in ks:
        per = n_rel.join(
            hits.filter(pl.col("pos") <= k)
            .group_by("user_id")
            .agg(
                pl.len().alias("hits"),
                (1.0 / (pl.col("pos").cast(pl.Float64) + 1.0).log(2)).sum().alias("dcg"),
            ),
            on="user_id",
            how="left",
        ).fill_null(0)
        cap = np.minimum(per["n_rel"].to_numpy(), k)
        if per.height:
            out[f"ndcg@{k}"] = float(np.mean(per["dcg"].to_numpy() / disc[cap]))
            out[f"recall@{k}"] = float(np.mean(per["hits"].to_numpy() / cap))
        else:
            out[f"ndcg@{k}"] = out[f"recall@{k}"] = float("nan")
    out["n_users"] = float(n_rel.height)
    return out
