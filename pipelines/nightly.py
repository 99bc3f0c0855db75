"""The nightly pipeline: validate -> split -> fine-tune -> embed -> features -> rank -> evaluate
-> bundle -> ranked lists -> register.

Every stage writes into its own folder under the run directory, atomically, with a fingerprint of
its inputs and config (`pipelines.stages`): a rerun skips unchanged stages, so a killed run resumes
and ends with the same lists. Fine-tuning (Ray Train) and embedding (Ray Data) are Ray jobs; the
polars/LightGBM stages run in process, where they already use every core of the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from experiments.config import NightlyConfig, load_config
from experiments.tracking import MlflowTracker, NullTracker, Tracker, default_tracking_uri
from features import build_snapshot
from features.config import ALL
from recsys.baselines import RandomScorer
from recsys.bundle import Bundle, write_bundle
from recsys.data import Dataset, dataset_fingerprint, read_dataset, validate_dataset
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, TS
from recsys.errors import ConfigError, DataError
from recsys.featurize import ONLINE, FeatureSpec, matrix, point_in_time_frame, semantic_only
from recsys.io import CURRENT, publish_version, write_json, write_parquet
from recsys.listmetrics import list_metrics
from recsys.lists import (
    PRIOR_WEIGHTS,
    ScoreCache,
    baseline_lists,
    build_lists,
    evaluate_lists,
    list_horizon,
    retrieval_context,
    truth_after,
    with_prior,
)
from recsys.metrics import evaluation_table, impression_metrics, paired_difference
from recsys.ranker import Ranker, refit_ranker, train_ranker
from recsys.sampling import impressions_from_interactions
from recsys.vectors import ItemVectors

from .stages import StageResult, StageRunner

logger = logging.getLogger(__name__)
MODELS = (
    "random",
    "popularity",
    "smoothed_ctr",
    "recent_clicks",
    "semantic_frozen",
    "semantic_tuned",
    "lgbm_behavioural",
    "lgbm_full",
)
# The simple baselines every model is compared with (paired, per impression).
BASELINES = ("random", "popularity", "smoothed_ctr", "recent_clicks")
MAX_SAMPLED_IMPRESSIONS = 60_000
# Feature freshness modes, each with its own rankers and table (see freshness_note).
BATCH = "batch"
MODES = (BATCH, ONLINE)


@dataclass
class NightlyResult:
    run_dir: Path
    config: NightlyConfig
    stages: list[StageResult]
    evaluation: list[dict[str, Any]]
    validation: dict[str, float]
    candidate_recall: dict[str, float]
    bundle_dir: Path
    recommendations: Path
    registry: dict[str, Any] = field(default_factory=dict)
    freshness: str = ""
    versus: str = ""
    full_vs_behavioural: dict[str, float] = field(default_factory=dict)
    shipped_ranker: dict[str, str] = field(default_factory=dict)  # name, reason
    # the online mode's test, versus, full_vs_behavioural, shipped_ranker, freshness, validation
    online: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    lists: dict[str, Any] = field(default_factory=dict)  # list metrics, retrieval sources
    # the batch ranker's training freshness: {"chosen": period, "validation_auc": {period:
    # {ranker: AUC}}} (one period unless pipeline.refresh is "auto")
    refresh: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------- helpers


def read_tables(d: Path) -> Dataset:
    return Dataset(
        pl.read_parquet(d / "items.parquet"),
        pl.read_parquet(d / "interactions.parquet"),
        pl.read_parquet(d / "impressions.parquet"),
    )


def _parse_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError as e:
        raise ConfigError(
            f"--split-at {value!r} is not an ISO time; use e.g. 2026-01-15T00:00:00Z"
        ) from e
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _as_time(value: object) -> datetime:
    """A polars datetime scalar as a `datetime` (they always are, for a Datetime column)."""
    if not isinstance(value, datetime):
        raise DataError(f"expected a timestamp, got {value!r}")
    return value


def _quantile_time(ts: pl.Series, q: float) -> datetime:
    return _as_time(ts.sort()[min(int(q * ts.len()), ts.len() - 1)])


def _requests(impressions: pl.DataFrame) -> pl.DataFrame:
    return impressions.select(
        pl.col("impression_id").alias("request_id"), "user_id", "ts", "item_id"
    )


def _before(data: Dataset, t: datetime) -> Dataset:
    """The data strictly before `t` (history without a time counts as before)."""
    inter = data.interactions.filter(pl.col("ts").is_null() | (pl.col("ts") < t))
    imp = data.impressions.filter(pl.col("ts") < t)
    return Dataset(data.items, inter, imp)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.nightly.lock for the run: a second nightly on the same run folder is
    refused at once (two runs would clear each other's temporary folders)."""
    import filelock

    lock = filelock.FileLock(run_dir / ".nightly.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise ConfigError(
            f"another nightly is running in {run_dir} (it holds {lock.lock_file}); wait for it "
            "to finish, or give this one another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# --------------------------------------------------------------------------- stages


def run_nightly(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    config: NightlyConfig | None = None,
    split_at: str | datetime | None = None,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    log: Any = print,
) -> NightlyResult:
    """Run (or resume) the nightly pipeline on a dataset directory; see the module docstring."""
    t_start = time.perf_counter()
    cfg = config or load_config(None if config_path is None else Path(config_path))
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data_dir)
    runner = StageRunner(run_dir, log=log)
    pc = cfg.pipeline
    # refresh: the first candidate until the rank stage has chosen one ("auto")
    spec = FeatureSpec(
        cfg.features, pc.use_semantic, pc.max_history, pc.half_life_days, pc.stable_features,
        pc.refreshes[0],
    )  # fmt: skip

    tracker_cm: Any
    if cfg.tracking.enabled:
        uri = tracking_uri or default_tracking_uri(
            run_dir.parent if run_dir.parent != Path("") else "."
        )
        tracker_cm = MlflowTracker.start(
            uri, cfg.tracking.experiment, run_name=f"nightly-{cfg.name}", tags={"config": cfg.name}
        )
    else:
        uri = ""
        tracker_cm = _null_cm()
    with _run_lock(run_dir), tracker_cm as tracker:
        tracker.log_params(
            {**cfg.to_params(), "data_dir": str(data_dir), "split_at": str(split_at)}
        )

        # 1. validate --------------------------------------------------------
        data_fp = dataset_fingerprint(data_dir) if data_dir.is_dir() else ""
        if not data_fp:
            read_dataset(data_dir)  # raises the DataError naming what is missing

        def do_validate(work: Path, _prev: Path | None) -> dict[str, Any]:
            v = validate_dataset(read_dataset(data_dir))
            data = Dataset.from_validated(v)
            synthesized = 0
            if data.impressions.height == 0:
                imp = impressions_from_interactions(
                    data.interactions,
                    data.items,
                    negatives=pc.sampled_negatives,
                    max_impressions=MAX_SAMPLED_IMPRESSIONS,
                    seed=pc.seed,
                    popular_share=pc.sampled_popular_share,
                )
                synthesized = imp["impression_id"].n_unique()
                data = Dataset(data.items, data.interactions, imp)
            for name in (ITEMS, INTERACTIONS, IMPRESSIONS):
                write_parquet(data.table(name), work / f"{name}.parquet")
            write_parquet(v.rejects, work / "rejects.parquet")
            return {
                "counts": data.counts(),
                "rejects": v.rejects.height,
                "reject_reasons": v.reasons().to_dicts(),
                "synthesized_impressions": synthesized,
            }

        st = runner.run(
            "validate",
            {
                "data": data_fp,
                "negatives": pc.sampled_negatives,
                "seed": pc.seed,
                "popular_share": pc.sampled_popular_share,
            },
            do_validate,
        )
        data = read_tables(st.path)
        rules = cfg.rules
        if rules.exclude_items or rules.exclude_categories:
            cats = data.items["category"].drop_nulls().unique().to_list()
            rules.check(data.items["item_id"].to_list(), cats, where="config [rules]")
        # retrieval and list evaluation read real shows only, never sampled negatives
        logged = (
            Dataset(data.items, data.interactions, data.impressions.clear())
            if st.summary.get("synthesized_impressions")
            else data
        )
        if st.summary.get("rejects"):
            log(f"[validate] {st.summary['rejects']} rows set aside in {st.path}/rejects.parquet")

        # 2. split -----------------------------------------------------------
        def do_split(work: Path, _prev: Path | None) -> dict[str, Any]:
            ts = data.impressions["ts"]
            if ts.len() == 0:
                raise DataError(f"{data_dir}: no impressions or timed interactions to split")
            first, last = _as_time(ts.min()), _as_time(ts.max())
            test_at = (
                _parse_time(split_at)
                if isinstance(split_at, str)
                else (split_at or _quantile_time(ts, 1.0 - pc.test_fraction))
            )
            before = ts.filter(ts < test_at)
            if before.len() == 0 or ts.filter(ts >= test_at).len() == 0:
                raise ConfigError(
                    f"split at {test_at.isoformat()} leaves an empty "
                    f"{'train' if before.len() == 0 else 'test'} set: the impressions run from "
                    f"{first.isoformat()} to {last.isoformat()}; pick --split-at between them"
                )
            valid_at = _quantile_time(before, 1.0 - pc.valid_fraction)
            if before.filter(before < valid_at).len() == 0:
                raise ConfigError(
                    f"split at {test_at.isoformat()} leaves no training data before the validation "
                    f"slice (from {valid_at.isoformat()}); pick a later --split-at"
                )
            train_ts = before.filter(before < valid_at)
            encoder_at = _quantile_time(train_ts, pc.encoder_fraction)
            info = {
                "encoder_at": encoder_at.isoformat(),
                "valid_at": valid_at.isoformat(),
                "test_at": test_at.isoformat(),
                "first": first.isoformat(),
                "last": last.isoformat(),
            }
            write_json(info, work / "split.json")
            return info

        st_split = runner.run(
            "split",
            {
                "validate": st.fingerprint,
                "split_at": str(split_at),
                "fractions": [pc.test_fraction, pc.valid_fraction, pc.encoder_fraction],
            },
            do_split,
        )
        encoder_at = datetime.fromisoformat(st_split.summary["encoder_at"])
        valid_at = datetime.fromisoformat(st_split.summary["valid_at"])
        test_at = datetime.fromisoformat(st_split.summary["test_at"])
        imp = data.impressions
        part = (
            pl.when(pl.col("ts") < valid_at)
            .then(pl.lit("train"))
            .when(pl.col("ts") < test_at)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("test"))
        )
        imp = imp.with_columns(part.alias("split"))
        log(
            f"[split] encoder tuned on impressions before {encoder_at.isoformat()}; "
            + ", ".join(
                f"{s}: {imp.filter(pl.col('split') == s).height} rows"
                for s in ("train", "valid", "test")
            )
        )

        # 3. finetune (Ray Train) -------------------------------------------
        def do_finetune(work: Path, _prev: Path | None) -> dict[str, Any]:
            from pipelines.finetune import run_finetune

            with tracker.stage("finetune") as t:

                def on_epoch(m: dict[str, Any]) -> None:
                    step = int(m.get("epoch", 0))
                    t.log_metrics(
                        {k: v for k, v in m.items() if isinstance(v, int | float)}, step=step
                    )

                rep = run_finetune(
                    _before(data, encoder_at),
                    work / "encoder",
                    cfg.finetune,
                    ray_address=ray_address,
                    on_epoch=on_epoch,
                    mlflow_run=(uri, t.run_id) if t.run_id else None,
                    log=log,
                )
                if rep.fell_back:
                    t.set_tags({"finetune.fell_back": "true"})
            return {
                "losses": [float(x) for x in rep.losses],
                "val_metrics": {k: float(v) for k, v in rep.val_metrics.items()},
                "val_scores": rep.val_scores,
                "best_epoch": rep.best_epoch,
                "fell_back": rep.fell_back,
                "peak_rss_mb": round(rep.peak_rss_mb),
                "worker_cpu_seconds": round(rep.worker_cpu_seconds, 3),
                "trainable_params": int(rep.trainable_params),
                "total_params": int(rep.total_params),
                "seconds": float(rep.seconds),
                "device": str(rep.device),
            }

        st_ft = runner.run(
            "finetune",
            {
                "validate": st.fingerprint,
                "split": st_split.fingerprint,
                "finetune": cfg.section("finetune"),
                "encoder": cfg.section("encoder"),
            },
            do_finetune,
        )
        encoder_dir = st_ft.path / "encoder"
        log(finetune_note(st_ft.summary, cfg.finetune.method))
        tuned = (
            cfg.finetune.method != "none" and not st_ft.summary.get("fell_back") and pc.use_semantic
        )
        # a tuned encoder: the full ranker also reads the frozen encoder's cosines
        spec = dataclasses.replace(spec, frozen_semantic=tuned and pc.frozen_semantic)

        # 4. embed (Ray Data; incremental) -----------------------------------
        def do_embed(work: Path, prev: Path | None) -> dict[str, Any]:
            from pipelines.embed import run_embed

            summary: dict[str, Any] = {}
            frozen_file = work / "item_vectors_frozen.parquet"
            for name, enc in (("item_vectors_frozen", None), ("item_vectors", encoder_dir)):
                target = work / f"{name}.parquet"
                if enc is not None and (
                    cfg.finetune.method == "none" or st_ft.summary.get("fell_back")
                ):
                    # the "tuned" encoder is the frozen one: embedding twice would be waste
                    shutil.copy2(frozen_file, target)
                    summary[name] = dict(summary[frozen_file.stem], reused_from=frozen_file.stem)
                    continue
                if prev is not None and (prev / f"{name}.parquet").is_file():
                    shutil.copy2(prev / f"{name}.parquet", target)
                # a tuned encoder that is the frozen one plus a head: the head on frozen vectors
                rep = run_embed(
                    data.items, enc, target, config=cfg.encoder, ray_address=ray_address,
                    base_vectors=frozen_file if enc is not None else None,
                )  # fmt: skip
                summary[name] = {
                    "embedded": rep.embedded,
                    "through_head": rep.through_head,
                    "distinct_texts": rep.distinct_texts,
                    "reused": rep.reused,
                    "dropped": rep.dropped,
                    "fallback_texts": rep.fallback_texts,
                    "seconds": float(rep.seconds),
                    "device": str(rep.device),
                    "encoder_id": rep.encoder_id,
                    "worker_cpu_seconds": round(rep.worker_cpu_seconds, 3),
                    "worker_peak_rss_mb": round(rep.worker_peak_rss_mb),
                }
            return summary

        st_emb = runner.run(
            "embed",
            {
                "items": st.fingerprint,
                "finetune": st_ft.fingerprint,
                "encoder": cfg.section("encoder"),
            },
            do_embed,
        )
        vectors = ItemVectors.from_parquet(st_emb.path / "item_vectors.parquet")
        frozen = ItemVectors.from_parquet(st_emb.path / "item_vectors_frozen.parquet")
        if spec.frozen_semantic:
            vectors = vectors.with_frozen(frozen)

        # 5. features (point in time), once per freshness mode -------------------
        # online: every row as of its own moment (the API with events). batch: as the batch
        # path serves them, test rows as of the cut-off (the nightly lists and an API without
        # events), validation rows as of the validation start, training rows as of their refresh
        # period's start (one frame per candidate period). One ranker is trained per mode.
        online_spec = dataclasses.replace(spec, refresh=ONLINE)
        variants = [(BATCH, r) for r in pc.refreshes] + [(ONLINE, ONLINE)]

        def do_features(work: Path, _prev: Path | None) -> dict[str, Any]:
            req = _requests(imp)
            every = dataclasses.replace(online_spec, use_semantic=True)
            for mode, refresh in variants:
                at = (
                    req
                    if mode == ONLINE
                    else _batch_moments(
                        req, imp, dataclasses.replace(spec, refresh=refresh), valid_at, test_at
                    )
                )
                frame = point_in_time_frame(every, at, data, vectors)
                if not spec.frozen_semantic:  # the semantic_frozen baseline's column
                    frozen_cos = semantic_only(every, at, data, frozen)["sem_cos_mean"]
                    frame = frame.with_columns(frozen_cos.alias("sem_cos_mean_frozen"))
                frame = frame.with_columns(req["ts"], imp["clicked"], imp["split"], imp["position"])
                write_parquet(frame, work / _feature_file(mode, refresh))
            return {"rows": imp.height, "columns": spec.columns, "variants": variants}

        st_feat = runner.run(
            "features",
            {
                "validate": st.fingerprint,
                "split": st_split.fingerprint,
                "embed": st_emb.fingerprint,
                "features": cfg.section("features"),
                "semantic": [pc.max_history, pc.half_life_days],
                "columns": [pc.stable_features, spec.frozen_semantic],
                "variants": variants,
                "moments": "valid-as-served",
            },
            do_features,
        )
        # {mode: {refresh: frame}}; after the rank stage, frames[mode]: the chosen one
        candidates = {
            m: {
                r: pl.read_parquet(st_feat.path / _feature_file(m, r))
                for mm, r in variants
                if mm == m
            }
            for m in MODES
        }

        def rows_of(mode: str, name: str, frame: pl.DataFrame | None = None) -> pl.DataFrame:
            return (frames[mode] if frame is None else frame).filter(pl.col("split") == name)

        # 6. rank (LightGBM LambdaRank) --------------------------------------
        # A tuned encoder saw the clicks before encoder_at: its semantic features on those rows
        # are fitted, not predicted. The full ranker still learns from every row, with those
        # rows' tuned semantic columns missing, so it loses no behavioural data to the hold-out;
        # the frozen encoder's columns (no click tuned it) stay on every row.
        semantic_cols = spec.tuned_semantic

        def fitted_rows(rows: pl.DataFrame, mask: bool) -> pl.DataFrame:
            if not mask:
                return rows
            early = pl.col("ts") < encoder_at
            return rows.with_columns(
                pl.when(~early).then(pl.col(c)).alias(c) for c in semantic_cols
            )

        def do_rank(work: Path, _prev: Path | None) -> dict[str, Any]:
            out: dict[str, Any] = {}
            plans = (
                ("lgbm_full", spec.columns, tuned),
                ("lgbm_behavioural", spec.behavioural, False),
            )
            for mode in MODES:
                # each candidate freshness: both rankers early-stopped on its validation rows;
                # the one whose lgbm_full validates best is kept (the first of equals)
                best: tuple[float, str, dict[str, tuple[Ranker, pl.DataFrame]]] | None = None
                scored: dict[str, dict[str, float]] = {}
                for refresh, frame in candidates[mode].items():
                    valid = rows_of(mode, "valid", frame)
                    fits: dict[str, tuple[Ranker, pl.DataFrame]] = {}
                    for name, cols, mask in plans:
                        rows = fitted_rows(rows_of(mode, "train", frame), mask)
                        fits[name] = (
                            train_ranker(rows, valid, cols, cfg.ranker, group_col="request_id"),
                            rows,
                        )
                    scored[refresh] = {n: _valid_auc(valid, r) for n, (r, _) in fits.items()}
                    if best is None or scored[refresh]["lgbm_full"] > best[0]:
                        best = (scored[refresh]["lgbm_full"], refresh, fits)
                assert best is not None
                _, pick, fits = best
                out[f"refresh.{mode}"] = {"chosen": pick, "validation_auc": scored}
                if len(scored) > 1:
                    log(
                        f"[rank] {mode}: training rows refreshed every {pick}, chosen on the "
                        "validation slice as served (lgbm_full AUC "
                        + ", ".join(f"{k} {v['lgbm_full']:.4f}" for k, v in scored.items())
                        + ")"
                    )
                valid = rows_of(mode, "valid", candidates[mode][pick])
                for name, _cols, mask in plans:
                    key = ranker_key(name, mode)
                    r, rows = fits[name]
                    r.save(work / f"{key}.selected")
                    shipped = (
                        refit_ranker(
                            pl.concat([rows, valid]), r, cfg.ranker, group_col="request_id"
                        )
                        if pc.refit
                        else r
                    )
                    shipped.save(work / key)
                    out[key] = {
                        "best_iteration": int(r.best_iteration),
                        "train_rows": rows.height,
                        "semantic_missing_before": encoder_at.isoformat() if mask else None,
                        "refit_rows": shipped.info.get("refit_rows"),
                        "importance": shipped.feature_importance().to_dicts(),
                        "history": r.history,
                    }
            return out

        st_rank = runner.run(
            "rank",
            {
                "features": st_feat.fingerprint,
                "ranker": cfg.section("ranker"),
                "columns": spec.columns,
                "plan": [tuned, pc.refit],
            },
            do_rank,
        )
        chosen = st_rank.summary[f"refresh.{BATCH}"]["chosen"]
        spec = dataclasses.replace(spec, refresh=chosen)
        frames = {m: candidates[m][st_rank.summary[f"refresh.{m}"]["chosen"]] for m in MODES}
        candidates.clear()  # the other periods' frames are not needed any more
        names = ("lgbm_full", "lgbm_behavioural")
        rankers = {
            m: {n: Ranker.load(st_rank.path / ranker_key(n, m)) for n in names} for m in MODES
        }
        selected = {
            m: {n: Ranker.load(st_rank.path / f"{ranker_key(n, m)}.selected") for n in names}
            for m in MODES
        }

        # 7. evaluate --------------------------------------------------------
        def do_evaluate(work: Path, _prev: Path | None) -> dict[str, Any]:
            modes: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                scores = _score_models(rows_of(mode, "test"), rankers[mode], spec, pc.seed)
                write_parquet(scores, work / _scores_file(mode))
                table = evaluation_table(scores, list(MODELS), versus=BASELINES).to_dicts()
                # validation: the models early stopping chose, on rows none of them trained on
                vscores = _score_models(rows_of(mode, "valid"), selected[mode], spec, pc.seed)
                diff, se = paired_difference(scores, "lgbm_full", "lgbm_behavioural")
                name, reason = ship_choice(
                    diff, se, pc.use_semantic, cfg.tracking.promote_margin_se, pc.ship
                )
                log(f"[evaluate] {mode}: ships {name}: {reason}")
                modes[mode] = {
                    "test": table,
                    "versus": table[0]["versus"],
                    "full_vs_behavioural": {"auc_diff": diff, "auc_diff_se": se},
                    "shipped_ranker": {"name": name, "reason": reason},
                    "freshness": freshness_note(
                        mode, spec, test_at, st_rank.summary[f"refresh.{mode}"]["validation_auc"]
                    ),
                    "validation": impression_metrics(vscores.rename({"lgbm_full": "score"})),
                }
            name = modes[BATCH]["shipped_ranker"]["name"]
            weight, tried = fit_prior_weight(
                logged, valid_at, selected[BATCH][name], ranker_spec(spec, name), cfg, vectors
            )
            if tried:
                log(f"[evaluate] lists: popularity weight {weight:g}, chosen at the validation "
                    f"cut-off (recall@{pc.top_n} " + ", ".join(
                        f"w {k} {v:.4f}" for k, v in tried.items()) + ")")  # fmt: skip
            lists = list_evaluation(
                logged, test_at, rankers[BATCH][name], ranker_spec(spec, name), cfg, vectors, log,
                prior_weight=weight,
            )  # fmt: skip
            lists["prior_weight_validation"] = tried
            summary = {
                **modes[BATCH],  # the headline: what the lists and an API without events serve
                ONLINE: modes[ONLINE],
                "lists": lists,
                "candidate_recall": {
                    f"recall@{r['k']} ({r['source']})": r["recall"] for r in lists["sources"]
                },
            }
            write_json(summary, work / "evaluation.json")
            return summary

        st_eval = runner.run(
            "evaluate",
            {
                "rank": st_rank.fingerprint,
                "pipeline": cfg.section("pipeline"),
                "rules": cfg.section("rules"),
                "ship_margin_se": cfg.tracking.promote_margin_se,
                "modes": list(MODES),
            },
            do_evaluate,
        )
        shutil.copy2(st_eval.path / "evaluation.json", run_dir / ".evaluation.json.tmp")
        os.replace(run_dir / ".evaluation.json.tmp", run_dir / "evaluation.json")

        # 8. bundle ----------------------------------------------------------
        shipped_name = st_eval.summary.get("shipped_ranker", {}).get("name", "lgbm_full")
        online_name = st_eval.summary[ONLINE]["shipped_ranker"]["name"]
        as_of = max(
            _as_time(t)
            for t in (data.impressions["ts"].max(), data.interactions["ts"].max())
            if t is not None
        ) + timedelta(microseconds=1)

        def do_bundle(work: Path, _prev: Path | None) -> dict[str, Any]:
            snapshot = build_snapshot(data, as_of, cfg.features)
            history = data.interactions.select("user_id", "item_id", "ts")
            ctx = list_context(logged, as_of, pc, vectors)
            popular = ctx.popularity
            manifest = {
                "config": cfg.to_params(),
                "data_fingerprint": data_fp,
                "encoder_id": st_emb.summary["item_vectors"]["encoder_id"],
                "metrics": {
                    "test": st_eval.summary["test"],
                    "validation": st_eval.summary["validation"],
                },
                "split": st_split.summary,
                "versions": _versions(),
                "model_version": f"{cfg.name}-{st_rank.fingerprint[:10]}",
                "ranker": st_eval.summary.get("shipped_ranker", {}),
                "online": {
                    "ranker": st_eval.summary[ONLINE]["shipped_ranker"],
                    "metrics": {"test": st_eval.summary[ONLINE]["test"]},
                },
                "lists": {
                    "half_life_days": ctx.cadence.half_life_days,
                    "live_window_days": ctx.cadence.live_window_days,
                    "quotas": pc.quotas,
                    "rules": cfg.section("rules"),
                    "prior_weight": st_eval.summary["lists"].get("prior_weight", 0.0),
                },
            }
            write_bundle(
                work / "bundle",
                encoder_dir=encoder_dir,
                vectors_path=st_emb.path / "item_vectors.parquet",
                frozen_vectors_path=st_emb.path / "item_vectors_frozen.parquet",
                snapshot=snapshot,
                history=history,
                popular=popular,
                ranker=rankers[BATCH][shipped_name],
                spec=ranker_spec(spec, shipped_name),
                online=(rankers[ONLINE][online_name], ranker_spec(online_spec, online_name)),
                manifest=manifest,
            )
            return {"as_of": as_of.isoformat(), "model_version": manifest["model_version"]}

        st_bundle = runner.run(
            "bundle", {"evaluate": st_eval.fingerprint, "embed": st_emb.fingerprint}, do_bundle
        )
        bundle_dir = st_bundle.path / "bundle"

        # 9. ranked lists ----------------------------------------------------
        def do_lists(work: Path, _prev: Path | None) -> dict[str, Any]:
            bundle = Bundle.load(bundle_dir)
            ctx = list_context(logged, as_of, pc, bundle.vectors)
            recs, short = ranked_lists(bundle, logged, ctx, cfg, log=log)
            write_parquet(recs, work / "recommendations.parquet")
            if short:
                log(f"[lists] {short} users have fewer than {pc.top_n} items (not enough "
                    "eligible candidates after the rules)")  # fmt: skip
            return {"users": recs["user_id"].n_unique(), "rows": recs.height, "short": short}

        st_lists = runner.run(
            "lists",
            {
                "bundle": st_bundle.fingerprint,
                "pipeline": cfg.section("pipeline"),
                "rules": cfg.section("rules"),
            },
            do_lists,
        )
        recs_path = run_dir / "recommendations.parquet"
        tmp = recs_path.with_name(f".{recs_path.name}.tmp")
        shutil.copy2(st_lists.path / "recommendations.parquet", tmp)
        os.replace(tmp, recs_path)

        def fill_version(folder: Path) -> None:  # the bundle with its lists, never edited again
            shutil.copytree(bundle_dir, folder, dirs_exist_ok=True)
            shutil.copy2(st_lists.path / "recommendations.parquet", folder)

        version = f"{st_bundle.summary['model_version']}-{st_lists.fingerprint[:8]}"
        published = publish_version(fill_version, run_dir / "bundles", version, pc.keep_bundles)
        log(f"[publish] {published.name}: {run_dir / 'bundles' / CURRENT} points at it")

        # 10. tracking and registry -----------------------------------------
        result = NightlyResult(
            run_dir=run_dir,
            config=cfg,
            stages=list(runner.results.values()),
            evaluation=st_eval.summary["test"],
            validation=st_eval.summary["validation"],
            candidate_recall=st_eval.summary["candidate_recall"],
            lists=st_eval.summary.get("lists", {}),
            freshness=st_eval.summary.get("freshness", ""),
            refresh=st_rank.summary[f"refresh.{BATCH}"],
            versus=st_eval.summary.get("versus", ""),
            full_vs_behavioural=st_eval.summary.get("full_vs_behavioural", {}),
            shipped_ranker=st_eval.summary.get("shipped_ranker", {}),
            online=st_eval.summary.get(ONLINE, {}),
            finetune=st_ft.summary,
            bundle_dir=published,
            recommendations=recs_path,
            mlflow_run_id=tracker.run_id,
            tracking_uri=uri,
        )
        cost = _cost_report(runner, st_ft, st_emb, encoder_dir)
        write_json(cost, run_dir / "cost.json")
        _log_to_tracker(tracker, result, st_ft, st_rank, cost, run_dir)
        if cfg.tracking.enabled and tracker.run_id:
            from experiments.registry import register_bundle

            result.registry = register_bundle(
                uri,
                cfg.tracking.model_name,
                published,
                run_id=tracker.run_id,
                validation=result.validation,
                validation_key=f"{data_fp}:{st_split.fingerprint}",
                primary_metric=cfg.tracking.primary_metric,
                gate_scores=lambda path: gate_scores(path, data, imp, spec.refresh),
                margin_se=cfg.tracking.promote_margin_se,
            )
            tracker.set_tags({"champion_decision": result.registry.get("reason", "")[:5000]})
            write_json(result.registry, run_dir / "registry.json")
    result.seconds = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------- pieces


