"""Fine-tuning the encoder on click labels: config, loss, and one plain training loop.

Examples (history, clicked item, shown-not-clicked items) come from `recsys.encoder.examples`.

Model (two towers sharing one encoder):
    item vector  v = normalise(mean_pool(encoder(text)))                      (D,)
    user vector  u = normalise(mean of the history item vectors)              (D,)
    loss = cross-entropy of softmax(u · [positive, shown negatives, in-batch candidates] / T)
           with the positive as target; other examples' positives and negatives serve as
           in-batch negatives (a candidate equal to the row's own positive is masked out).

The loop (`fit`) is plain torch; `train_encoder` runs it in process, and `pipelines/finetune.py`
runs the same `fit` inside Ray Train workers (`rank`/`world` shard the examples; the caller
passes a DistributedDataParallel-wrapped model and the plain one beside it).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.dataset import Dataset
from recsys.encoder.examples import Examples, build_examples, split_by_time
from recsys.encoder.model import (
    TextEncoder,
    default_model_path,
    embed_tokens,
    encoder_identity,
    load_base,
    pad_batch,
    tokenize,
    weights_digest,
)
from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError, DataError

__all__ = [  # the examples are re-exported: they are part of this module's surface
    "Examples",
    "FinetuneConfig",
    "TrainResult",
    "build_examples",
    "evaluate",
    "fit",
    "split_by_time",
    "train_encoder",
]

METHODS: tuple[str, ...] = ("lora", "full", "none")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (the `[finetune]` section of an experiment config).

    The defaults are sized for the nightly demo's budget (about 40 s of training on 2 CPU
    cores with MiniLM, Ray start-up included): LoRA in the last 2 layers, 40 steps of 16
    examples, 3 history items encoded without gradient, 2 negatives, 32 tokens per text.

    method: "lora" (peft adapter), "full" (all weights), "none" (frozen base model).
    lora_r, lora_alpha, lora_dropout, target_modules: the LoRA adapter.
    lora_layers: LoRA only in the last N transformer layers (None = all). Gradients then stop
        below them, so a step costs less; the demo uses it to stay within its time budget.
    epochs, max_steps: passes over the training examples, capped at max_steps optimiser steps.
    batch_size: examples per step (per worker); lr: AdamW learning rate (5e-4 suits LoRA,
        ~5e-5 full fine-tuning); temperature: softmax temperature over cosine scores.
    history_len: history items per user vector; negatives: shown-not-clicked (or sampled)
        negatives per example; max_length: tokens per item text in training.
    in_batch_negatives: the other examples' positives and negatives count as negatives too
        (False: only each example's own shown/sampled negatives).
    history_grad: back-propagate through the history (user) side as well; False encodes the
        history with the current weights but without gradients (about 3x cheaper per item).
    val_fraction: the latest share of examples (by time) held out for validation metrics;
        val_examples: at most this many of them are scored.
    template: item text template (see `recsys.encoder.text`).
    num_workers: Ray Train workers (the plain loop ignores it).
    """

    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    lora_layers: int | None = 2
    epochs: int = 1
    max_steps: int | None = 40
    batch_size: int = 16
    lr: float = 5e-4
    temperature: float = 0.05
    history_len: int = 3
    negatives: int = 2
    max_length: int = 32
    history_grad: bool = False
    in_batch_negatives: bool = True
    val_fraction: float = 0.1
    val_examples: int = 100
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"finetune.method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        positive_ints = ("lora_r", "lora_alpha", "epochs", "batch_size", "history_len")
        for name in (*positive_ints, "num_workers", "val_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"finetune.max_steps must be >= 1 or unset, got {self.max_steps}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"finetune.lora_layers must be >= 1 or unset, got {self.lora_layers}")
        if self.negatives < 0:
            raise ConfigError(f"finetune.negatives must be >= 0, got {self.negatives}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.val_fraction < 0.9:
            raise ConfigError(f"finetune.val_fraction must be in [0, 0.9), got {self.val_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"finetune.lr must be a positive number, got {self.lr}")
        if not self.temperature > 0:
            raise ConfigError(f"finetune.temperature must be > 0, got {self.temperature}")
        if not 8 <= self.max_length <= 512:
            raise ConfigError(f"finetune.max_length must be in [8, 512], got {self.max_length}")
        if not self.target_modules:
            raise ConfigError("finetune.target_modules must name at least one module, e.g. query")
        template_fields(self.template)


# ---------------------------------------------------------------------------------------------
# Model


def build_model(
    config: FinetuneConfig, base_model: str | Path | None = None
) -> tuple[nn.Module, Any]:
    """(trainable model, tokenizer) for `config.method` from the base model folder.

    lora: the base wrapped by peft with only the adapter trainable; full: every weight
    trainable; none: all frozen.
    """
    model, tokenizer = load_base(base_model if base_model is not None else default_model_path())
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        layers = None
        if config.lora_layers is not None:
            n_layers = int(getattr(model.config, "num_hidden_layers"))  # noqa: B009
            layers = list(range(max(0, n_layers - config.lora_layers), n_layers))
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            layers_to_transform=layers,
            bias="none",
        )
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                model = get_peft_model(model, lora)
        except ValueError as e:
            raise ConfigError(
                f"finetune.target_modules {list(config.target_modules)} do not match the model's "
                f"modules ({e}); for BERT-like encoders use e.g. ['query', 'value']"
            ) from e
    elif config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, tokenizer


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class TokenCache:
    """Token ids per catalogue row, tokenised on first use (max_length tokens)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.texts = texts
        self.max_length = max_length
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self._ids: dict[int, list[int]] = {}

    def get(self, rows: Sequence[int] | np.ndarray) -> list[list[int]]:
        missing = [int(r) for r in dict.fromkeys(rows) if int(r) not in self._ids]
        if missing:
            toks = tokenize(self.tokenizer, [self.texts[r] for r in missing], self.max_length)
            self._ids.update(zip(missing, toks, strict=True))
        return [self._ids[int(r)] for r in rows]

    def batch(
        self, rows: Sequence[int] | np.ndarray, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(self.get(rows), self.pad_id, device)


def encode_rows(
    model: nn.Module, tokens: TokenCache, rows: np.ndarray, device: torch.device, batch: int = 128
) -> torch.Tensor:
    """Unit vectors (len(rows), D) for catalogue rows, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        order = np.argsort([-len(t) for t in tokens.get(rows)], kind="stable")
        for s in range(0, len(rows), batch):
            sel = order[s : s + batch]
            ids, mask = tokens.batch(rows[sel], device)
            out.append((sel, embed_tokens(model, ids, mask)))
    model.train(was_training)
    vecs = torch.empty((len(rows), out[0][1].shape[1]) if out else (0, 0), device=device)
    for sel, v in out:
        vecs[torch.as_tensor(sel, device=device)] = v
    return vecs


def user_vectors(item_vecs: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Unit user vectors (B, D): the normalised mean of item_vecs[history] over valid entries.

    item_vecs: (M, D); history: (B, h) indices into item_vecs, -1 = padding.
    """
    valid = (history >= 0).unsqueeze(-1).to(item_vecs.dtype)  # (B, h, 1)
    gathered = item_vecs[history.clamp(min=0)] * valid  # (B, h, D)
    mean = gathered.sum(1) / valid.sum(1).clamp(min=1.0)
    return F.normalize(mean, p=2, dim=-1)


def contrastive_loss(
    users: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    positive_items: torch.Tensor,
    temperature: float,
    in_batch: bool = True,
) -> torch.Tensor:
    """Softmax cross-entropy over each example's candidates, with in-batch negatives.

    users: (B, D) unit; candidates: (C, D) unit with C = B + B*k: rows 0..B-1 = each example's
    positive, then k negatives per example (example b's at B + b*k .. B + b*k + k - 1);
    candidate_items: (C,) catalogue rows; positive_items: (B,). Target of row b is column b.
    in_batch: the other examples' candidates are negatives too; False = only the row's own k.
    A column holding the same item as row b's positive (another click of it) is masked out,
    so an item never counts against itself.
    """
    logits = users @ candidates.T / temperature  # (B, C)
    b, c = users.shape[0], candidates.shape[0]
    rows = torch.arange(b, device=users.device)
    same = candidate_items.unsqueeze(0) == positive_items.unsqueeze(1)  # (B, C)
    same[rows, rows] = False
    if not in_batch:
        k = (c - b) // b
        owner = torch.cat([rows, rows.repeat_interleave(k)])  # (C,) example of each column
        same |= owner.unsqueeze(0) != rows.unsqueeze(1)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(b, device=users.device))


def _pick_negatives(
    shown: np.ndarray, positive: np.ndarray, k: int, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, k) negatives: shown-not-clicked items first (random order), then sampled items."""
    b = shown.shape[0]
    out = rng.integers(0, n_items, size=(b, k)).astype(np.int32)
    for i in range(b):  # B is small (a batch); per-row choice of the shown items
        cand = shown[i][shown[i] >= 0]
        cand = cand[cand != positive[i]]
        if cand.size:
            take = rng.permutation(cand)[:k]
            out[i, : take.size] = take
    return out


@dataclass
class StepBatch:
    history: np.ndarray  # (B, h)
    positive: np.ndarray  # (B,)
    negatives: np.ndarray  # (B, k)


def batch_loss(
    model: nn.Module,
    tokens: TokenCache,
    batch: StepBatch,
    config: FinetuneConfig,
    device: torch.device,
    plain_model: nn.Module | None = None,
) -> torch.Tensor:
    """The loss of one batch (graph attached). Each distinct item is encoded once.

    plain_model: the model without a DDP wrapper, used for the gradient-free history pass.
    """
    cand_items = np.concatenate([batch.positive, batch.negatives.ravel()])  # (B + B*k,)
    hist = batch.history  # (B, h), -1 = padding
    if config.history_grad:
        rows = np.unique(np.concatenate([cand_items, hist[hist >= 0]]))
        ids, mask = tokens.batch(rows, device)
        hist_vecs = embed_tokens(model, ids, mask)  # (U, D), one pass for both sides
        cand_vecs = hist_vecs[torch.as_tensor(np.searchsorted(rows, cand_items), device=device)]
    else:
        crows = np.unique(cand_items)
        ids, mask = tokens.batch(crows, device)
        cand_vecs = embed_tokens(model, ids, mask)[
            torch.as_tensor(np.searchsorted(crows, cand_items), device=device)
        ]
        rows = np.unique(hist[hist >= 0])
        hist_vecs = encode_rows(plain_model or model, tokens, rows, device)
    hist_idx = np.where(hist >= 0, np.searchsorted(rows, hist), -1)  # rows of hist_vecs
    users = user_vectors(hist_vecs, torch.as_tensor(hist_idx, device=device))
    return contrastive_loss(
        users,
        cand_vecs,
        torch.as_tensor(cand_items, device=device),
        torch.as_tensor(batch.positive, device=device),
        config.temperature,
        in_batch=config.in_batch_negatives,
    )


def _lr_lambda(total: int) -> Callable[[int], float]:
    warm = max(1, total // 10)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


def plan_steps(n_examples: int, config: FinetuneConfig, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, total steps) for `n_examples` split over `world` workers."""
    per_epoch = max(1, n_examples // (config.batch_size * world))
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


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
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train `model` in place on `examples`; return the loss of every step.

    Every worker (rank of world) walks the same seeded permutation and takes its share, so all
    workers run the same number of steps. on_step gets {step, epoch, loss, lr, seconds};
    on_epoch gets {epoch, loss (mean of the epoch's steps), steps, seconds, step_losses}.
    """
    if len(examples) == 0:
        raise DataError(
            "no training examples: no click or interaction has an earlier interaction of the same "
            "user to serve as history; the dataset needs users with at least two interactions"
        )
    dev = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return []
    per_epoch, total = plan_steps(len(examples), config, world)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    rng = np.random.default_rng(config.seed)
    neg_rng = np.random.default_rng([config.seed, rank])
    torch.manual_seed(config.seed)
    # bf16 autocast on GPUs that have it (no loss scaling needed); fp32 elsewhere.
    use_amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(config.epochs):
        perm = rng.permutation(len(examples))
        mine = perm[rank::world]
        epoch_losses: list[float] = []
        for s in range(per_epoch):
            if step >= total:
                break
            idx = mine[s * config.batch_size : (s + 1) * config.batch_size]
            if idx.size == 0:
                idx = mine[: config.batch_size]
            batch = StepBatch(
                examples.history[idx],
                examples.positive[idx],
                _pick_negatives(
                    examples.shown[idx],
                    examples.positive[idx],
                    config.negatives,
                    examples.n_items,
                    neg_rng,
                ),
            )
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = batch_loss(model, tokens, batch, config, dev, plain_model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            value = float(loss.detach())
            losses.append(value)
            epoch_losses.append(value)
            step += 1
            if on_step is not None:
                on_step(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": value,
                        "lr": sched.get_last_lr()[0],
                        "seconds": time.perf_counter() - t0,
                    }
                )
        if epoch_losses and on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch + 1,
                    "loss": float(np.mean(epoch_losses)),
                    "steps": len(epoch_losses),
                    "seconds": time.perf_counter() - t0,
                    "step_losses": epoch_losses,
                }
            )
        if step >= total:
            break
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Validation


def evaluate(
    model: nn.Module,
    tokens: TokenCache,
    examples: Examples,
    *,
    device: torch.device | str = "cpu",
    sampled_negatives: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Semantic-score metrics over `examples`: each positive against its shown negatives (or
    `sampled_negatives` sampled items when none were shown).

    Returns {"val_auc": mean per-example AUC (ties count half), "val_mrr": mean 1/rank of the
    positive (ties rank it below), "val_examples": n}; empty dict for no examples.
    """
    n = len(examples)
    if n == 0:
        return {}
    dev = torch.device(device)
    rng = np.random.default_rng([seed, 7])
    shown = examples.shown
    sampled = rng.integers(0, examples.n_items, size=(n, sampled_negatives)).astype(np.int32)
    has_shown = np.asarray((shown >= 0).any(axis=1), dtype=bool)
    rows = np.unique(
        np.concatenate(
            [
                examples.history[examples.history >= 0],
                examples.positive,
                shown[shown >= 0],
                sampled[~has_shown].ravel(),
            ]
        )
    )
    vecs = encode_rows(model, tokens, rows, dev).float().cpu().numpy()  # (R, D), rows sorted
    aucs, rrs = [], []
    for i in range(n):
        hist = examples.history[i][examples.history[i] >= 0]
        u = vecs[np.searchsorted(rows, hist)].mean(0)
        u /= max(float(np.linalg.norm(u)), 1e-12)
        negs = shown[i][shown[i] >= 0] if has_shown[i] else sampled[i]
        negs = negs[negs != examples.positive[i]]
        if negs.size == 0:
            continue
        p = float(vecs[np.searchsorted(rows, examples.positive[i])] @ u)
        q = vecs[np.searchsorted(rows, negs)] @ u
        aucs.append(float(((q < p).sum() + 0.5 * (q == p).sum()) / q.size))
        rrs.append(1.0 / (1 + int((q >= p).sum())))
    if not aucs:
        return {}
    return {
        "val_auc": float(np.mean(aucs)),
        "val_mrr": float(np.mean(rrs)),
        "val_examples": float(len(aucs)),
    }


# ---------------------------------------------------------------------------------------------
# In-process training


@dataclass
class TrainResult:
    """What `train_encoder` returns.

    encoder: a `TextEncoder` over the trained model (fp32, adapter not merged; its encoder_id
        marks it unsaved - save it with `save_encoder` and load the directory for the real id).
    model: the trained torch module (a peft model for "lora"); base_model: its base folder.
    losses: loss per step; val_metrics: see `evaluate` (empty without validation examples).
    """

    encoder: TextEncoder
    model: nn.Module
    config: FinetuneConfig
    base_model: Path
    losses: list[float]
    trainable_params: int
    total_params: int
    seconds: float
    val_metrics: dict[str, float] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)


def trained_state_digest(model: nn.Module) -> str:
    """A digest of the trainable tensors' bytes (identifies an unsaved fine-tuned model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def prepare_examples(config: FinetuneConfig, data: Dataset) -> tuple[Examples, Examples]:
    """(train, validation) examples for `config` (validation capped at `val_examples`,
    keeping the latest)."""
    ex = build_examples(data, history_len=config.history_len, template=config.template)
    train, val = split_by_time(ex, config.val_fraction)
    if len(val) > config.val_examples:
        val = val.take(np.arange(len(val) - config.val_examples, len(val)))
    return train, val


def train_encoder(
    config: FinetuneConfig,
    data: Dataset,
    *,
    base_model: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Fine-tune the encoder on `data`'s clicks in this process (no Ray); see module docstring."""
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    base = Path(base_model) if base_model is not None else default_model_path()
    train, val = prepare_examples(config, data)
    model, tokenizer = build_model(config, base)
    dev = torch.device(device)
    model.to(dev)
    tokens = TokenCache(tokenizer, train.texts, config.max_length)
    losses = (
        fit(model, tokens, train, config, device=dev, on_step=on_step)
        if config.method != "none"
        else []
    )
    model.eval()
    val_metrics = evaluate(model, tokens, val, device=dev, seed=config.seed)
    trainable, total = count_params(model)
    delta = None if config.method == "none" else "unsaved:" + trained_state_digest(model)
    encoder = TextEncoder(
        model,
        tokenizer,
        encoder_id=encoder_identity(
            weights_digest(base), delta, config.max_length, config.template
        ),
        max_length=config.max_length,
        template=config.template,
        device=dev,
        source=None,
    )
    return TrainResult(
        encoder=encoder,
        model=model,
        config=config,
        base_model=base,
        losses=losses,
        trainable_params=trainable,
        total_params=total,
        seconds=time.perf_counter() - t0,
        val_metrics=val_metrics,
        examples={
            "train": len(train),
            "validation": len(val),
            "without_history": train.without_history,
        },
    )
