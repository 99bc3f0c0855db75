"""The nightly pipeline: validate -> split -> fine-tune -> embed -> features -> rank -> evaluate
-> bundle -> ranked lists -> publish -> register.

Every stage is a function (`prepare`, `train`, `ship`) run by `pipelines.stages.StageRunner`:
it writes into its own folder under the run directory, atomically, keyed on a fingerprint of
the arguments it is given, so a rerun skips unchanged stages and a killed run resumes and ends
with the same lists. Fine-tuning (Ray Train) and embedding (Ray Data) are Ray jobs; the
polars/LightGBM stages run in process, where they already use every core of the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from experiments.config import NightlyConfig, load_config
from experiments.runlog import log_nightly
from experiments.tracking import MlflowTracker, NullTracker, Tracker, default_tracking_uri
from recsys.data import dataset_fingerprint, read_dataset
from recsys.errors import ConfigError
from recsys.evaluation import BATCH, finetune_note, gate_scores
from recsys.featurize import FeatureSpec
from recsys.io import CURRENT, publish_version, write_json
from recsys.lists import ListSettings

from . import prepare, ship, train
from .cost import cost_report
from .stages import StageEnv, StageResult, StageRunner, to_json


@dataclass
class NightlyResult:
    run_dir: Path
    config: NightlyConfig
    stages: list[StageResult[Any]]
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


def feature_spec(cfg: NightlyConfig) -> FeatureSpec:
    """The ranker's features as configured (refresh: the first candidate period; the rank
    stage chooses among them)."""
    pc = cfg.pipeline
    return FeatureSpec(
        cfg.features, pc.use_semantic, pc.max_history, pc.half_life_days, pc.stable_features,
        pc.refreshes[0],
    )  # fmt: skip


def list_settings(cfg: NightlyConfig) -> ListSettings:
    pc = cfg.pipeline
    return ListSettings(
        top_n=pc.top_n, quotas=pc.quotas, rules=cfg.rules, features=cfg.features,
        max_history=pc.max_history, popular_half_life_days=pc.popular_half_life_days,
        live_window_days=pc.live_window_days, ann_min_items=pc.ann_min_items,
        horizon_days=pc.list_horizon_days, prior_weight=pc.list_prior_weight,
    )  # fmt: skip


def run_nightly(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config_path: str | os.PathLike[str] | None = None,
    config: NightlyConfig | None = None,
    split_at: str | datetime | None = None,
    ray_address: str | None = None,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> NightlyResult:
    """Run (or resume) the nightly pipeline on a dataset directory; see the module docstring."""
    t_start = time.perf_counter()
    ray_was_up = _ray_up()
    cfg = config or load_config(None if config_path is None else Path(config_path))
    run_dir, pc = Path(out_dir), cfg.pipeline
    run_dir.mkdir(parents=True, exist_ok=True)
    cut = split_at.isoformat() if isinstance(split_at, datetime) else split_at
    with _run_lock(run_dir), _tracking(cfg, run_dir, tracking_uri) as (tracker, uri):
        source = _source(Path(data_dir))
        tracker.log_params({**cfg.to_params(), "data_dir": str(data_dir), "split_at": str(cut)})
        runner = StageRunner(
            run_dir, StageEnv(log, tracker, ray_address, uri, pc.chunk_rows, pc.storage)
        )
        run = runner.run
        valid = run("validate", prepare.validate, source=source, negatives=pc.sampled_negatives,
                    seed=pc.seed, popular_share=pc.sampled_popular_share)  # fmt: skip
        _check_rules(cfg, valid, log)
        times = run("split", prepare.split, validated=valid, split_at=cut,
                    test_fraction=pc.test_fraction, valid_fraction=pc.valid_fraction,
                    encoder_fraction=pc.encoder_fraction)  # fmt: skip
        _log_split(valid, times, log)
        tuned = run("finetune", train.finetune, validated=valid, split=times, config=cfg.finetune)
        log(finetune_note(to_json(tuned.summary), cfg.finetune.method))
        use_tuned = tuned.summary.tuned and pc.use_semantic
        # a tuned encoder: the full ranker also reads the frozen encoder's cosines
        spec = dataclasses.replace(
            feature_spec(cfg), frozen_semantic=use_tuned and pc.frozen_semantic
        )
        vecs = run("embed", train.embed, validated=valid, finetuned=tuned, config=cfg.encoder)
        if ray_address is None and not ray_was_up:
            _stop_local_ray(log)  # nothing after the embedding needs Ray on one machine
        frames = run("features", train.features, validated=valid, split=times, embedded=vecs,
                     spec=spec, refreshes=pc.refreshes)  # fmt: skip
        ranked = run("rank", train.rank, frames=frames, split=times, spec=spec,
                     config=cfg.ranker, tuned=use_tuned, refit=pc.refit)  # fmt: skip
        lists = list_settings(cfg)
        gate = (pc.use_semantic, cfg.tracking.promote_margin_se, pc.ship)
        ev = run("evaluate", ship.evaluate, validated=valid, split=times, embedded=vecs,
                 frames=frames, ranked=ranked, spec=spec, seed=pc.seed, ship=gate,
                 lists=lists)  # fmt: skip
        _copy_atomic(ev.path / "evaluation.json", run_dir / "evaluation.json")
        bundled = run("bundle", ship.bundle, validated=valid, split=times, finetuned=tuned,
                      embedded=vecs, ranked=ranked, evaluation=ev, spec=spec,
                      features=cfg.features, lists=lists, params=cfg.to_params(),
                      data_fingerprint=source.fingerprint)  # fmt: skip
        listed = run("lists", ship.lists, validated=valid, bundled=bundled, settings=lists)
        recs = _copy_atomic(
            listed.path / "recommendations.parquet", run_dir / "recommendations.parquet"
        )
        published = _publish(run_dir, bundled, listed, pc.keep_bundles, log)
        result = _result(cfg, runner, published, recs, tracker.run_id, uri)
        cost = cost_report(runner.results, tuned.path / "encoder")
        write_json(cost, run_dir / "cost.json")
        log_nightly(tracker, ev.summary.report(), to_json(ranked.summary), to_json(tuned.summary),
                    cost, run_dir)  # fmt: skip
        chosen = ranked.summary.refresh[BATCH].chosen
        result.registry = _register(cfg, uri, tracker, published, result, valid, times, chosen,
                                    source.fingerprint)  # fmt: skip
    result.seconds = time.perf_counter() - t_start
    return result


def _ray_up() -> bool:
    import ray

    return bool(ray.is_initialized())


def _stop_local_ray(log: Callable[[str], None]) -> None:
    """Shut down the local Ray this run started (its GCS, raylet and idle workers hold about a
    gigabyte that the stages after the embedding would otherwise carry)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
        log("[ray] the local Ray is shut down: the remaining stages run in this process")