class _null_cm:
    def __enter__(self) -> Tracker:
        return NullTracker()

    def __exit__(self, *exc: object) -> None:
        return None


def _popularity_column(frame: pl.DataFrame) -> pl.Series:
    """Popularity baseline: positive interactions (all time) before the impression, then clicks."""
    pop = frame["item_interactions_all"].fill_null(0).fill_nan(0).cast(pl.Float64)
    clicks = frame["item_clicks_all"].fill_null(0).fill_nan(0).cast(pl.Float64)
    return pop + 1e-3 * clicks


def _score_models(
    frame: pl.DataFrame, rankers: dict[str, Ranker], spec: FeatureSpec, seed: int
) -> pl.DataFrame:
    """impression_id, user_id, item_id, clicked and one score column per model in MODELS."""

    def cos(col: str) -> pl.Series:
        return frame[col].cast(pl.Float64).fill_nan(None).fill_null(-1.0)

    return frame.select(
        pl.col("request_id").alias("impression_id"), "user_id", "item_id", "clicked"
    ).with_columns(
        pl.Series("random", RandomScorer(seed=seed).score(frame)),
        _popularity_column(frame).alias("popularity"),
        _baseline_column(frame, spec, "ctr", ALL).alias("smoothed_ctr"),
        _baseline_column(frame, spec, "clicks", "24h").alias("recent_clicks"),
        cos("sem_cos_mean_frozen").alias("semantic_frozen"),
        cos("sem_cos_mean").alias("semantic_tuned"),
        *(
            pl.Series(name, r.predict(matrix(frame, list(r.feature_names))))
            for name, r in rankers.items()
        ),
    )


