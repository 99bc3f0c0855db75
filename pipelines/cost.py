"""What a nightly run cost: wall and CPU seconds per stage (driver and Ray workers), peak
memory of the Ray workers, GPU seconds, the encoder's size (RUN_DIR/cost.json)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .stages import StageResult
from .train import Embedded, Finetuned


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def cost_report(results: Mapping[str, StageResult[Any]], encoder_dir: Path) -> dict[str, Any]:
    """The cost of the stages in `results` (a runner's, finetune and embed among them)."""
    ft: Finetuned = results["finetune"].summary
    emb: Embedded = results["embed"].summary
    runs = [r for r in (emb.item_vectors_frozen, emb.item_vectors) if r.reused_from is None]
    workers = {  # Ray worker processes: fine-tune workers, embed actors
        "finetune": (ft.worker_cpu_seconds, ft.peak_rss_mb),
        "embed": (
            sum(r.worker_cpu_seconds for r in runs) if runs else None,
            max((r.worker_peak_rss_mb for r in runs), default=None),
        ),
    }
    stages: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
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
        "gpu_seconds": ft.seconds if "cuda" in ft.device else 0.0,
        "finetune_device": ft.device,
        "trainable_params": ft.trainable_params,
        "total_params": ft.total_params,
        "encoder_dir_mb": round(_dir_mb(encoder_dir), 3),
        "items_embedded": emb.item_vectors.embedded,
        "items_reused": emb.item_vectors.reused,
        "embed_device": emb.item_vectors.device,
        "note": "driver CPU seconds are this process's; worker CPU seconds and peak RSS are the "
        "Ray workers' (fine-tune workers, embed actors); wall seconds are per stage",
    }
