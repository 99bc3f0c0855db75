"""The `finetune` job: `recsys.encoder.loop.fit` inside Ray Train workers.

    report = run_finetune(dataset, "out/encoder", FinetuneConfig())

The driver builds the examples (pure polars) and puts them in the object store; each worker
loads the base model, wraps it for its method (LoRA/full), shards the examples by rank and runs
the same `fit` the tests run in process (DistributedDataParallel when num_workers > 1, with a
torch.distributed reducer for what `fit` shares itself; CUDA when Ray sees GPUs). Before
training and after each epoch, rank 0 scores the held-out latest time slice (validation AUC of
the semantic score); `fit` restores the best epoch's weights, and rank 0 reports them as the
one checkpoint, copied to `out_dir`. When no epoch beats the frozen
weights, `out_dir` gets the frozen encoder and the report says it fell back.

method "none" trains nothing and starts no Ray: it writes an encoder directory that refers to
the base model, so downstream code always gets an encoder directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train

from experiments.tracking import MlflowRunTracker
from pipelines.ray_utils import cluster_cpus, cluster_gpus, init_ray, node_cpus
from recsys.data import Dataset
from recsys.encoder.callbacks import Callback, EpochEnd, ProgressLines, TrackSteps
from recsys.encoder.config import FinetuneConfig
from recsys.encoder.loop import NO_EXAMPLES, fit
from recsys.encoder.model import check_model_dir, default_model_path
from recsys.encoder.store import install_dir, save_encoder
from recsys.encoder.tokens import TokenCache
from recsys.encoder.trainable import build_model, count_params, layer_cache
from recsys.encoder.trainer import prepare_examples
from recsys.encoder.validation import evaluate, validation_score
from recsys.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    """What a fine-tuning run produced.

    losses: mean training loss per epoch; step_losses: every step's loss; val_metrics: the last
    epoch's validation metrics (val_auc, val_mrr, val_examples; empty for method "none");
    epochs: every epoch's payload (`EpochEnd`); device: where training ran ("cpu x1", "cuda x2").
    val_scores: validation AUC before training (index 0) and after each epoch; best_epoch: the
    epoch shipped (0 = none beat the frozen encoder: fell_back, the frozen encoder is written).
    """

    encoder_dir: Path
    losses: list[float]
    val_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    seconds: float
    device: str
    step_losses: list[float] = field(default_factory=list)
    epochs: list[EpochEnd] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    val_scores: list[float] = field(default_factory=list)
    best_epoch: int = 0
    fell_back: bool = False
    peak_rss_mb: float = 0.0  # of the rank-0 training worker process
    worker_cpu_seconds: float = 0.0  # CPU time of the training worker processes, summed


class _Workers:
    """The `Reducer` `fit` gets in a Ray Train worker: torch.distributed across the workers
    (nothing to do with one worker or no process group)."""

    def __init__(self, world: int) -> None:
        self.world = world

    def _on(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def average(self, tensors: Sequence[Any]) -> None:
        import torch.distributed as dist

        if self._on():
            for t in tensors:
                dist.all_reduce(t)
                t /= self.world

    def broadcast(self, tensor: Any) -> None:
        import torch.distributed as dist

        if self._on():
            dist.broadcast(tensor, src=0)


def _callbacks(cfg: dict[str, Any]) -> list[Callback]:
    """Rank 0's: progress lines for the driver (a Ray queue it prints from) and step metrics
    to the MLflow run the driver named, every 10 steps."""
    out: list[Callback] = []
    if cfg.get("progress") is not None:
        out.append(ProgressLines(cfg["progress"].put_nowait, every=10))
    if cfg.get("mlflow"):
        uri, run_id = cfg["mlflow"]
        out.append(TrackSteps(MlflowRunTracker(uri, run_id), every=10))
    return out


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker body: build the model, `fit` (best epoch by validation restored), then
    one final report whose checkpoint (rank 0) holds the chosen weights and every epoch's
    payload (epochs.json)."""
    import torch
    from ray import train
    from ray.train import torch as ray_torch

    config: FinetuneConfig = cfg["config"]
    train_ex, val_ex = ray.get(cfg["examples"])
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray_torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(config.seed)  # the adapter's initial weights: the same in every process
    model, tokenizer = build_model(config, cfg["base_model"])
    plain = model.to(device)
    tokens = TokenCache(tokenizer, train_ex.texts, config.max_length)
    cache = layer_cache(plain, tokens, config, device)
    # The cached path calls the layers directly (fit averages gradients through the reducer);
    # DDP otherwise.
    wrapped = (
        ray_torch.prepare_model(plain, move_to_device=False)
        if world > 1 and cache is None
        else plain
    )
    trainable, total = count_params(plain)
    validate = validation_score(plain, tokens, val_ex, config, device, cache) if rank == 0 else None
    result = fit(
        wrapped, tokens, train_ex, config, device=device, rank=rank, world=world,
        plain_model=plain, cache=cache, validate=validate, reducer=_Workers(world),
        callbacks=_callbacks(cfg) if rank == 0 else (),
    )  # fmt: skip
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = torch.tensor([usage.ru_utime + usage.ru_stime], dtype=torch.float64)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(cpu)  # every worker's CPU time, summed
    metrics: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "worker_cpu_seconds": float(cpu.item()),
        "trainable_params": trainable,
        "total_params": total,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            final = evaluate(plain, tokens, val_ex, device=device, seed=config.seed, cache=cache)
            metrics.update(final)
            epochs = [dataclasses.asdict(e) for e in result.epochs]
            summary = {"epochs": epochs, "val_scores": result.scores, **metrics}
            (Path(tmp) / "epochs.json").write_text(json.dumps(summary))
            save_encoder(plain, Path(tmp) / "encoder", base_model=cfg["base_model"], config=config)
            checkpoint = train.Checkpoint.from_directory(tmp)
        train.report(metrics, checkpoint=checkpoint)