def _baseline_column(frame: pl.DataFrame, spec: FeatureSpec, stat: str, window: str) -> pl.Series:
    """item_<stat>_<window> as a score (the configured window nearest to `window` when it is
    not configured): smoothed CTR over all time, clicks in the last 24 hours."""
    windows = list(spec.config.windows)
    w = window if window in windows else windows[-1 if window == ALL else 0]
    return frame[f"item_{stat}_{w}"].cast(pl.Float64).fill_null(0.0).fill_nan(0.0)


def finetune_note(summary: dict[str, Any], method: str) -> str:
    """One line on what fine-tuning shipped: the chosen epoch, or the frozen fallback."""
    if method == "none":
        return "[finetune] method none: the frozen encoder"
    scores = summary.get("val_scores") or []
    shown = ", ".join(f"{x:.4f}" for x in scores)
    if summary.get("fell_back"):
        return (
            f"[finetune] no epoch beat the frozen encoder on validation (AUC per epoch, frozen "
            f"first: {shown}): the frozen encoder is used"
        )
    best = summary.get("best_epoch")
    return f"[finetune] shipped epoch {best} (validation AUC per epoch, frozen first: {shown})"


def freshness_note(
    mode: str, spec: FeatureSpec, cutoff: datetime, chosen_from: dict[str, Any] | None = None
) -> str:
    """Which feature freshness a mode's evaluation numbers assume (printed with its table);
    `chosen_from`: the candidate periods' validation scores, when the period was chosen."""
    if mode == ONLINE:
        return (
            "online: every test impression's features as of its own moment (what /v1/rank "
            "serves when POST /v1/events keeps the state fresh); the ranker trained the same way"
        )
    trained = (
        f"refreshed every {spec.refresh} (each row as of the start of its period)"
        if spec.refresh != ONLINE
        else "as of each row's moment"
    )
    if chosen_from and len(chosen_from) > 1:
        trained += (
            f", the period chosen among {', '.join(chosen_from)} on the validation rows as of "
            "the validation start"
        )
    return (
        f"batch: every test impression's features as of the cut-off {cutoff.isoformat()} "
        f"(what the nightly lists and an API without events serve); the ranker trained on "
        f"features {trained}"
    )


