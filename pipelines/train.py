"""The nightly's learning stages: fine-tune the encoder (Ray Train), embed the catalogue (Ray
Data), build the point-in-time feature frames, train the LambdaRank rankers."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from experiments.tracking import NullTracker
from features.events import prepare_events
from recsys.encoder import EncoderConfig, FinetuneConfig
from recsys.evaluation import BATCH, MODES, batch_moments, requests, valid_auc
from recsys.featurize import (
    ONLINE,
    FeatureSpec,
    chunkable_rows,
    in_process,
    point_in_time_chunks,
    semantic_only,
)
from recsys.io import write_parquet_chunks
from recsys.ranker import Ranker, RankerConfig, refit_ranker, train_ranker
from recsys.vectors import ItemVectors

from .prepare import Split, Validated, labelled, read_tables
from .stages import StageContext, StageResult


@dataclass(frozen=True)
class Finetuned:
    losses: list[float]
    val_metrics: dict[str, float]
    val_scores: list[float]
    best_epoch: int | None
    fell_back: bool
    peak_rss_mb: int
    worker_cpu_seconds: float
    trainable_params: int
    total_params: int
    seconds: float
    device: str
    method: str

    @property
    def tuned(self) -> bool:
        """A tuned encoder ships (not the frozen one)."""
        return self.method != "none" and not self.fell_back


def finetune(
    ctx: StageContext,
    validated: StageResult[Validated],
    split: StageResult[Split],
    config: FinetuneConfig,
) -> Finetuned:
    """The encoder tuned on the impressions before `split.encoder_at` (ctx.work/encoder)."""
    from pipelines.finetune import run_finetune

    data = read_tables(validated.path).before(split.summary.encoder_at)
    t = ctx.env.tracker or NullTracker()  # the stage's own run (nested under the nightly's)

    def on_epoch(m: dict[str, Any]) -> None:
        metrics = {k: v for k, v in m.items() if isinstance(v, int | float)}
        t.log_metrics(metrics, step=int(m.get("epoch", 0)))

    uri = ctx.env.tracking_uri
    rep = run_finetune(
        data, ctx.work / "encoder", config, base_model=config.base_model,
        ray_address=ctx.env.ray_address,
        on_epoch=on_epoch, mlflow_run=(uri, t.run_id) if t.run_id else None, log=ctx.env.log,
        storage_path=ctx.env.storage,
    )  # fmt: skip
    if rep.fell_back:
        t.set_tags({"finetune.fell_back": "true"})
    return Finetuned(
        losses=[float(x) for x in rep.losses],
        val_metrics={k: float(v) for k, v in rep.val_metrics.items()},
        val_scores=rep.val_scores,
        best_epoch=rep.best_epoch,
        fell_back=rep.fell_back,
        peak_rss_mb=round(rep.peak_rss_mb),
        worker_cpu_seconds=round(rep.worker_cpu_seconds, 3),
        trainable_params=int(rep.trainable_params),
        total_params=int(rep.total_params),
        seconds=float(rep.seconds),
        device=str(rep.device),
        method=config.method,
    )


@dataclass(frozen=True)
class EmbedRun:
    embedded: int
    through_head: int
    distinct_texts: int
    reused: int
    dropped: int
    fallback_texts: int
    seconds: float
    device: str
    encoder_id: str
    worker_cpu_seconds: float
    worker_peak_rss_mb: int
    reused_from: str | None = None  # the tuned encoder is the frozen one: its vectors, copied


@dataclass(frozen=True)
class Embedded:
    item_vectors_frozen: EmbedRun  # the frozen base encoder's
    item_vectors: EmbedRun  # the shipped (tuned) encoder's


def embed(
    ctx: StageContext,
    validated: StageResult[Validated],
    finetuned: StageResult[Finetuned],
    config: EncoderConfig,
) -> Embedded:
    """Item vectors of the frozen and of the shipped encoder (incremental: items whose text is
    unchanged keep their vectors from the previous run)."""
    from pipelines.embed import run_embed

    items = read_tables(validated.path).items
    runs: dict[str, EmbedRun] = {}
    frozen_file = ctx.work / "item_vectors_frozen.parquet"
    encoder_dir = finetuned.path / "encoder"
    for name, enc in (("item_vectors_frozen", None), ("item_vectors", encoder_dir)):
        target = ctx.work / f"{name}.parquet"
        if enc is not None and not finetuned.summary.tuned:
            # the "tuned" encoder is the frozen one: embedding twice would be waste
            shutil.copy2(frozen_file, target)
            runs[name] = dataclasses.replace(runs[frozen_file.stem], reused_from=frozen_file.stem)
            continue
        if ctx.previous is not None and (ctx.previous / f"{name}.parquet").is_file():
            shutil.copy2(ctx.previous / f"{name}.parquet", target)
        # a tuned encoder that is the frozen one plus a head: the head on frozen vectors
        rep = run_embed(
            items, enc, target, config=config, ray_address=ctx.env.ray_address,
            base_vectors=frozen_file if enc is not None else None,
        )  # fmt: skip
        runs[name] = EmbedRun(
            rep.embedded, rep.through_head, rep.distinct_texts, rep.reused, rep.dropped,
            rep.fallback_texts, float(rep.seconds), str(rep.device), rep.encoder_id,
            round(rep.worker_cpu_seconds, 3), round(rep.worker_peak_rss_mb),
        )  # fmt: skip
    return Embedded(**runs)


def item_vectors(embedded: StageResult[Embedded], spec: FeatureSpec) -> ItemVectors:
    """The shipped encoder's item vectors, with the frozen encoder's beside them when the spec
    reads both."""
    vectors = ItemVectors.from_parquet(embedded.path / "item_vectors.parquet")
    if spec.frozen_semantic:
        return vectors.with_frozen(frozen_vectors(embedded))
    return vectors


def frozen_vectors(embedded: StageResult[Embedded]) -> ItemVectors:
    return ItemVectors.from_parquet(embedded.path / "item_vectors_frozen.parquet")


@dataclass(frozen=True)
class Frames:
    rows: int
    columns: list[str]
    variants: list[list[str]]  # [mode, refresh] of each frame
    chunks: int = 1  # pieces of whole requests each frame was computed in (pipeline.chunk_rows)
    nodes: dict[str, int] = field(default_factory=dict)  # Ray nodes: chunks each computed


def feature_file(mode: str, refresh: str) -> str:
    return f"features_{mode}.parquet" if mode == ONLINE else f"features_{mode}_{refresh}.parquet"


def features(
    ctx: StageContext,
    validated: StageResult[Validated],
    split: StageResult[Split],
    embedded: StageResult[Embedded],
    spec: FeatureSpec,
    refreshes: tuple[str, ...],
) -> Frames:
    """Point-in-time feature frames of every impression, once per freshness mode. online: every
    row as of its own moment (the API with events). batch: as the batch path serves them, test
    rows as of the cut-off (the nightly lists and an API without events), validation rows as of
    the validation start, training rows as of their refresh period's start (one frame per
    candidate period). Each frame also holds ts, clicked, split and position."""
    data = read_tables(validated.path)
    imp = labelled(data.impressions, split.summary)
    s = split.summary
    vectors = item_vectors(embedded, spec)
    req = requests(imp)
    every = dataclasses.replace(spec, refresh=ONLINE, use_semantic=True)
    variants = [[BATCH, r] for r in refreshes] + [[ONLINE, ONLINE]]
    events = prepare_events(data)  # the cumulative event logs, once for every frame
    nodes: Counter[str] = Counter()
    map_chunks = in_process
    if ctx.env.ray_address:  # a cluster: the chunks are Ray tasks on its nodes
        from pipelines.ray_utils import init_ray, ray_map

        init_ray(ctx.env.ray_address)
        map_chunks = functools.partial(ray_map, nodes=nodes)
    chunks, chunk_rows = 0, chunkable_rows(req["request_id"], ctx.env.chunk_rows)
    if chunk_rows is None and imp.height > (ctx.env.chunk_rows or imp.height):
        ctx.env.log(
            "[features] the impressions' rows of one impression are not next to each other, so "
            "the feature tables are built whole (memory grows with the log): import the log "
            "with each impression's rows together to bound it by pipeline.chunk_rows"
        )
    for mode, refresh in variants:
        at = req
        if mode != ONLINE:
            period = dataclasses.replace(spec, refresh=refresh)
            at = batch_moments(req, imp, period, s.valid_at, s.test_at)
        extra = pl.DataFrame([req["ts"], imp["clicked"], imp["split"], imp["position"]])
        if not spec.frozen_semantic:  # the semantic_frozen baseline's column
            frozen_cos = semantic_only(every, at, data, frozen_vectors(embedded))["sem_cos_mean"]
            extra = extra.insert_column(0, frozen_cos.alias("sem_cos_mean_frozen"))
        pieces = point_in_time_chunks(
            every, at, data, vectors, chunk_rows=chunk_rows, events=events, extra=extra,
            map_chunks=map_chunks,
        )  # fmt: skip
        chunks = write_parquet_chunks(pieces, ctx.work / feature_file(mode, refresh))
    if nodes:
        ctx.env.log(f"[features] {sum(nodes.values())} chunks on {len(nodes)} Ray node(s): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(nodes.items())))  # fmt: skip
    return Frames(imp.height, spec.columns, variants, chunks, dict(sorted(nodes.items())))


def frames_of(frames: StageResult[Frames]) -> dict[str, list[str]]:
    """{mode: [refresh period of each of its frames]} of the features stage."""
    out: dict[str, list[str]] = {m: [] for m in MODES}
    for mode, refresh in frames.summary.variants:
        out[mode].append(refresh)
    return out


def scan_rows(frames: StageResult[Frames], mode: str, refresh: str, *splits: str) -> pl.LazyFrame:
    """A scan of the rows of `splits` of one feature frame: nothing is read until collected."""
    scan = pl.scan_parquet(frames.path / feature_file(mode, refresh))
    return scan.filter(pl.col("split").is_in(list(splits)))


def frame_chunks(
    frames: StageResult[Frames], mode: str, refresh: str, split: str, chunk_rows: int | None
) -> Iterator[pl.DataFrame]:
    """The rows of `split` of one feature frame, in file order, read `chunk_rows` rows of the
    file at a time (None: all at once); at least one frame, maybe empty. A request's rows may
    straddle two pieces: for row-wise work (scoring), not for per-request work."""
    if chunk_rows is None or frames.summary.rows <= chunk_rows:
        yield scan_rows(frames, mode, refresh, split).collect()
        return
    scan = pl.scan_parquet(frames.path / feature_file(mode, refresh))
    keep = pl.col("split") == split
    for lo in range(0, frames.summary.rows, chunk_rows):
        yield scan.slice(lo, chunk_rows).filter(keep).collect()


@dataclass(frozen=True)
class Refresh:
    chosen: str  # the training rows' refresh period kept
    validation_auc: dict[str, dict[str, float]]  # {period: {ranker: AUC}}


@dataclass(frozen=True)
class RankerInfo:
    best_iteration: int
    train_rows: int
    semantic_missing_before: str | None
    refit_rows: int | None
    importance: list[dict[str, Any]]
    history: dict[str, Any]
    model: str = ""  # Ranker.describe(): tree size and trees, or the input column alone
    # small logs: each candidate's validation AUC (Ranker.info["chosen_on_valid_auc"])
    chosen_on_valid_auc: dict[str, float] | None = None


@dataclass(frozen=True)
class Ranked:
    refresh: dict[str, Refresh]  # per mode
    rankers: dict[str, RankerInfo]  # per ranker_key


def ranker_key(name: str, mode: str) -> str:
    """The folder of a ranker in the rank stage: lgbm_full (batch), lgbm_full.online, ..."""
    return name if mode == BATCH else f"{name}.{mode}"


def load_rankers(
    ranked: StageResult[Ranked], *, selected: bool = False
) -> dict[str, dict[str, Ranker]]:
    """{mode: {name: ranker}}: the shipped rankers, or those early stopping selected (trained
    on the training rows only)."""
    suffix = ".selected" if selected else ""
    names = ("lgbm_full", "lgbm_behavioural")
    return {m: {n: Ranker.load(ranked.path / f"{ranker_key(n, m)}{suffix}") for n in names}
            for m in MODES}  # fmt: skip


def _hide_fitted(rows: pl.LazyFrame, columns: list[str], encoder_at: datetime) -> pl.LazyFrame:
    """`rows` with the tuned encoder's semantic columns missing before `encoder_at`: that
    encoder saw those clicks, so its features there are fitted, not predicted. The full ranker
    still learns from every row (it loses no behavioural data to the hold-out); the frozen
    encoder's columns (no click tuned it) stay on every row."""
    early = pl.col("ts") < encoder_at
    return rows.with_columns(pl.when(~early).then(pl.col(c)).alias(c) for c in columns)


