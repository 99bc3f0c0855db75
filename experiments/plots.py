"""Plots logged as run artifacts (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_importance(importance: list[dict[str, Any]], path: Path, top: int = 25) -> Path:
    """Horizontal bar chart of LightGBM gain importance (rows: feature, importance)."""
    rows = sorted(importance, key=lambda r: r["importance"], reverse=True)[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    ax.barh([r["feature"] for r in rows], [r["importance"] for r in rows], color="#3b6ea5")
    ax.set_xlabel("gain")
    ax.set_title("LightGBM feature importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(losses: list[float], ranker_history: dict[str, Any], path: Path) -> Path:
    """Encoder fine-tuning loss per epoch and the ranker's validation metric per iteration."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if losses:
        axes[0].plot(range(1, len(losses) + 1), losses, marker="o")
    axes[0].set_title("encoder fine-tuning loss")
    axes[0].set_xlabel("epoch")
    for data_name, metrics in (ranker_history or {}).items():
        if isinstance(metrics, dict):
            for metric, values in metrics.items():
                axes[1].plot(values, label=f"{data_name} {metric}")
    axes[1].set_title("ranker validation")
    axes[1].set_xlabel("iteration")
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