@contextlib.contextmanager
def _printing(lines: Any, log: Callable[[str], None]) -> Iterator[None]:
    """Hand each line the workers put on `lines` to `log` (a thread) until the block ends."""
    done = threading.Event()

    def pump() -> None:
        while not (done.is_set() and lines.empty()):
            try:
                log(lines.get(timeout=0.5))
            except Exception:  # ray.util.queue.Empty on timeout; the queue's end on shutdown
                continue

    thread = threading.Thread(target=pump, name="finetune-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def run_finetune(
    data: Dataset,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    base_model: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    mlflow_run: tuple[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneReport:
    """Fine-tune the encoder on `data`'s clicks under Ray Train; write the encoder to `out_dir`.

    base_model: base model folder (None = packaged MiniLM). ray_address: a Ray cluster (None =
    a local Ray). on_epoch: called on the driver with each epoch's metrics (`EpochEnd.metrics`:
    epoch, phase, loss, steps, train_seconds, val_auc) once training has finished (the workers
    run in other processes). mlflow_run: (tracking URI, run id) that gets step metrics
    (step.loss, step.examples_per_s, step.lr) while training runs; None = none. log: gets a
    progress line every 10 steps. storage_path: where Ray Train keeps checkpoints (None = a
    temporary folder, deleted after; on a multi-node cluster give a path every node can reach).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    base = Path(base_model) if base_model is not None else default_model_path()
    check_model_dir(base)
    if config.method == "none":
        save_encoder(None, out, base_model=base, config=config)
        return FinetuneReport(out, [], {}, 0, 0, time.perf_counter() - t0, "none (frozen)")
    train_ex, val_ex = prepare_examples(config, data)
    if len(train_ex) == 0:
        raise DataError(NO_EXAMPLES)
    # Ray Train's controller polls workers every 2 s by default, which adds seconds to a short
    # run; it reads this variable when the trainer is built.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    init_ray(ray_address)
    gpus = cluster_gpus()
    workers = config.num_workers
    storage = _run_storage(storage_path)
    try:
        loop_config = {"config": config, "examples": ray.put((train_ex, val_ex)),
                       "base_model": str(base), "mlflow": mlflow_run}  # fmt: skip
        checkpoint = _train(loop_config, workers, gpus, storage, log)
        summary, fell_back = _install(checkpoint, out, base, config)
    finally:
        _remove_storage(storage)
    epochs = [EpochEnd(**{**m, "step_losses": tuple(m["step_losses"])}) for m in summary["epochs"]]
    if on_epoch is not None:
        for e in epochs:
            on_epoch(e.metrics())
    return FinetuneReport(
        encoder_dir=out,
        losses=[e.loss for e in epochs],
        val_metrics={
            k: float(summary[k]) for k in ("val_auc", "val_mrr", "val_examples") if k in summary
        },
        trainable_params=int(summary["trainable_params"]),
        total_params=int(summary["total_params"]),
        seconds=time.perf_counter() - t0,
        device=f"cuda x{workers}" if gpus else f"cpu x{workers}",
        step_losses=[x for e in epochs for x in e.step_losses],
        epochs=epochs,
        examples={
            "train": len(train_ex),
            "validation": len(val_ex),
            "without_history": train_ex.without_history,
        },
        val_scores=[float(x) for x in summary["val_scores"]],
        best_epoch=int(summary["best_epoch"]),
        fell_back=fell_back,
        peak_rss_mb=float(summary["peak_rss_mb"]),
        worker_cpu_seconds=float(summary.get("worker_cpu_seconds", 0.0)),
    )


def _run_storage(storage_path: str | os.PathLike[str] | None) -> str:
    """This run's own folder for Ray Train (checkpoints): under `storage_path` (a folder or a
    pyarrow.fs URI every node reaches), else a local temporary folder."""
    if storage_path is None:
        return tempfile.mkdtemp(prefix="recsys-ray-train-")
    return f"{str(storage_path).rstrip('/')}/recsys-ray-train-{uuid.uuid4().hex[:12]}"


def _remove_storage(storage: str) -> None:
    """Delete a run's Ray Train folder (local or behind a URI); a failure only leaves files."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else
                                                  os.path.abspath(storage))  # fmt: skip
        fs.delete_dir(path)
    except (OSError, pyarrow.ArrowException) as e:
        logger.debug("could not remove %s: %s", storage, e)