def _training_rows(
    frames: StageResult[Frames], mode: str, period: str, mask: bool, spec: FeatureSpec,
    encoder_at: datetime,
) -> pl.LazyFrame:  # fmt: skip
    """The training rows of a frame as a ranker learns from them (a scan)."""
    rows = scan_rows(frames, mode, period, "train")
    return _hide_fitted(rows, spec.tuned_semantic, encoder_at) if mask else rows


def rank(
    ctx: StageContext,
    frames: StageResult[Frames],
    split: StageResult[Split],
    spec: FeatureSpec,
    config: RankerConfig,
    tuned: bool,
    refit: bool,
) -> Ranked:
    """Per freshness mode: lgbm_full (every column of `spec`) and lgbm_behavioural, trained on
    the frame of each candidate refresh period; the period whose lgbm_full validates best is
    kept (the first of equals), then refit on train + validation when `refit`. Saves each
    ranker (ctx.work/<ranker_key>) and the one early stopping selected (<key>.selected).
    Holds one frame at a time, its training and validation rows and the rankers' columns."""
    encoder_at = split.summary.encoder_at
    plans = [("lgbm_full", spec.columns, tuned), ("lgbm_behavioural", spec.behavioural, False)]
    columns = ["request_id", "ts", "clicked", "split", *spec.columns]
    refresh: dict[str, Refresh] = {}
    infos: dict[str, RankerInfo] = {}
    for mode, periods in frames_of(frames).items():
        best: tuple[float, str, dict[str, Ranker]] | None = None
        scored: dict[str, dict[str, float]] = {}
        for period in periods:
            valid = scan_rows(frames, mode, period, "valid").select(columns).collect()
            fits = {
                name: train_ranker(_training_rows(frames, mode, period, mask, spec, encoder_at),
                                   valid, cols, config, group_col="request_id")
                for name, cols, mask in plans
            }  # fmt: skip
            scored[period] = {n: valid_auc(valid, r) for n, r in fits.items()}
            if best is None or scored[period]["lgbm_full"] > best[0]:
                best = (scored[period]["lgbm_full"], period, fits)
        assert best is not None
        _, pick, fits = best
        refresh[mode] = Refresh(pick, scored)
        if len(scored) > 1:
            ctx.env.log(
                f"[rank] {mode}: training rows refreshed every {pick}, chosen on the validation "
                "slice as served (lgbm_full AUC "
                + ", ".join(f"{k} {v['lgbm_full']:.4f}" for k, v in scored.items())
                + ")"
            )
        valid_rows = scan_rows(frames, mode, pick, "valid").select(columns)
        for name, _cols, mask in plans:
            key = ranker_key(name, mode)
            r = fits[name]
            rows = _training_rows(frames, mode, pick, mask, spec, encoder_at).select(columns)
            r.save(ctx.work / f"{key}.selected")
            shipped = r
            if refit:
                shipped = refit_ranker(pl.concat([rows, valid_rows]), r, config,
                                       group_col="request_id")  # fmt: skip
            shipped.save(ctx.work / key)
            choice = r.info.get("chosen_on_valid_auc")
            if choice:
                ctx.env.log(
                    f"[rank] {key}: a small log ({r.info['train_groups']} training impressions): "
                    f"{r.describe()}, chosen on validation AUC ("
                    + ", ".join(f"{k} {v:.4f}" for k, v in choice.items())
                    + ")"
                )
            infos[key] = RankerInfo(
                best_iteration=int(r.best_iteration),
                train_rows=int(rows.select(pl.len()).collect().item()),
                semantic_missing_before=encoder_at.isoformat() if mask else None,
                refit_rows=shipped.info.get("refit_rows"),
                importance=shipped.feature_importance().to_dicts(),
                history=r.history,
                model=r.describe(),
                chosen_on_valid_auc=choice,
            )
    return Ranked(refresh, infos)