def _batch_moments(
    req: pl.DataFrame, imp: pl.DataFrame, spec: FeatureSpec, valid_at: datetime, cutoff: datetime
) -> pl.DataFrame:
    """`req` with ts moved to the moment its batch features describe: the cut-off for test rows,
    the validation start for validation rows (a bundle built then serves them), the start of the
    `spec.refresh` period for training rows."""
    utc = pl.Datetime("us", "UTC")
    moment = (
        pl.when(imp["split"] == "test")
        .then(pl.lit(cutoff, dtype=utc))
        .when(imp["split"] == "valid")
        .then(pl.lit(valid_at, dtype=utc))
        .otherwise(spec.at(pl.col("ts")))
    )
    return req.with_columns(moment.alias("ts"))


def _valid_auc(valid: pl.DataFrame, ranker: Ranker) -> float:
    """The mean per-impression AUC of `ranker` on the validation rows."""
    scores = valid.select(pl.col("request_id").alias("impression_id"), "clicked")
    return impression_metrics(scores.with_columns(pl.Series("score", ranker.predict(valid))))["auc"]


def ranker_key(name: str, mode: str) -> str:
    """The folder of a ranker in the rank stage: lgbm_full (batch), lgbm_full.online, ..."""
    return name if mode == BATCH else f"{name}.{mode}"