def _train(
    loop_config: dict[str, Any], workers: int, gpus: int, storage: str, log: Callable[[str], None]
) -> Any:
    """Run `_train_loop` on `workers` Ray Train workers (one GPU each when the cluster has
    GPUs, else an equal share of the CPUs); rank 0's checkpoint."""
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    threads = max(1, min(node_cpus(), cluster_cpus() // workers)) if not gpus else 1
    scaling = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpus > 0,
        resources_per_worker={"CPU": threads, **({"GPU": 1} if gpus else {})},
    )
    # rank 0's progress lines, printed here while training runs (the queue holds no CPU)
    lines: Queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={**loop_config, "threads": threads, "progress": lines},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(name="finetune", storage_path=storage),
    )
    with _printing(lines, log):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("fine-tuning finished without a checkpoint")
    return result.checkpoint


def _install(
    checkpoint: Any, out: Path, base: Path, config: FinetuneConfig
) -> tuple[dict[str, Any], bool]:
    """Put the checkpoint's encoder at `out` (the frozen encoder when no epoch beat it:
    fell back); (the checkpoint's epochs.json, fell back)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.staged-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    with checkpoint.as_directory() as ckpt:
        summary = json.loads((Path(ckpt) / "epochs.json").read_text())
        fell_back = summary["best_epoch"] == 0 and bool(summary["val_scores"])
        if fell_back:  # no epoch beat the frozen weights: ship the frozen encoder
            frozen = dataclasses.replace(config, method="none")
            save_encoder(None, staged, base_model=base, config=frozen)
        else:
            shutil.copytree(Path(ckpt) / "encoder", staged)
    install_dir(staged, out)
    return summary, fell_back