def _source(data_dir: Path) -> prepare.DataSource:
    fingerprint = dataset_fingerprint(data_dir) if data_dir.is_dir() else ""
    if not fingerprint:
        read_dataset(data_dir)  # raises the DataError naming what is missing
    return prepare.DataSource(data_dir, fingerprint)


def _check_rules(cfg: NightlyConfig, valid: StageResult[prepare.Validated], log: Any) -> None:
    """Rules naming items or categories the catalogue lacks fail before any training."""
    items = prepare.read_tables(valid.path).items
    rules = cfg.rules
    if rules.exclude_items or rules.exclude_categories:
        cats = items["category"].drop_nulls().unique().to_list()
        rules.check(items["item_id"].to_list(), cats, where="config [rules]")
    if valid.summary.rejects:
        log(f"[validate] {valid.summary.rejects} rows set aside in {valid.path}/rejects.parquet")


def _log_split(
    valid: StageResult[prepare.Validated], times: StageResult[prepare.Split], log: Any
) -> None:
    imp = prepare.labelled(prepare.read_tables(valid.path).impressions, times.summary)
    counts = imp["split"].value_counts()
    n = dict(zip(counts["split"].to_list(), counts["count"].to_list(), strict=True))
    log(
        f"[split] encoder tuned on impressions before {times.summary.encoder_at.isoformat()}; "
        + ", ".join(f"{s}: {n.get(s, 0)} rows" for s in ("train", "valid", "test"))
    )