def _feature_file(mode: str, refresh: str) -> str:
    return f"features_{mode}.parquet" if mode == ONLINE else f"features_{mode}_{refresh}.parquet"


def _scores_file(mode: str) -> str:
    return "scores.parquet" if mode == BATCH else f"scores_{mode}.parquet"


def list_context(data: Dataset, as_of: datetime, pc: Any, vectors: ItemVectors | None) -> Any:
    return retrieval_context(
        data, as_of, vectors=vectors, max_history=pc.max_history,
        half_life_days=pc.popular_half_life_days, live_window_days=pc.live_window_days,
        ann_min_items=pc.ann_min_items,
    )  # fmt: skip


def ship_choice(
    auc_diff: float, auc_diff_se: float, use_semantic: bool, margin_se: float, ship: str = "auto"
) -> tuple[str, str]:
    """(the ranker to ship, why): `lgbm_full` only when its paired AUC gain over
    `lgbm_behavioural` on the gate slice (the test impressions) is more than `margin_se`
    standard errors; else the behavioural ranker, which needs no text encoder per request and
    is as good within the noise (fail closed: the more complex model must earn its place).
    `ship` (pipeline.ship) other than "auto" names the ranker to ship whatever the numbers."""
    if not use_semantic:
        return "lgbm_behavioural", "semantic features are off (pipeline.use_semantic = false)"
    gain = f"lgbm_full - lgbm_behavioural AUC {auc_diff:+.4f} (se {auc_diff_se:.4f})"
    if ship != "auto":
        return ship, f"pipeline.ship = {ship!r} ({gain})"
    if math.isfinite(auc_diff) and auc_diff > margin_se * auc_diff_se and auc_diff > 0:
        return "lgbm_full", f"{gain}, more than {margin_se:g} se"
    return "lgbm_behavioural", (
        f"{gain}, not more than {margin_se:g} se (tracking.promote_margin_se): the semantic "
        "half does not pay for itself on this data"
    )


