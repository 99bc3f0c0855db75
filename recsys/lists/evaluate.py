"""Judging ranked lists: lists made at a cut-off against what users consumed next, beside
baseline lists, and the popularity weight chosen at the validation cut-off."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from features import build_snapshot
from recsys.bundle import Bundle
from recsys.candidates import candidate_recall
from recsys.data import Dataset
from recsys.featurize import FeatureSpec
from recsys.listmetrics import compare_lists, intra_list_similarity, list_metrics, recall_ceiling
from recsys.ranker import Ranker
from recsys.retrieval import CooccurrenceSource, RetrievalContext, decayed_popularity
from recsys.vectors import ItemVectors

from .build import (
    PRIOR_WEIGHTS,
    ListSettings,
    ListsResult,
    ScoreCache,
    build_lists,
    consumption,
    known_users,
    list_context,
    list_horizon,
    with_prior,
)

__all__ = [
    "LIST_BASELINES",
    "baseline_lists",
    "evaluate_lists",
    "fit_prior_weight",
    "list_evaluation",
    "truth_after",
]

# The baseline lists every model's lists are compared with.
LIST_BASELINES = ("popular", "recent_popular", "item_knn")


def _as_list(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns((pl.int_range(pl.len()).over("user_id") + 1).alias("rank"))


def baseline_lists(ctx: RetrievalContext, users: pl.Series, n: int) -> dict[str, pl.DataFrame]:
    """Top-n baselines, minus what each user consumed, among live items: `popular` (all-time
    counts), `recent_popular` (the fitted decay), `item_knn` (co-occurrence; popular fills the
    lists of users it has nothing for)."""
    counts = decayed_popularity(ctx.history, ctx.as_of, math.inf).join(
        ctx.eligible_items, on="item_id", how="semi"
    )
    popular = _as_list(ctx.from_list(users, counts, n))
    recent = _as_list(ctx.from_list(users, ctx.popularity, n))
    knn = CooccurrenceSource().retrieve(ctx, users, n)
    fill = recent.join(
        knn.select("user_id").unique(), on="user_id", how="anti", maintain_order="left"
    ).drop("rank")
    knn = _as_list(pl.concat([knn, fill]).sort("user_id", maintain_order=True))
    return {"popular": popular, "recent_popular": recent, "item_knn": knn}


def truth_after(data: Dataset, at: datetime, horizon_days: float) -> pl.DataFrame:
    """(user_id, item_id) consumed in [at, at + horizon) and not before `at`."""
    cons = consumption(data)
    after = cons.filter(pl.col("ts") >= at)
    if not math.isinf(horizon_days):
        after = after.filter(pl.col("ts") < at + timedelta(days=horizon_days))
    before = cons.filter(pl.col("ts").is_null() | (pl.col("ts") < at)).select("user_id", "item_id")
    return (
        after.select("user_id", "item_id")
        .unique()
        .join(before, on=["user_id", "item_id"], how="anti")
        .sort("user_id", "item_id")
    )


def evaluate_lists(
    result: ListsResult,
    baselines: Mapping[str, pl.DataFrame],
    truth: pl.DataFrame,
    ctx: RetrievalContext,
    *,
    n: int,
    horizon_days: float,
    known: pl.Series | None = None,
) -> dict[str, Any]:
    """The list table (the model's lists and each baseline: recall@n, nDCG@n, coverage,
    novelty, intra-list similarity, paired differences to the best baseline) and the per-source
    retrieval table (recall of each source's own candidates, latency per user). With `known`
    (the users the bundle knows) and some truth users outside it, `table_known` repeats the
    list table over the known users only: where personalisation can act."""
    everyone = ctx.seen["user_id"].n_unique()
    users_of_item = ctx.seen.group_by("item_id").len("users")
    named = {"lgbm_lists": result.lists, **baselines}
    by_recall = {
        name: truth.join(
            df.filter(pl.col("rank") <= n), on=["user_id", "item_id"], how="semi"
        ).height
        for name, df in baselines.items()
    }
    versus = max(by_recall, key=lambda k: (by_recall[k], k)) if by_recall else "lgbm_lists"
    table = compare_lists(
        named, truth, n, versus=versus, catalogue_size=ctx.items.height,
        popularity=users_of_item, n_users=everyone,
    )  # fmt: skip
    if ctx.vectors is not None and len(ctx.vectors):
        for row in table:
            row["intra_list_sim"] = intra_list_similarity(named[str(row["list"])], ctx.vectors, n)

    table_known: list[dict[str, Any]] = []
    if known is not None:
        mine = truth.filter(pl.col("user_id").is_in(known.cast(pl.String).unique().implode()))
        if 0 < mine.height < truth.height:
            table_known = compare_lists(
                named, mine, n, versus=versus, catalogue_size=ctx.items.height,
                popularity=users_of_item, n_users=everyone,
            )  # fmt: skip

    sources = [
        {
            "source": r.name,
            "k": r.quota,
            "recall": candidate_recall(r.candidates, truth),
            "ms_per_user": 1000 * r.seconds / max(result.users, 1),
        }
        for r in result.runs
    ]
    sources.append(
        {
            "source": "union",
            "k": int(sum(r.quota for r in result.runs)),
            "recall": candidate_recall(result.candidates, truth),
            "ms_per_user": 1000 * result.seconds["retrieve"] / max(result.users, 1),
        }
    )
    who = ctx.seen["user_id"] if known is None else known
    ceiling = recall_ceiling(truth, who, n) if truth.height else None
    horizon = "the whole test split" if math.isinf(horizon_days) else f"the next {horizon_days:g} d"
    return {
        "table": table,
        "table_known": table_known,
        "sources": sources,
        "versus": versus,
        "truth_pairs": truth.height,
        "truth_users": truth["user_id"].n_unique(),
        "short_lists": result.short,
        "ceiling": ceiling,
        "note": (
            f"lists as of the cut-off, judged on what users consumed in {horizon} "
            f"({truth.height} new (user, item) pairs of {truth['user_id'].n_unique()} users); "
            f"{ctx.cadence.describe()}; "
            f"{'every item live' if ctx.eligible is None else f'{ctx.eligible.len()} live items'}"
            + (
                f"; no lists made at the cut-off can exceed recall@{n} {ceiling['recall']:.4f} "
                f"({ceiling['cold_share']:.0%} of the pairs are of users with no history before "
                "it, who can only get one list for all)"
                if ceiling is not None
                else ""
            )
        ),
    }


def list_evaluation(
    data: Dataset,
    test_at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    settings: ListSettings,
    vectors: ItemVectors,
    log: Callable[[str], None],
    *,
    prior_weight: float = 0.0,
    block: int = 10_000,
) -> dict[str, Any]:
    """The lists a nightly would have written at `test_at` (a bundle of the data before it,
    the same `build_lists`, blended with popularity by `prior_weight`), judged on what users
    consumed next, beside baseline lists. `data` holds logged impressions only (none
    sampled). `block`: users per block of `build_lists` (memory, never the lists)."""
    at = _lists_at(data, test_at, ranker, spec, settings, vectors)
    if at is None:
        return {"table": [], "sources": [], "note": "no new consumption after the cut-off"}
    ctx, bundle, truth, horizon, users, known = at
    n = settings.top_n
    score = with_prior(bundle.score, ctx.popularity, prior_weight)
    # the candidates kept are those users consumed next: their recall is all that is read
    res = build_lists(score, ctx, users, settings.quotas, n=n, rules=settings.rules, known=known,
                      block=block, keep_candidates=truth)  # fmt: skip
    out = evaluate_lists(
        res, baseline_lists(ctx, users, n), truth, ctx, n=n, horizon_days=horizon, known=known
    )
    out["prior_weight"] = prior_weight
    log(f"[evaluate] lists: {out['note']}")
    return out


def _lists_at(
    data: Dataset,
    at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    settings: ListSettings,
    vectors: ItemVectors,
) -> tuple[RetrievalContext, Bundle, pl.DataFrame, float, pl.Series, pl.Series] | None:
    """What judging lists made at `at` needs: (retrieval context, a bundle of the data before
    it, the truth after it, its horizon in days, the truth users, the known users); None when
    nobody consumed anything new after `at`."""
    before = data.before(at)
    ctx = list_context(before, at, settings, vectors)
    horizon = list_horizon(ctx.cadence, settings.horizon_days)
    truth = truth_after(data, at, horizon)
    if truth.height == 0:
        return None
    bundle = Bundle(
        Path("."), {"model_version": "evaluation"}, spec, ranker,
        build_snapshot(before, at, settings.features), vectors,
        before.interactions.select("user_id", "item_id", "ts"), ctx.popularity,
    )  # fmt: skip
    return ctx, bundle, truth, horizon, truth["user_id"].unique().sort(), known_users(before)


def fit_prior_weight(
    data: Dataset,
    valid_at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    settings: ListSettings,
    vectors: ItemVectors,
    *,
    block: int = 10_000,
) -> tuple[float, dict[str, float]]:
    """The lists' popularity weight: `settings.prior_weight` if set, else the one of
    PRIOR_WEIGHTS whose lists made at the validation cut-off (with `ranker`, which trained on
    rows before it) find the most of what users consumed next (ties: the smaller weight).
    Returns (weight, {weight: recall@top_n} of those tried). `block`: as `list_evaluation`."""
    if settings.prior_weight is not None:
        return settings.prior_weight, {}
    at = _lists_at(data, valid_at, ranker, spec, settings, vectors)
    if at is None:
        return 0.0, {}
    ctx, bundle, truth, _, users, known = at
    n = settings.top_n
    lists: dict[float, list[pl.DataFrame]] = {w: [] for w in PRIOR_WEIGHTS}
    for lo in range(0, users.len(), block):  # users in blocks: memory holds one block's pairs
        some = users[lo : lo + block]
        cached = ScoreCache(bundle.score)  # the candidates repeat: each pair is scored once
        for w in PRIOR_WEIGHTS:
            res = build_lists(with_prior(cached, ctx.popularity, w), ctx, some, settings.quotas,
                              n=n, rules=settings.rules, known=known, block=block)  # fmt: skip
            lists[w].append(res.lists)
    recall = {
        f"{w:g}": list_metrics(pl.concat(lists[w]), truth, n, catalogue_size=ctx.items.height)[
            f"recall@{n}"
        ]
        for w in PRIOR_WEIGHTS
    }
    best = max(PRIOR_WEIGHTS, key=lambda w: (recall[f"{w:g}"], -w))
    return best, recall
