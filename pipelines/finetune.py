"""The `finetune` job: `recsys.encoder.finetune.fit` inside Ray Train workers.

    report = run_finetune(dataset, "out/encoder", FinetuneConfig())

The driver builds the examples (pure polars) and puts them in the object store; each worker
loads the base model, wraps it for its method (LoRA/full), shards the examples by rank and runs
the same `fit` the tests run in process (DistributedDataParallel when num_workers > 1, CUDA
when Ray sees GPUs). After each epoch, rank 0 scores the held-out latest time slice
(validation AUC/MRR of the semantic score) and reports an encoder directory as the checkpoint;
the last one is copied to `out_dir`.

method "none" trains nothing and starts no Ray: it writes an encoder directory that refers to
the base model, so downstream code always gets an encoder directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train

from pipelines.ray_utils import cluster_cpus, cluster_gpus, init_ray
from recsys.data import Dataset
from recsys.encoder import FinetuneConfig, default_model_path, save_encoder
from recsys.encoder.finetune import prepare_examples
from recsys.encoder.model import check_model_dir
from recsys.encoder.store import install_dir
from recsys.errors import DataError


@dataclass
class FinetuneReport:
    """What a fine-tuning run produced.

    losses: mean training loss per epoch; step_losses: every step's loss; val_metrics: the last
    epoch's validation metrics (val_auc, val_mrr, val_examples; empty for method "none");
    epochs: every epoch's reported metrics; device: where training ran ("cpu x1", "cuda x2").
    """

    encoder_dir: Path
    losses: list[float]
    val_metrics: dict[str, float]
    trainable_params: int
    total_params: int
    seconds: float
    device: str
    step_losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker body: build the model, `fit`, report each epoch (rank 0 checkpoints)."""
    import torch
    from ray import train
    from ray.train import torch as ray_torch

    from recsys.encoder.finetune import TokenCache, build_model, count_params, evaluate, fit

    config: FinetuneConfig = cfg["config"]
    train_ex, val_ex = ray.get(cfg["examples"])
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray_torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    model, tokenizer = build_model(config, cfg["base_model"])
    plain = model.to(device)
    wrapped = ray_torch.prepare_model(plain, move_to_device=False) if world > 1 else plain
    trainable, total = count_params(plain)
    tokens = TokenCache(tokenizer, train_ex.texts, config.max_length)

    def on_epoch(m: dict[str, Any]) -> None:
        metrics = {
            "epoch": m["epoch"],
            "loss": m["loss"],
            "steps": m["steps"],
            "train_seconds": m["seconds"],
            "step_losses": m["step_losses"],
            "trainable_params": trainable,
            "total_params": total,
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                metrics.update(evaluate(plain, tokens, val_ex, device=device, seed=config.seed))
                save_encoder(
                    plain, Path(tmp) / "encoder", base_model=cfg["base_model"], config=config
                )
                checkpoint = train.Checkpoint.from_directory(tmp)
            train.report(metrics, checkpoint=checkpoint)

    fit(
        wrapped,
        tokens,
        train_ex,
        config,
        device=device,
        rank=rank,
        world=world,
        plain_model=plain,
        on_epoch=on_epoch,
    )


def run_finetune(
    data: Dataset,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig,
    *,
    base_model: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    storage_path: str | os.PathLike[str] | None = None,
) -> FinetuneReport:
    """Fine-tune the encoder on `data`'s clicks under Ray Train; write the encoder to `out_dir`.

    base_model: base model folder (None = packaged MiniLM). ray_address: a Ray cluster (None =
    a local Ray). on_epoch: called on the driver with each epoch's metrics (epoch, loss,
    val_auc, val_mrr, ...) once training has finished (the workers run in other processes).
    storage_path: where Ray Train keeps checkpoints (None = a temporary folder, deleted after;
    on a multi-node cluster give a path every node can reach).
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
        raise DataError(
            "no training examples: no click or interaction has an earlier interaction of the same "
            "user to serve as history; the dataset needs users with at least two interactions"
        )
    # Ray Train's controller polls workers every 2 s by default, which adds seconds to a short
    # run; it reads this variable when the trainer is built.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    init_ray(ray_address)
    gpus = cluster_gpus()
    workers = config.num_workers
    threads = max(1, cluster_cpus() // workers) if not gpus else 1
    scaling = ray.train.ScalingConfig(
        num_workers=workers,
        use_gpu=gpus > 0,
        resources_per_worker={"CPU": threads, **({"GPU": 1} if gpus else {})},
    )
    own_storage = storage_path is None
    storage = Path(storage_path or tempfile.mkdtemp(prefix="recsys-ray-train-"))
    try:
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "config": config,
                "examples": ray.put((train_ex, val_ex)),
                "base_model": str(base),
                "threads": threads,
            },
            scaling_config=scaling,
            run_config=ray.train.RunConfig(name="finetune", storage_path=str(storage)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("fine-tuning finished without a checkpoint")
        epochs = [dict(m) for _, m in (result.best_checkpoints or [])]
        epochs = epochs or [dict(result.metrics or {})]
        epochs.sort(key=lambda m: m.get("epoch", 0))
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = out.parent / f".{out.name}.staged-{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / "encoder", staged)
        install_dir(staged, out)
    finally:
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)
    if on_epoch is not None:
        for m in epochs:
            on_epoch({k: v for k, v in m.items() if k != "step_losses"})
    last = epochs[-1]
    return FinetuneReport(
        encoder_dir=out,
        losses=[float(m["loss"]) for m in epochs],
        val_metrics={
            k: float(last[k]) for k in ("val_auc", "val_mrr", "val_examples") if k in last
        },
        trainable_params=int(last["trainable_params"]),
        total_params=int(last["total_params"]),
        seconds=time.perf_counter() - t0,
        device=f"cuda x{workers}" if gpus else f"cpu x{workers}",
        step_losses=[float(x) for m in epochs for x in m.get("step_losses", [])],
        epochs=epochs,
        examples={
            "train": len(train_ex),
            "validation": len(val_ex),
            "without_history": train_ex.without_history,
        },
    )