def _copy_atomic(src: Path, dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    return dest


def _publish(
    run_dir: Path,
    bundled: StageResult[ship.Bundled],
    listed: StageResult[ship.Listed],
    keep: int,
    log: Any,
) -> Path:
    """The bundle with its lists as an immutable version in RUN_DIR/bundles, `current` at it."""

    def fill(folder: Path) -> None:
        shutil.copytree(bundled.path / "bundle", folder, dirs_exist_ok=True)
        shutil.copy2(listed.path / "recommendations.parquet", folder)

    version = f"{bundled.summary.model_version}-{listed.fingerprint[:8]}"
    published = publish_version(fill, run_dir / "bundles", version, keep)
    log(f"[publish] {published.name}: {run_dir / 'bundles' / CURRENT} points at it")
    return published


def _result(
    cfg: NightlyConfig,
    runner: StageRunner,
    published: Path,
    recs: Path,
    run_id: str | None,
    uri: str,
) -> NightlyResult:
    done = runner.results
    ev: ship.Evaluation = done["evaluate"].summary
    batch = ev.batch
    return NightlyResult(
        run_dir=runner.run_dir,
        config=cfg,
        stages=list(done.values()),
        evaluation=batch.test,
        validation=batch.validation,
        candidate_recall=ev.candidate_recall,
        lists=ev.lists,
        freshness=batch.freshness,
        refresh=to_json(done["rank"].summary.refresh[BATCH]),
        versus=batch.versus,
        full_vs_behavioural=batch.full_vs_behavioural,
        shipped_ranker=batch.shipped_ranker,
        online=to_json(ev.online),
        finetune=to_json(done["finetune"].summary),
        bundle_dir=published,
        recommendations=recs,
        mlflow_run_id=run_id,
        tracking_uri=uri,
    )


def _register(
    cfg: NightlyConfig,
    uri: str,
    tracker: Tracker,
    published: Path,
    result: NightlyResult,
    valid: StageResult[prepare.Validated],
    times: StageResult[prepare.Split],
    refresh: str,
    data_fingerprint: str,
) -> dict[str, Any]:
    """Register the published bundle (RUN_DIR/registry.json) when tracking is on; it becomes
    champion only if it beats the champion on the gate slice (the test impressions, features
    at the shipped freshness)."""
    from experiments.registry import register_bundle

    if not (cfg.tracking.enabled and tracker.run_id):
        return {}
    data = prepare.read_tables(valid.path)
    imp = prepare.labelled(data.impressions, times.summary)
    chunks = cfg.pipeline.chunk_rows
    registry = register_bundle(
        uri,
        cfg.tracking.model_name,
        published,
        run_id=str(tracker.run_id),
        validation=result.validation,
        validation_key=f"{data_fingerprint}:{times.fingerprint}",
        primary_metric=cfg.tracking.primary_metric,
        gate_scores=lambda path: gate_scores(path, data, imp, refresh, chunk_rows=chunks),
        margin_se=cfg.tracking.promote_margin_se,
    )
    tracker.set_tags({"champion_decision": registry.get("reason", "")[:5000]})
    write_json(registry, published.parent.parent / "registry.json")
    return registry


@contextlib.contextmanager
def _tracking(
    cfg: NightlyConfig, run_dir: Path, tracking_uri: str | None
) -> Iterator[tuple[Tracker, str]]:
    """The run's tracker and its URI: an MLflow run, or a tracker that records nothing."""
    if not cfg.tracking.enabled:
        yield NullTracker(), ""
        return
    uri = tracking_uri or default_tracking_uri(
        run_dir.parent if run_dir.parent != Path("") else "."
    )
    tags = {"config": cfg.name}
    with MlflowTracker.start(uri, cfg.tracking.experiment, run_name=f"nightly-{cfg.name}",
                             tags=tags) as tracker:  # fmt: skip
        yield tracker, uri


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
