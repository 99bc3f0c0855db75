"""The training loop: `fit` trains a model in place, the same in process and in Ray Train.

Training runs in two phases. First the projection head alone (`recsys.encoder.head`), over the
pooled vectors of the (frozen) encoder computed once. Then the adapter (LoRA) or full epochs,
head included, over `recsys.encoder.loss.batch_loss`. The epoch with the best validation score
ships, from either phase, or the starting weights. Callbacks (`recsys.encoder.callbacks`) see
every step and epoch; early stopping is one of them.

Distribution stays outside: every worker (`rank` of `world`) takes its share of the same seeded
permutation, the caller hands in the DistributedDataParallel-wrapped model beside the plain one,
and a `Reducer` for what the loop must share itself (gradients of the cached path, which runs
outside the DDP wrapper; rank 0's head after the head phase). In process it is `ALONE`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from recsys.encoder.callbacks import Callback, EarlyStopping, EpochEnd, Functions, StepEnd
from recsys.encoder.config import FinetuneConfig
from recsys.encoder.examples import Examples
from recsys.encoder.head import Vectors, head_epochs
from recsys.encoder.loss import StepBatch, batch_loss, grad_chunks, pick_negatives
from recsys.encoder.model import projection_head
from recsys.encoder.partial import LayerCache
from recsys.encoder.tokens import TokenCache, encode_nograd
from recsys.encoder.trainable import use_bf16
from recsys.encoder.validation import Validator
from recsys.errors import DataError

P = ParamSpec("P")
R = TypeVar("R")
NO_EXAMPLES = (
    "no training examples: no click or interaction has an earlier interaction of the same "
    "user to serve as history; the dataset needs users with at least two interactions"
)


class Reducer(Protocol):
    """What the workers share inside `fit`."""

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the workers, in place."""

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` by rank 0's, in place."""


class Alone:
    """One worker: nothing to share."""

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        pass

    def broadcast(self, tensor: torch.Tensor) -> None:
        pass


ALONE = Alone()


@dataclass(frozen=True)
class FitResult:
    """What `fit` did. losses: every adapter step's loss; scores: the validation score before
    training (index 0) and after each epoch (empty without `validate`); best_epoch: the epoch
    whose weights the model holds at the end (0 = the weights it started with); epochs: every
    epoch's payload, the head's first."""

    losses: list[float]
    scores: list[float]
    best_epoch: int
    epochs: tuple[EpochEnd, ...] = ()


def plan_steps(n_examples: int, config: FinetuneConfig, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) for `n_examples` split over `world` workers.

    max_steps is the whole budget, shared by the epochs: when a full pass costs more than its
    share, each epoch takes a fresh random subset of max_steps / epochs batches, so the best
    epoch can be chosen on validation however large the log is."""
    per_epoch = max(1, n_examples // (config.batch_size * world))
    if config.max_steps is not None:
        per_epoch = min(per_epoch, max(1, math.ceil(config.max_steps / config.epochs)))
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


def _lr_lambda(total: int) -> Callable[[int], float]:
    warm = max(1, total // 10)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


@contextlib.contextmanager
def deterministic_ops() -> Iterator[None]:
    """Deterministic torch kernels inside the block (the previous setting restored after).

    The backward pass of a gather (`x[rows]`, an index_put with accumulate) otherwise sums in
    a thread-dependent order: two runs' weights differed by 1.6e-6 on EB-NeRD's head, and
    LightGBM splits on features built from them flipped (lgbm_full AUC 0.6889 vs 0.6866)."""
    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _deterministic(f: Callable[P, R]) -> Callable[P, R]:
    """`f` run under `deterministic_ops`."""

    @functools.wraps(f)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with deterministic_ops():
            return f(*args, **kwargs)

    return run


class _Best:
    """Validation after each epoch: every score, and the best one's epoch and weights."""

    def __init__(
        self, named: list[tuple[str, torch.Tensor]], validate: Callable[[], float] | None
    ) -> None:
        self.named, self.validate = named, validate
        self.scores: list[float] = []
        self.score = -math.inf
        self.epoch: int | None = None  # None without validation
        self.weights: list[torch.Tensor] = []

    def check(self, epoch: int, vectors: Vectors | None = None) -> float | None:
        """Score the current weights (the head phase's `vectors` directly, when the validator
        can); keep a copy of them when they are the best so far."""
        if self.validate is None:
            return None
        if vectors is not None and isinstance(self.validate, Validator):
            score = self.validate(vectors)
        else:
            score = float(self.validate())
        self.scores.append(score)
        if self.epoch is None or score > self.score:
            self.score, self.epoch = score, epoch
            self.weights = [p.detach().clone() for _, p in self.named]
        return score

    def restore(self) -> None:
        """Put the best weights back (nothing without validation)."""
        if self.epoch is None:
            return
        with torch.no_grad():
            for (_, p), value in zip(self.named, self.weights, strict=True):
                p.copy_(value)


@dataclass
class _Run:
    """What one `fit` call trains with: fixed for its length."""

    model: nn.Module  # what the loss runs through (in Ray maybe a DDP wrapper)
    plain_model: nn.Module | None  # the model under that wrapper
    tokens: TokenCache
    examples: Examples
    config: FinetuneConfig
    device: torch.device
    cache: LayerCache | None
    rank: int
    world: int
    reducer: Reducer
    callbacks: list[Callback]
    best: _Best
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    amp: bool  # bfloat16 autocast (`use_bf16`)
    t0: float = 0.0
    epochs: list[EpochEnd] = dataclasses.field(default_factory=list)

    @property
    def owner(self) -> nn.Module:
        """The plain model: its parameters, the passes without gradients."""
        return self.plain_model or self.model

    def epoch_end(
        self, epoch: int, phase: str, start: int, losses: list[float], score: float | None
    ) -> bool:
        """Tell every callback about the epoch; True when one ends the phase."""
        seconds = time.perf_counter() - self.t0
        payload = EpochEnd(epoch, phase, start, float(np.mean(losses)), len(losses), seconds,
                           tuple(losses), score, self.best.epoch)  # fmt: skip
        self.epochs.append(payload)
        stops = [cb.on_epoch(payload) for cb in self.callbacks]  # every callback hears it
        return any(stops)


@_deterministic
def fit(
    model: nn.Module,
    tokens: TokenCache,
    examples: Examples,
    config: FinetuneConfig,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    plain_model: nn.Module | None = None,
    cache: LayerCache | None = None,
    validate: Callable[[], float] | None = None,
    reducer: Reducer = ALONE,
    callbacks: Sequence[Callback] = (),
    on_step: Callable[[StepEnd], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
) -> FitResult:
    """Train `model` in place on `examples`: the head phase, then the adapter epochs.

    Runs under `deterministic_ops`: the same examples, config and seed give the same weights,
    bit for bit, in any process with the same thread count. rank, world, plain_model, reducer:
    see the module docstring. cache: run only the top layers over cached lower-layer states
    (`recsys.encoder.partial`). validate: scores the current weights (higher is better; a
    `Validator` also scores the head phase's vectors directly); called before training and
    after each epoch, and the best weights are restored at the end (the starting ones when no
    epoch beat them). callbacks, and on_step / on_epoch as plain functions, get every adapter
    step's `StepEnd` and every epoch's `EpochEnd`; `EarlyStopping` is added for
    `config.patience` in the adapter phase, on a single worker only (validation runs on rank
    0). The head phase runs all its epochs: they cost seconds, and a fresh head's first epoch
    often dips below its start before it climbs (the demo data: frozen 0.628, head epochs
    0.623, 0.638, 0.644 on 475 validation clicks), which patience would take for the end.
    """
    if len(examples) == 0:
        raise DataError(NO_EXAMPLES)
    if config.in_batch_negatives is None:
        in_batch = examples.source != "impressions"
        config = dataclasses.replace(config, in_batch_negatives=in_batch)
    named = [(n, p) for n, p in (plain_model or model).named_parameters() if p.requires_grad]
    if not named:
        return FitResult([], [], 0)
    per_epoch, total = plan_steps(len(examples), config, world)
    opt = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    rng = np.random.default_rng(config.seed)
    neg_rng = np.random.default_rng([config.seed, rank])
    torch.manual_seed(config.seed)
    hooks = [*callbacks, Functions(on_step, on_epoch)]
    if config.patience is not None and world == 1:
        hooks.append(EarlyStopping(config.patience, ("adapter",)))
    run = _Run(model, plain_model, tokens, examples, config, torch.device(device), cache, rank,
               world, reducer, hooks, _Best(named, validate), opt, sched,
               use_bf16(config, torch.device(device)))  # fmt: skip
    run.best.check(0)
    run.t0 = time.perf_counter()
    head = projection_head(run.owner)
    if head is not None and head.weight.requires_grad and config.head_epochs > 0:
        _head_phase(run, head)
        reducer.broadcast(head.weight.data)  # rank 0 validated: its head goes to every worker
    losses = _adapter_phase(run, rng, neg_rng, per_epoch, total)
    model.eval()
    best_epoch = len(run.epochs) if run.best.epoch is None else run.best.epoch
    run.best.restore()
    return FitResult(losses, run.best.scores, best_epoch, tuple(run.epochs))


def _head_phase(run: _Run, head: nn.Linear) -> None:
    """The head alone, `config.head_epochs` epochs (`recsys.encoder.head`); the adapter epochs
    start from the best head (or the one it started with)."""
    config = run.config
    extra = np.asarray(getattr(run.best.validate, "rows", np.zeros(0, dtype=np.int64)))
    phase = head_epochs(
        run.owner, head, run.tokens, run.examples, config, run.device, run.cache, extra,
        bool(config.in_batch_negatives), np.random.default_rng([config.seed, 11]),
    )  # fmt: skip
    for losses, vectors in phase:
        epoch = len(run.epochs) + 1
        if run.epoch_end(epoch, "head", 0, losses, run.best.check(epoch, vectors)):
            break
    run.best.restore()


def _adapter_phase(
    run: _Run, rng: np.random.Generator, neg_rng: np.random.Generator, per_epoch: int, total: int
) -> list[float]:
    """The adapter (or full) epochs: `per_epoch` steps each, `total` in all; the step losses."""
    ex, config, start = run.examples, run.config, len(run.epochs)
    params = [p for _, p in run.best.named]
    hist_rows = np.unique(ex.history[ex.history >= 0])
    losses: list[float] = []
    run.model.train()
    for epoch in range(start + 1, start + config.epochs + 1):
        mine = rng.permutation(len(ex))[run.rank :: run.world]  # this worker's share
        table = None  # without history gradients: this epoch's history vectors, looked up
        if not config.history_grad:
            vecs = encode_nograd(run.owner, run.tokens, hist_rows, run.device, run.cache)
            table = (hist_rows, vecs)
        epoch_losses: list[float] = []
        for s in range(min(per_epoch, total - len(losses))):
            value = _train_step(run, params, _batch(ex, mine, s, config, neg_rng), table)
            losses.append(value)
            epoch_losses.append(value)
            seconds = time.perf_counter() - run.t0
            step = StepEnd(len(losses), total, epoch, value, run.sched.get_last_lr()[0], seconds,
                           len(losses) * config.batch_size / max(seconds, 1e-9))  # fmt: skip
            for cb in run.callbacks:
                cb.on_step(step)
        run.model.eval()
        score = run.best.check(epoch)
        run.model.train()
        if run.epoch_end(epoch, "adapter", start, epoch_losses, score) or len(losses) >= total:
            break
    return losses


def _batch(
    ex: Examples, mine: np.ndarray, s: int, config: FinetuneConfig, rng: np.random.Generator
) -> StepBatch:
    """Step `s`'s examples of this worker's share `mine`, with their negatives."""
    idx = mine[s * config.batch_size : (s + 1) * config.batch_size]
    if idx.size == 0:
        idx = mine[: config.batch_size]
    negatives = pick_negatives(ex.shown[idx], ex.positive[idx], config.negatives, ex.n_items, rng)
    return StepBatch(ex.history[idx], ex.positive[idx], negatives)


def _train_step(
    run: _Run,
    params: list[torch.Tensor],
    batch: StepBatch,
    table: tuple[np.ndarray, torch.Tensor] | None,
) -> float:
    """One optimiser step over `batch` (in `grad_chunks`); its loss."""
    run.opt.zero_grad(set_to_none=True)
    value = 0.0
    for part, share in grad_chunks(batch, run.config):
        with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            loss = batch_loss(run.model, run.tokens, part, run.config, run.device,
                              run.plain_model, run.cache, table)  # fmt: skip
        (loss * share).backward()
        value += float(loss.detach()) * share
    if run.cache is not None:  # the cached path runs outside any DDP wrapper: average here
        run.reducer.average([p.grad for p in params if p.grad is not None])
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    run.opt.step()
    run.sched.step()
    return value
