"""List building: retrieval context, candidates from every source, scores through a bundle,
business rules; the nightly's top-N per user (`ranked_lists`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl

from features import FeatureConfig
from recsys.bundle import Bundle
from recsys.data import Dataset
from recsys.data.schema import TS
from recsys.errors import ConfigError
from recsys.retrieval import (
    ANN_MIN_ITEMS,
    Cadence,
    RetrievalContext,
    SourceRun,
    fit_cadence,
    live_items,
    retrieve,
)
from recsys.rules import ListRules, apply_rules
from recsys.vectors import ItemVectors

__all__ = [
    "PRIOR_WEIGHTS",
    "ListSettings",
    "ListsResult",
    "ScoreCache",
    "build_lists",
    "bundle_prior_weight",
    "consumption",
    "known_users",
    "list_context",
    "list_horizon",
    "ranked_lists",
    "retrieval_context",
    "with_prior",
]

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
    keep_candidates: bool | pl.DataFrame = True,
    progress: Callable[[int, int], None] | None = None,
) -> ListsResult:
    """Each user's top n: candidates from the sources (`quotas`), scored by `score` (a frame of
    user_id, item_id -> scores, e.g. `Bundle.score`), then `rules`. Users outside `known`
    (default: those who consumed anything) get the decayed popularity order instead of the
    ranker, as the API ranks a user it does not know. Users without any candidate have no
    list; short lists are counted, never padded.

    keep_candidates: True keeps every candidate (the result's and each source's), False none
    (the times only); a frame of (user_id, item_id) pairs keeps the candidates among them only
    (e.g. what users consumed next: their recall is the same, in memory that does not grow
    with the candidates)."""
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
        if isinstance(keep_candidates, pl.DataFrame):
            runs = [SourceRun(r.name, r.quota, _among(r.candidates, keep_candidates), r.seconds)
                    for r in runs]  # fmt: skip
            out_cands.append(_among(cands, keep_candidates))
        elif keep_candidates:
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


@dataclass(frozen=True)
class ListSettings:
    """What building and judging ranked lists needs of a nightly config (`pipeline`, `rules`,
    `features` sections): list length, retrieval quotas and cadence, rules."""

    top_n: int
    quotas: Mapping[str, int]
    rules: ListRules
    features: FeatureConfig
    max_history: int = 50
    popular_half_life_days: float | None = None  # None: fitted to the log
    live_window_days: float | None = None  # None: fitted; 0: every item
    ann_min_items: int | None = None
    horizon_days: float | None = None  # None: see list_horizon
    prior_weight: float | None = None  # None: chosen at the validation cut-off


def list_context(
    data: Dataset, as_of: datetime, settings: ListSettings, vectors: ItemVectors | None
) -> RetrievalContext:
    """The retrieval context of lists made at `as_of` with `settings`."""
    return retrieval_context(
        data, as_of, vectors=vectors, max_history=settings.max_history,
        half_life_days=settings.popular_half_life_days,
        live_window_days=settings.live_window_days, ann_min_items=settings.ann_min_items,
    )  # fmt: skip


def bundle_prior_weight(bundle: Bundle) -> float:
    """The popularity weight a bundle's lists use (0 for bundles written before it existed)."""
    return float(bundle.manifest.get("lists", {}).get("prior_weight", 0.0))


def known_users(data: Dataset) -> pl.Series:
    """Users the bundle of `data` knows (a history or impressions): the API ranks them with
    the ranker, and the popularity prior ranks everyone else."""
    return pl.concat([data.interactions["user_id"], data.impressions["user_id"]]).unique()


def _among(candidates: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """The candidate rows whose (user_id, item_id) is one of `pairs`, in order."""
    keys = pairs.select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    return candidates.join(keys.unique(), on=["user_id", "item_id"], how="semi",
                           maintain_order="left")  # fmt: skip


def block_users(chunk_rows: int | None, quotas: Mapping[str, int]) -> int:
    """Users whose candidates are scored together so a block's feature rows are about
    `chunk_rows` (each user brings up to the sum of the quotas); None: 10,000 users. The block
    sets memory, never the lists (users are independent)."""
    if chunk_rows is None:
        return 10_000
    return max(100, chunk_rows // max(1, sum(quotas.values())))


def ranked_lists(
    bundle: Bundle,
    data: Dataset,
    ctx: RetrievalContext,
    settings: ListSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
    block: int = 10_000,
) -> tuple[pl.DataFrame, int]:
    """Top-N per active user of `data` through the bundle (the same loader and features as the
    API): candidates from every retrieval source among the live items, minus what the user
    consumed, then the business rules. Returns (lists: user_id, rank, item_id, score, source,
    model_version, generated_at; users with a short list)."""
    active = (
        pl.concat([data.interactions.select("user_id"), data.impressions.select("user_id")])
        .unique()
        .sort("user_id")["user_id"]
    )
    score = with_prior(bundle.score, ctx.popularity, bundle_prior_weight(bundle))
    res = build_lists(
        score, ctx, active, settings.quotas, n=settings.top_n, rules=settings.rules,
        known=known_users(data), progress=progress, keep_candidates=False, block=block,
    )  # fmt: skip
    now = datetime.now(UTC)
    recs = res.lists.select(
        "user_id",
        pl.col("rank").cast(pl.Int32),
        "item_id",
        "score",
        "source",
        pl.lit(bundle.model_version).alias("model_version"),
        pl.lit(now, dtype=TS).alias("generated_at"),
    )
    return recs, res.short