def ranker_spec(spec: FeatureSpec, name: str) -> FeatureSpec:
    """The feature spec the named ranker reads: the behavioural ranker's has no semantic
    columns (so serving computes none per request)."""
    return spec if name == "lgbm_full" else dataclasses.replace(spec, use_semantic=False)


def list_evaluation(
    data: Dataset,
    test_at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    cfg: NightlyConfig,
    vectors: ItemVectors,
    log: Any,
    *,
    prior_weight: float = 0.0,
) -> dict[str, Any]:
    """The lists the nightly would have written at `test_at` (a bundle of the data before it,
    the same `build_lists`, blended with popularity by `prior_weight`), judged on what users
    consumed next, beside baseline lists. `data` holds logged impressions only (none
    sampled)."""
    pc = cfg.pipeline
    at = _lists_at(data, test_at, ranker, spec, cfg, vectors)
    if at is None:
        return {"table": [], "sources": [], "note": "no new consumption after the cut-off"}
    ctx, bundle, truth, horizon, users, known = at
    score = with_prior(bundle.score, ctx.popularity, prior_weight)
    res = build_lists(score, ctx, users, pc.quotas, n=pc.top_n, rules=cfg.rules, known=known)
    out = evaluate_lists(
        res, baseline_lists(ctx, users, pc.top_n), truth, ctx, n=pc.top_n, horizon_days=horizon,
        known=known,
    )  # fmt: skip
    out["prior_weight"] = prior_weight
    log(f"[evaluate] lists: {out['note']}")
    return out


def _lists_at(
    data: Dataset,
    at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    cfg: NightlyConfig,
    vectors: ItemVectors,
) -> tuple[Any, Bundle, pl.DataFrame, float, pl.Series, pl.Series] | None:
    """What judging lists made at `at` needs: (retrieval context, a bundle of the data before
    it, the truth after it, its horizon in days, the truth users, the known users); None when
    nobody consumed anything new after `at`."""
    pc = cfg.pipeline
    before = _before(data, at)
    ctx = list_context(before, at, pc, vectors)
    horizon = list_horizon(ctx.cadence, pc.list_horizon_days)
    truth = truth_after(data, at, horizon)
    if truth.height == 0:
        return None
    bundle = Bundle(
        Path("."), {"model_version": "evaluation"}, spec, ranker,
        build_snapshot(before, at, cfg.features), vectors,
        before.interactions.select("user_id", "item_id", "ts"), ctx.popularity,
    )  # fmt: skip
    return ctx, bundle, truth, horizon, truth["user_id"].unique().sort(), _known_users(before)


def fit_prior_weight(
    data: Dataset,
    valid_at: datetime,
    ranker: Ranker,
    spec: FeatureSpec,
    cfg: NightlyConfig,
    vectors: ItemVectors,
) -> tuple[float, dict[str, float]]:
    """The lists' popularity weight: `pipeline.list_prior_weight` if set, else the one of
    PRIOR_WEIGHTS whose lists made at the validation cut-off (with `ranker`, which trained on
    rows before it) find the most of what users consumed next (ties: the smaller weight).
    Returns (weight, {weight: recall@top_n} of those tried)."""
    pc = cfg.pipeline
    if pc.list_prior_weight is not None:
        return pc.list_prior_weight, {}
    at = _lists_at(data, valid_at, ranker, spec, cfg, vectors)
    if at is None:
        return 0.0, {}
    ctx, bundle, truth, _, users, known = at
    cached = ScoreCache(bundle.score)  # the candidates repeat: each pair is scored once
    recall = {}
    for w in PRIOR_WEIGHTS:
        res = build_lists(with_prior(cached, ctx.popularity, w), ctx, users, pc.quotas,
                          n=pc.top_n, rules=cfg.rules, known=known)  # fmt: skip
        recall[f"{w:g}"] = list_metrics(
            res.lists, truth, pc.top_n, catalogue_size=ctx.items.height
        )[f"recall@{pc.top_n}"]
    best = max(PRIOR_WEIGHTS, key=lambda w: (recall[f"{w:g}"], -w))
    return best, recall


def bundle_prior_weight(bundle: Bundle) -> float:
    """The popularity weight a bundle's lists use (0 for bundles written before it existed)."""
    return float(bundle.manifest.get("lists", {}).get("prior_weight", 0.0))


def _known_users(data: Dataset) -> pl.Series:
    """Users the bundle of `data` knows (a history or impressions): the API ranks them with
    the ranker, and the popularity prior ranks everyone else."""
    return pl.concat([data.interactions["user_id"], data.impressions["user_id"]]).unique()


def ranked_lists(
    bundle: Bundle, data: Dataset, ctx: Any, cfg: NightlyConfig, *, log: Any = print
) -> tuple[pl.DataFrame, int]:
    """Top-N per active user through the bundle (the same loader and features as the API):
    candidates from every retrieval source among the live items, minus what the user
    consumed, then the business rules. Returns (lists, users with a short list)."""
    from tqdm import tqdm

    pc = cfg.pipeline
    active = (
        pl.concat([data.interactions.select("user_id"), data.impressions.select("user_id")])
        .unique()
        .sort("user_id")["user_id"]
    )
    bar = tqdm(total=active.len(), desc="ranked lists", unit="users", disable=None)

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    try:
        score = with_prior(bundle.score, ctx.popularity, bundle_prior_weight(bundle))
        res = build_lists(
            score, ctx, active, pc.quotas, n=pc.top_n, rules=cfg.rules,
            known=_known_users(data), progress=progress, keep_candidates=False,
        )  # fmt: skip
    finally:
        bar.close()
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


def gate_scores(
    bundle_path: str | os.PathLike[str], data: Dataset, imp: pl.DataFrame, refresh: str
) -> pl.DataFrame:
    """A bundle's ranker scores on the promotion gate's slice, the test split of `imp`
    (impression_id, clicked, score), with features at freshness `refresh` whatever the bundle
    was trained for, so that champion and challenger are compared as they would be served."""
    bundle = Bundle.load(bundle_path)
    spec = dataclasses.replace(bundle.spec, refresh=refresh)
    rows = imp.filter(pl.col("split") == "test")
    frame = point_in_time_frame(
        spec, _requests(rows), data, bundle.vectors if spec.use_semantic else None
    )
    scores = bundle.ranker.predict(matrix(frame, spec.columns))
    return rows.select("impression_id", "clicked").with_columns(pl.Series("score", scores))


