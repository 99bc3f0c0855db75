"""What `fit` tells the world: one frozen payload per step and per epoch, handed to callbacks.

    fit(model, tokens, train, config, callbacks=[ProgressLines(print), TrackSteps(tracker)])

A callback overrides `on_step` and/or `on_epoch`; `on_epoch` returning True ends the phase
(head or adapter) early, which is how `EarlyStopping` works. `fit` adds `EarlyStopping` itself
when the config sets `patience`. The same `EpochEnd` goes to every callback, into `fit`'s
result and into the Ray job's report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class StepEnd:
    """One optimiser step of the adapter phase.

    step: steps done (1-based) of `steps` planned; epoch: the epoch it belongs to (numbered
    after the head's); loss: the batch loss; lr: the learning rate after the step; seconds:
    since training began; examples_per_s: this worker's examples per second so far.
    """

    step: int
    steps: int
    epoch: int
    loss: float
    lr: float
    seconds: float
    examples_per_s: float

    def __getitem__(self, key: str) -> Any:  # reads like a record: s["loss"]
        return getattr(self, key)


@dataclass(frozen=True)
class EpochEnd:
    """One finished epoch.

    epoch: 1-based over both phases (the head's first); phase: "head" or "adapter";
    phase_start: epochs run before this phase began; loss: mean of step_losses (the epoch's
    steps); seconds: since training began; val_score: validation score of the weights after
    this epoch, best_epoch: the best-scoring epoch so far (0 = the starting weights), both None
    without validation.
    """

    epoch: int
    phase: str
    phase_start: int
    loss: float
    steps: int
    seconds: float
    step_losses: tuple[float, ...]
    val_score: float | None = None
    best_epoch: int | None = None

    def __getitem__(self, key: str) -> Any:  # reads like a record: e["epoch"]
        return getattr(self, key)

    def metrics(self) -> dict[str, Any]:
        """The epoch as the tracking names it: epoch, phase, loss, steps, train_seconds and
        val_auc (when validated)."""
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "phase": self.phase,
            "loss": self.loss,
            "steps": self.steps,
            "train_seconds": self.seconds,
        }
        if self.val_score is not None:
            out["val_auc"] = self.val_score
        return out


class Callback:
    """Hooks `fit` calls; both do nothing unless overridden."""

    def on_step(self, step: StepEnd) -> None:
        """After each optimiser step of the adapter phase."""

    def on_epoch(self, epoch: EpochEnd) -> bool | None:
        """After each epoch of either phase; True ends the phase."""
        return None


class Functions(Callback):
    """Plain functions as a callback (`fit`'s `on_step` and `on_epoch`)."""

    def __init__(
        self,
        on_step: Callable[[StepEnd], None] | None = None,
        on_epoch: Callable[[EpochEnd], None] | None = None,
    ) -> None:
        self._on_step, self._on_epoch = on_step, on_epoch

    def on_step(self, step: StepEnd) -> None:
        if self._on_step is not None:
            self._on_step(step)

    def on_epoch(self, epoch: EpochEnd) -> bool | None:
        if self._on_epoch is not None:
            self._on_epoch(epoch)
        return None


@dataclass(frozen=True)
class EarlyStopping(Callback):
    """End a phase after `patience` epochs in a row that do not beat the best validation score
    so far (the best of an earlier phase counts as the phase's start); only in `phases`.
    Without validation nothing stops."""

    patience: int
    phases: tuple[str, ...] = ("adapter",)

    def on_epoch(self, epoch: EpochEnd) -> bool | None:
        if epoch.phase not in self.phases or epoch.best_epoch is None:
            return False
        return epoch.epoch - max(epoch.best_epoch, epoch.phase_start) >= self.patience


def _due(step: StepEnd, every: int) -> bool:
    """Every `every` steps, and the last."""
    return step.step % every == 0 or step.step == step.steps


class ProgressLines(Callback):
    """A progress line to `write` every `every` steps and after each epoch."""

    def __init__(self, write: Callable[[str], None], every: int = 10) -> None:
        self.write, self.every = write, max(1, every)

    def on_step(self, step: StepEnd) -> None:
        if _due(step, self.every):
            self.write(
                f"[finetune] step {step.step}/{step.steps}  epoch {step.epoch}  "
                f"loss {step.loss:.4f}  {step.examples_per_s:.1f} examples/s"
            )

    def on_epoch(self, epoch: EpochEnd) -> bool | None:
        val = f"  val_auc {epoch.val_score:.4f}" if epoch.val_score is not None else ""
        self.write(
            f"[finetune] epoch {epoch.epoch} ({epoch.phase})  "
            f"loss {epoch.loss:.4f}{val}  {epoch.seconds:.0f} s"
        )
        return None


class Tracker(Protocol):
    """The part of an experiment tracker `TrackSteps` uses (`experiments.tracking.Tracker`)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


class TrackSteps(Callback):
    """Step metrics (step.loss, step.examples_per_s, step.lr) to a tracker every `every`
    steps, and the last."""

    def __init__(self, tracker: Tracker, every: int = 10) -> None:
        self.tracker, self.every = tracker, max(1, every)

    def on_step(self, step: StepEnd) -> None:
        if _due(step, self.every):
            metrics = {f"step.{k}": float(step[k]) for k in ("loss", "examples_per_s", "lr")}
            self.tracker.log_metrics(metrics, step=step.step)
