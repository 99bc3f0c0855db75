"""Ranked lists: retrieval from several sources, ranking through a bundle, business rules; and
their evaluation against what users consumed next, beside baseline lists.

The nightly job and `recsys evaluate` both build lists with `build_lists`, the same code, so the
list metrics measure what the nightly writes. For a fast catalogue (news: a live window of a week
or less) lists as of the cut-off are judged on the next day's consumption; for a slow one, on
the whole test split (`list_horizon`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from recsys.candidates import candidate_recall
from recsys.data import Dataset
from recsys.errors import ConfigError
from recsys.listmetrics import compare_lists, intra_list_similarity, recall_ceiling
from recsys.retrieval import (
    ANN_MIN_ITEMS,
    Cadence,
    CooccurrenceSource,
    RetrievalContext,
    SourceRun,
    decayed_popularity,
    fit_cadence,
    live_items,
    retrieve,
)
from recsys.rules import ListRules, apply_rules
from recsys.vectors import ItemVectors

__all__ = [
    "PRIOR_WEIGHTS",
    "ListsResult",
    "ScoreCache",
    "baseline_lists",
    "build_lists",
    "consumption",
    "evaluate_lists",
    "list_horizon",
    "retrieval_context",
    "with_prior",
]

BASELINES = ("popular", "recent_popular", "item_knn")
# The popularity weights a nightly tries at the validation cut-off (`with_prior`): a ranker
# trained on logged impressions learns which shown item a user picks, not how much more the
# whole catalogue's popular items draw, which lists over every live item need. EB-NeRD's
# next-day recall@20 at the validation cut-off: 0.0275 (w 0), 0.0412 (0.5), 0.0518 (0.75),
# 0.0538 (0.9), 0.0520 (1, the recent-popular list).
PRIOR_WEIGHTS = (0.0, 0.5, 0.75, 0.9, 1.0)
CANDIDATE_FRAME = pl.DataFrame(
    schema={"user_id": pl.String, "item_id": pl.String, "source": pl.String,
            "retrieval_rank": pl.Int64}
)  # fmt: skip


Score = Callable[[pl.DataFrame], np.ndarray]


class ScoreCache:
    """`score` remembered per (user_id, item_id): lists built again over the same candidates
    (e.g. one per prior weight) score each pair once."""

    def __init__(self, score: Score) -> None:
        self.score = score
        self._seen = pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String,
                                          "__s": pl.Float64})  # fmt: skip

    def __call__(self, frame: pl.DataFrame) -> np.ndarray:
        keys = frame.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
        new = keys.join(self._seen, on=["user_id", "item_id"], how="anti").unique(
            maintain_order=True
        )
        if new.height:
            s = np.asarray(self.score(new), dtype=np.float64)
            self._seen = pl.concat([self._seen, new.with_columns(pl.Series("__s", s))])
        got = keys.join(self._seen, on=["user_id", "item_id"], how="left", maintain_order="left")
        return got["__s"].to_numpy()


def with_prior(score: Score, prior: pl.DataFrame, weight: float) -> Score:
    """`score` blended with a popularity prior (item_id, score), rank-wise within each user's
    candidates: (1 - weight) x the score's percentile + weight x the prior's (items without
    a prior count as least popular). 0 = `score` itself; 1 = the prior's order alone (the
    ranker is not called). Each call must hold whole users' candidate sets, as `build_lists`
    passes them."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"prior weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return score
    pri = prior.select(pl.col("item_id").cast(pl.String), pl.col("score").alias("__p"))

    def blended(frame: pl.DataFrame) -> np.ndarray:
        s = score(frame) if weight < 1.0 else np.zeros(frame.height)
        f = (
            frame.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
            .with_columns(pl.Series("__s", np.asarray(s, dtype=np.float64)))
            .join(pri, on="item_id", how="left", maintain_order="left")
            .with_columns(pl.col("__p").fill_null(0.0))
        )
        n = pl.len().over("user_id").cast(pl.Float64)
        pct = {c: pl.col(c).rank("average").over("user_id") / n for c in ("__s", "__p")}
        return f.select((1.0 - weight) * pct["__s"] + weight * pct["__p"]).to_series().to_numpy()

    return blended


def consumption(data: Dataset) -> pl.DataFrame:
    """user_id, item_id, ts: positive interactions plus clicked impressions, a click that is
    also an interaction at the same time (as `recsys import --format events` writes it) once."""
    clicks = data.impressions.filter(pl.col("clicked")).select("user_id", "item_id", "ts")
    both = pl.concat([data.interactions.select("user_id", "item_id", "ts"), clicks])
    return both.unique(maintain_order=True)


def retrieval_context(
    data: Dataset,
    as_of: datetime,
    *,
    vectors: ItemVectors | None,
    max_history: int = 50,
    half_life_days: float | None = None,
    live_window_days: float | None = None,
    ann_min_items: int | None = None,
) -> RetrievalContext:
    """The retrieval context at `as_of` from the data before it: the cadence is fitted on the
    log (`fit_cadence`) unless given (half-life/window; live window 0 = every item live)."""
    hist = consumption(data).filter(pl.col("ts").is_null() | (pl.col("ts") < as_of))
    shows = data.impressions.filter(pl.col("ts") < as_of).select("item_id", "ts")
    fitted = (
        fit_cadence(hist, as_of, items=data.items, shows=shows)
        if half_life_days is None or live_window_days is None
        else Cadence(math.inf, math.inf)
    )
    hl = fitted.half_life_days if half_life_days is None else half_life_days
    win = fitted.live_window_days if live_window_days is None else live_window_days
    win = math.inf if win == 0 else win
    cadence = Cadence(hl or math.inf, win, fitted.holdout_start, fitted.recall)
    eligible = live_items(as_of, win, history=hist, items=data.items, shows=shows)
    return RetrievalContext(
        hist, data.items, as_of, eligible=eligible, vectors=vectors, cadence=cadence,
        max_history=max_history, shows=shows,
        ann_min_items=ANN_MIN_ITEMS if ann_min_items is None else ann_min_items,
    )  # fmt: skip