def evaluate_bundle(
    data_dir: str | os.PathLike[str],
    bundle_path: str | os.PathLike[str],
    *,
    split_at: str | None = None,
    log: Any = print,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """A bundle on a dataset's test split (`recsys evaluate`), with the bundle's config:
    ({mode: evaluation table} for batch (features as of the split, the bundle's ranker) and
    online (as of each impression, its online ranker), the quality of the lists its nightly
    would write at the split)."""
    bundle = Bundle.load(bundle_path)
    v = validate_dataset(read_dataset(data_dir))
    data = Dataset.from_validated(v)
    logged = data
    if data.impressions.height == 0:
        pc = load_config(None).pipeline
        data = Dataset(
            data.items,
            data.interactions,
            impressions_from_interactions(
                data.interactions, data.items, negatives=pc.sampled_negatives,
                max_impressions=MAX_SAMPLED_IMPRESSIONS, seed=pc.seed,
                popular_share=pc.sampled_popular_share,
            ),
        )  # fmt: skip
    test_at = _parse_time(split_at or bundle.manifest["split"]["test_at"])
    rows = data.impressions.filter(pl.col("ts") >= test_at)
    if rows.height == 0:
        raise ConfigError(
            f"no impressions at or after {test_at.isoformat()} in {data_dir}; pass an earlier "
            "--split-at"
        )
    req = _requests(rows)
    heads = {
        BATCH: (bundle.spec, bundle.ranker, req.with_columns(
            pl.lit(test_at, dtype=pl.Datetime("us", "UTC")).alias("ts"))),
        ONLINE: (bundle.online_spec or bundle.spec, bundle.online_ranker or bundle.ranker, req),
    }  # fmt: skip
    tables = {}
    for mode, (spec, ranker, at) in heads.items():
        online = dataclasses.replace(spec, refresh=ONLINE)  # `at` holds the moments already
        frame = point_in_time_frame(online, at, data, bundle.vectors if spec.use_semantic else None)
        scores = rows.select("impression_id", "user_id", "item_id", "clicked").with_columns(
            pl.Series("random", RandomScorer(seed=0).score(frame)),
            _popularity_column(frame).alias("popularity"),
            _baseline_column(frame, spec, "ctr", ALL).alias("smoothed_ctr"),
            _baseline_column(frame, spec, "clicks", "24h").alias("recent_clicks"),
            pl.Series("bundle", ranker.predict(matrix(frame, spec.columns))),
        )
        models = [*BASELINES, "bundle"]
        tables[mode] = evaluation_table(scores, models, versus=BASELINES).to_dicts()
    cfg = _bundle_config(bundle)
    lists = list_evaluation(logged, test_at, bundle.ranker, bundle.spec, cfg, bundle.vectors, log,
                            prior_weight=bundle_prior_weight(bundle))  # fmt: skip
    return tables, lists


def _bundle_config(bundle: Bundle) -> NightlyConfig:
    """The nightly config a bundle was built with (its manifest's flat params), defaults for
    what an older bundle did not record."""
    flat = bundle.manifest.get("config", {})
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = value
    base = load_config(None)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        cur = getattr(base, f.name)
        if dataclasses.is_dataclass(cur) and f.name in sections:
            names = {g.name for g in dataclasses.fields(cur)}
            kw = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in sections[f.name].items() if k in names}  # fmt: skip
            out[f.name] = dataclasses.replace(cur, **kw)  # type: ignore[type-var]
    return dataclasses.replace(base, **out)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("recsys", "torch", "transformers", "peft", "lightgbm", "polars", "pyarrow", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _cost_report(
    runner: StageRunner, st_ft: StageResult, st_emb: StageResult, encoder_dir: Path
) -> dict[str, Any]:
    emb = st_emb.summary.get("item_vectors", {})
    runs = [e for e in st_emb.summary.values() if isinstance(e, dict) and "reused_from" not in e]
    workers = {  # Ray worker processes: fine-tune workers, embed actors
        "finetune": (st_ft.summary.get("worker_cpu_seconds"), st_ft.summary.get("peak_rss_mb")),
        "embed": (
            sum(e.get("worker_cpu_seconds", 0.0) for e in runs) if runs else None,
            max((e.get("worker_peak_rss_mb", 0) for e in runs), default=None),
        ),
    }
    stages: dict[str, dict[str, Any]] = {}
    for name, r in runner.results.items():
        row: dict[str, Any] = {
            "wall_seconds": round(r.seconds, 3),
            "driver_cpu_seconds": round(r.cpu_seconds, 3),
            "skipped": r.skipped,
        }
        cpu, rss = workers.get(name, (None, None))
        if cpu is not None and not r.skipped:
            row["worker_cpu_seconds"] = round(float(cpu), 3)
            row["worker_peak_rss_mb"] = rss
        stages[name] = row
    return {
        "stages": stages,
        "gpu_seconds": 0.0
        if "cuda" not in str(st_ft.summary.get("device", ""))
        else st_ft.summary.get("seconds", 0.0),
        "finetune_device": st_ft.summary.get("device"),
        "trainable_params": st_ft.summary.get("trainable_params"),
        "total_params": st_ft.summary.get("total_params"),
        "encoder_dir_mb": round(_dir_mb(encoder_dir), 3),
        "items_embedded": emb.get("embedded"),
        "items_reused": emb.get("reused"),
        "embed_device": emb.get("device"),
        "note": "driver CPU seconds are this process's; worker CPU seconds and peak RSS are the "
        "Ray workers' (fine-tune workers, embed actors); wall seconds are per stage",
    }


def _log_to_tracker(
    tracker: Tracker,
    result: NightlyResult,
    st_ft: StageResult,
    st_rank: StageResult,
    cost: dict[str, Any],
    run_dir: Path,
) -> None:
    from experiments.plots import plot_importance, plot_training_curves

    for prefix, table in (("test", result.evaluation),
                          ("test_online", result.online.get("test", []))):  # fmt: skip
        for row in table:
            model = row["model"]
            tracker.log_metrics(
                {f"{prefix}.{model}.{k}": v for k, v in row.items() if isinstance(v, int | float)}
            )
    if result.online:
        tracker.set_tags(
            {
                "evaluation_online.freshness": result.online["freshness"],
                "ranker_online.shipped": result.online["shipped_ranker"]["name"],
            }
        )
        tracker.log_metrics(
            {
                f"test_online.full_vs_behavioural.{k}": v
                for k, v in result.online["full_vs_behavioural"].items()
            }
        )
    tracker.log_metrics({f"valid.{k}": v for k, v in result.validation.items()})
    tracker.set_tags({"evaluation.freshness": result.freshness,
                      "evaluation.versus": result.versus})  # fmt: skip
    tracker.log_metrics({f"test.full_vs_behavioural.{k}": v
                         for k, v in result.full_vs_behavioural.items()})  # fmt: skip
    if result.shipped_ranker:
        shipped = result.shipped_ranker
        tracker.set_tags({"ranker.shipped": shipped["name"],
                          "ranker.shipped_reason": shipped["reason"][:5000]})  # fmt: skip
    tracker.log_metrics({f"candidates.{k}": v for k, v in result.candidate_recall.items()})
    refresh = st_rank.summary[f"refresh.{BATCH}"]
    tracker.set_tags({"ranker.refresh": refresh["chosen"]})
    for period, aucs in refresh["validation_auc"].items():
        tracker.log_metrics({f"valid_refresh.{period}.{n}.auc": v for n, v in aucs.items()})
    for row in result.lists.get("table", []):
        tracker.log_metrics({f"lists.{row['list']}.{k}": v for k, v in row.items()
                             if isinstance(v, int | float)})  # fmt: skip
    for row in result.lists.get("sources", []):
        src = f"retrieval.{row['source']}"
        tracker.log_metrics({f"{src}.recall": row["recall"],
                             f"{src}.ms_per_user": row["ms_per_user"]})  # fmt: skip
    if "prior_weight" in result.lists:
        tracker.log_metrics({"lists.prior_weight": result.lists["prior_weight"]})
        for w, recall in result.lists.get("prior_weight_validation", {}).items():
            tracker.log_metrics({f"valid_lists.prior_weight_{w}.recall": recall})
    if result.lists.get("ceiling"):
        ceiling = result.lists["ceiling"]
        tracker.log_metrics({"lists.ceiling.recall": ceiling["recall"],
                             "lists.ceiling.cold_share": ceiling["cold_share"]})  # fmt: skip
    if result.lists.get("note"):
        tracker.set_tags({"lists.evaluation": result.lists["note"]})
    for i, loss in enumerate(st_ft.summary.get("losses", [])):
        tracker.log_metrics({"finetune.loss": loss}, step=i + 1)
    hist = st_rank.summary.get("lgbm_full", {}).get("history", {})
    for metric, values in _flatten_history(hist).items():
        for i in range(0, len(values), max(1, len(values) // 200)):
            tracker.log_metrics({f"ranker.{metric}": values[i]}, step=i + 1)
    for name, r in cost["stages"].items():
        tracker.log_metrics({f"seconds.{name}": r["wall_seconds"],
                             f"cpu_seconds.{name}": r["driver_cpu_seconds"]
                             + r.get("worker_cpu_seconds", 0.0)})  # fmt: skip
    art = run_dir / "artifacts"
    art.mkdir(exist_ok=True)
    plot_importance(st_rank.summary["lgbm_full"]["importance"], art / "feature_importance.png")
    plot_training_curves(st_ft.summary.get("losses", []), hist, art / "training_curves.png")
    write_json(cost, art / "cost_report.json")
    write_json({"test": result.evaluation, "test_online": result.online.get("test", []),
                "validation": result.validation,
                "candidate_recall": result.candidate_recall, "lists": result.lists},
               art / "evaluation.json")  # fmt: skip
    tracker.log_artifact(art)
    tracker.log_artifact(run_dir / "recommendations.parquet", artifact_path="lists")


def _flatten_history(hist: Any) -> dict[str, list[float]]:
    """LightGBM eval history {dataset: {metric: [..]}} (or {metric: [..]}) -> {name: [..]}."""
    out: dict[str, list[float]] = {}
    if not isinstance(hist, dict):
        return out
    for k, v in hist.items():
        if isinstance(v, dict):
            for m, vals in v.items():
                out[f"{k}.{m}".replace("@", "_at_")] = [float(x) for x in vals]
        elif isinstance(v, list):
            out[str(k).replace("@", "_at_")] = [float(x) for x in v]
    return out


def print_summary(result: NightlyResult, *, show_users: int = 3) -> None:
    """The short table of results each run ends with."""
    from recsys.cli import print_table

    print_table(
        [
            {"stage": s.name, "status": "reused" if s.skipped else "ran", "seconds": s.seconds}
            for s in result.stages
        ],
        f"Nightly run {result.run_dir} ({result.config.name}) in {result.seconds:.1f}s",
    )
    order = ["model", "auc", "auc_diff", "auc_diff_se", "mrr", "ndcg@5", "ndcg@10", "n_impressions"]
    modes = [
        (BATCH, result.evaluation, result.versus, result.freshness, result.full_vs_behavioural,
         result.shipped_ranker),
    ]  # fmt: skip
    if result.online:
        o = result.online
        modes.append((ONLINE, o["test"], o["versus"], o["freshness"], o["full_vs_behavioural"],
                      o["shipped_ranker"]))  # fmt: skip
    for mode, table, versus, freshness, fb, shipped in modes:
        rows = [{k: r[k] for k in order if k in r} for r in table]
        rows = [
            {("auc - " + versus if k == "auc_diff" and versus else k): v for k, v in r.items()}
            for r in rows
        ]
        print_table(
            rows,
            f"Evaluation on the test split, {mode} features (per impression, averaged; "
            f"auc_diff_se: standard error of the paired difference)\n{freshness}",
        )
        if fb:
            print(
                f"{mode}: lgbm_full - lgbm_behavioural: AUC {fb['auc_diff']:+.4f} "
                f"(paired standard error {fb['auc_diff_se']:.4f})"
            )
        if shipped:
            print(f"{mode}: shipped ranker {shipped['name']} ({shipped['reason']})")
    print(finetune_note(result.finetune, result.config.finetune.method))
    lists = result.lists
    if lists.get("sources"):
        print_table(
            lists["sources"],
            "Candidate retrieval by source (recall of the test positives; the union is what "
            "the ranker sees)",
        )
    if lists.get("table"):
        n = result.config.pipeline.top_n
        cols = ["list", f"recall@{n}", "recall_diff", "recall_diff_se", f"ndcg@{n}", "ndcg_diff",
                "ndcg_diff_se", "coverage", "novelty", "intra_list_sim", "users"]  # fmt: skip
        print_table(
            [{k: r[k] for k in cols if k in r} for r in lists["table"]],
            f"Ranked lists (top {n}; diffs: paired over users, versus {lists.get('versus')}; "
            f"lgbm_lists: the ranker blended with popularity at weight "
            f"{lists.get('prior_weight', 0.0):g})\n"
            f"{lists.get('note', '')}",
        )
        if lists.get("table_known"):
            print_table(
                [{k: r[k] for k in cols if k in r} for r in lists["table_known"]],
                "The same over the users known at the cut-off (the others get popular lists)",
            )
        if lists.get("short_lists"):
            print(f"{lists['short_lists']} users got fewer than {n} items")
    if result.registry:
        print(f"\nRegistry: {result.registry.get('reason')}")
    recs = pl.read_parquet(result.recommendations)
    titles = pl.read_parquet(result.run_dir / "validate" / "items.parquet").select(
        "item_id", "title"
    )
    users = recs["user_id"].unique(maintain_order=True).head(show_users).to_list()
    for u in users:
        top = recs.filter(pl.col("user_id") == u).head(5).join(titles, on="item_id", how="left")
        print_table(
            [
                {"rank": r["rank"], "item_id": r["item_id"], "score": r["score"],
                 "title": (r["title"] or "")[:60]}
                for r in top.sort("rank").to_dicts()
            ],
            f"Top 5 for {u}",
        )  # fmt: skip
    print(f"\nRanked lists: {result.recommendations}  bundle: {result.bundle_dir}")
    if result.mlflow_run_id:
        print(
            f"MLflow run {result.mlflow_run_id}: "
            f"mlflow ui --backend-store-uri {result.tracking_uri}"
        )
    print(json.dumps({"seconds": round(result.seconds, 1)}))