def list_horizon(cadence: Cadence, horizon_days: float | None) -> float:
    """Days of consumption after the cut-off that judge its lists: `horizon_days` if set, else
    1 for a fast catalogue (live window <= 7 days), else inf (the whole test split)."""
    if horizon_days is not None:
        return horizon_days
    return 1.0 if cadence.live_window_days <= 7 else math.inf


@dataclass(frozen=True)
class ListsResult:
    lists: pl.DataFrame  # user_id, rank, item_id, score, source
    runs: list[SourceRun]  # per retrieval source: its candidates and time
    candidates: pl.DataFrame  # user_id, item_id, source, retrieval_rank
    users: int
    short: int  # users whose list has fewer than n items
    seconds: dict[str, float]


def build_lists(
    score: Callable[[pl.DataFrame], np.ndarray],
    ctx: RetrievalContext,
    users: Sequence[str] | pl.Series,
    quotas: Mapping[str, int],
    *,
    n: int,
    rules: ListRules | None = None,
    known: pl.Series | None = None,
    chunk: int = 500,
    block: int = 10_000,
    keep_candidates: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> ListsResult:
    """Each user's top n: candidates from the sources (`quotas`), scored by `score` (a frame of
    user_id, item_id -> scores, e.g. `Bundle.score`), then `rules`. Users outside `known`
    (default: those who consumed anything) get the decayed popularity order instead of the
    ranker, as the API ranks a user it does not know. Users without any candidate have no
    list; short lists are counted, never padded."""
    u = pl.Series("user_id", users, dtype=pl.String).unique().sort()
    known_users = (ctx.seen["user_id"] if known is None else known.cast(pl.String)).unique()
    cats = ctx.items.select("item_id", "category") if "category" in ctx.items.columns else None
    secs = {"retrieve": 0.0, "score": 0.0, "rules": 0.0}
    out_lists, out_cands, out_runs = [], [], []
    # users in blocks, end to end, so memory holds one block's candidates at a time
    for lo in range(0, max(u.len(), 1), block):
        bu = u[lo : lo + block]
        t0 = time.perf_counter()
        cands, runs = retrieve(ctx, bu, quotas)
        t1 = time.perf_counter()
        is_known = pl.col("user_id").is_in(known_users.implode())
        cold = bu.filter(~bu.is_in(known_users.implode()))
        cold_lists = ctx.from_list(cold, ctx.popularity, max(4 * n, quotas.get("popular", 0)))
        cold_lists = cold_lists.with_columns(
            pl.lit("popular").alias("source"),
            pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("retrieval_rank"),
        )
        cands_known = cands.filter(is_known)
        cusers = cands_known["user_id"].unique().sort()
        parts = []
        for i in range(0, cusers.len(), chunk):
            sub = cands_known.filter(pl.col("user_id").is_in(cusers[i : i + chunk].implode()))
            parts.append(
                sub.with_columns(pl.Series("score", score(sub.select("user_id", "item_id"))))
            )
        scored = pl.concat(
            [*parts, cold_lists.select("user_id", "item_id", "source", "retrieval_rank", "score")],
            how="vertical_relaxed",
        )
        t2 = time.perf_counter()
        ranked = apply_rules(
            scored, n, rules or ListRules(), categories=cats, vectors=ctx.vectors,
            tiebreak="retrieval_rank",
        )  # fmt: skip
        out_lists.append(
            ranked.join(
                scored.select("user_id", "item_id", "source"),
                on=["user_id", "item_id"],
                how="left",
                maintain_order="left",
            ).select("user_id", "rank", "item_id", "score", "source")
        )
        if keep_candidates:
            out_cands.append(cands)
        else:  # keep the times only: the nightly needs no candidates after ranking
            runs = [SourceRun(r.name, r.quota, r.candidates.clear(), r.seconds) for r in runs]
        out_runs.append(runs)
        t3 = time.perf_counter()
        for key, dt in (("retrieve", t1 - t0), ("score", t2 - t1), ("rules", t3 - t2)):
            secs[key] += dt
        if progress is not None:
            progress(min(lo + block, u.len()), u.len())
    lists = pl.concat(out_lists)
    runs = [
        SourceRun(r.name, r.quota, pl.concat([b[j].candidates for b in out_runs]),
                  sum(b[j].seconds for b in out_runs))
        for j, r in enumerate(out_runs[0])
    ]  # fmt: skip
    cands = pl.concat(out_cands) if out_cands else CANDIDATE_FRAME.clear()
    counts = lists.group_by("user_id").len()
    short = int((counts["len"] < n).sum()) + (u.len() - counts.height)
    return ListsResult(lists, runs, cands, u.len(), short, secs)


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
