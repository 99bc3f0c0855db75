"""Fine-tuning the encoder on click labels: config, loss, and one plain training loop.

Examples (history, clicked item, shown-not-clicked items) come from `recsys.encoder.examples`.

Model (two towers sharing one encoder):
    item vector  v = normalise(W normalise(mean_pool(encoder(text))))         (D,)
                 (W: the projection head, identity at the start; without a head, no W)
    user vector  u = normalise(mean of the history item vectors)              (D,)
    loss = cross-entropy of softmax(u · [positive, shown negatives, in-batch candidates] / T)
           with the positive as target; other examples' positives and negatives serve as
           in-batch negatives (a candidate equal to the row's own positive is masked out).

Training runs in two phases. First the head alone, over the pooled vectors of the (frozen)
encoder computed once: seconds per epoch, and the history side gets its gradient too, which
the adapter phase cannot afford. Then the adapter (LoRA) epochs, head included. The epoch
with the best validation score ships, from either phase, or the frozen encoder.

The loop (`fit`) is plain torch; `train_encoder` runs it in process, and `pipelines/finetune.py`
runs the same `fit` inside Ray Train workers (`rank`/`world` shard the examples; the caller
passes a DistributedDataParallel-wrapped model and the plain one beside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.data.dataset import Dataset
from recsys.encoder.examples import Examples, build_examples, split_by_time
from recsys.encoder.model import (
    TextEncoder,
    attach_head,
    cpu_has_bf16,
    default_model_path,
    embed_tokens,
    encoder_identity,
    load_base,
    pad_batch,
    projection_head,
    tokenize,
    weights_digest,
    without_head,
)
from recsys.encoder.partial import LayerCache, first_tuned_layer
from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError, DataError

__all__ = [  # the examples are re-exported: they are part of this module's surface
    "Examples",
    "FinetuneConfig",
    "FitResult",
    "TrainResult",
    "build_examples",
    "evaluate",
    "fit",
    "split_by_time",
    "train_encoder",
]

METHODS: tuple[str, ...] = ("lora", "full", "none")
P = ParamSpec("P")
R = TypeVar("R")
NEW_ITEM_SHARE = 0.3  # validation clicks on unseen items from which a catalogue counts as fast


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (the `[finetune]` section of an experiment config).

    The defaults are sized for the nightly's budget (a few minutes on 2 CPU cores for a
    5k-item news catalogue of 64-token Danish texts). First a projection head, up to 4 epochs
    of every training example with all its shown negatives, over the frozen encoder's vectors
    computed once. Then LoRA r=16 on every linear layer of the top 2 of 6 layers, trained with
    the head over cached states of the frozen 4 below (`cache_frozen_layers`): 3 epochs of 50
    steps of 16 examples, 50 history items (as the ranker's semantic features use), 6
    shown-not-clicked negatives of the same impression and no in-batch ones (those are other
    users' clicks, so popular items: on EB-NeRD they cost the tuned encoder 0.011 AUC), 64
    tokens as the catalogue embedding uses. The epoch with the best validation AUC ships, from
    either phase, or the frozen encoder when none beats it; each phase stops after `patience`
    epochs without a better one.

    Measured in process on EB-NeRD (tuned on week 1's first half, per-click AUC of the
    semantic score against the shown items on 2,500 week-2 impressions): frozen 0.526; the
    adapter alone (head = false, temperature 0.05) 0.525 after 3 epochs; the default 0.569,
    its best epoch the head's second, in 247 s.

    method: "lora" (peft adapter), "full" (all weights), "none" (frozen base model).
    lora_r, lora_alpha, lora_dropout, target_modules: the LoRA adapter.
    lora_layers: LoRA only in the last N transformer layers (None = all). Gradients then stop
        below them, and the frozen layers below run once per text (`cache_frozen_layers`).
    epochs, max_steps: passes over the training examples, max_steps optimiser steps in all
        (each epoch a fresh random subset when a full pass is more than its share).
    batch_size: examples per step (per worker); lr: AdamW learning rate (1e-3 for the default
        LoRA, ~5e-5 full fine-tuning); temperature: softmax temperature over cosine scores.
    history_len: history items per user vector; negatives: shown-not-clicked (or sampled)
        negatives per example; max_length: tokens per item text in training.
    in_batch_negatives: the other examples' positives and negatives count as negatives too
        (False: only each example's own shown/sampled negatives). None (default): False when
        the examples come from impressions (shown negatives are the ranking task itself), True
        when they come from interactions (sampled negatives alone are weak).
    history_grad: back-propagate through the history (user) side as well; False encodes the
        history items with each epoch's weights once, without gradients, and looks them up.
    val_fraction: the latest share of examples (by time) held out for validation metrics;
        val_examples: at most this many of them are scored. val_new_items: when at least 30% of
        them click an item that no training example clicked (a fast catalogue such as news),
        validate on those clicks only: tomorrow's clicks are on new items.
    patience: stop a phase (head, adapter) after this many epochs in a row that do not beat
        the best validation score so far (the frozen encoder counts as epoch 0); unset = run
        every epoch. Only a single worker stops the adapter phase early (validation runs on
        rank 0; rank 0's head is broadcast to the others).
    grad_chunk: examples per backward pass when each example's loss stands alone (no in-batch
        negatives): the gradient is the whole batch's, but the tuned layers' activations are
        held for one chunk at a time, so memory does not grow with batch_size x negatives
        (unset = the whole batch in one pass).
    head: train a projection head (`recsys.encoder.model.attach_head`) with the adapter (or the
        full model); head_epochs: epochs of the head alone before them (0 = none), over every
        training example with all its shown negatives, at learning rate head_lr in batches of
        head_batch_size.
    template: item text template (see `recsys.encoder.text`).
    num_workers: Ray Train workers (the plain loop ignores it).
    cache_frozen_layers: with LoRA in the top `lora_layers` only, run the frozen layers below
        once per item text and train over their cached states (`recsys.encoder.partial`).
    bf16: train under bfloat16 autocast where the device computes it natively (CUDA; CPUs
        with AVX512-BF16 or AMX), else float32.
    """

    method: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    lora_layers: int | None = 2
    epochs: int = 3
    max_steps: int | None = 150
    batch_size: int = 16
    lr: float = 1e-3
    temperature: float = 0.1
    history_len: int = 50
    negatives: int = 6
    max_length: int = 64
    history_grad: bool = False
    in_batch_negatives: bool | None = None
    val_fraction: float = 0.1
    val_examples: int = 300
    template: str = DEFAULT_TEMPLATE
    seed: int = 0
    num_workers: int = 1
    cache_frozen_layers: bool = True
    bf16: bool = True
    val_new_items: bool = True
    patience: int | None = 1
    grad_chunk: int | None = 4
    head: bool = True
    head_epochs: int = 4
    head_lr: float = 1e-3
    head_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"finetune.method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        positive_ints = ("lora_r", "lora_alpha", "epochs", "batch_size", "history_len")
        for name in (*positive_ints, "num_workers", "val_examples", "head_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"finetune.max_steps must be >= 1 or unset, got {self.max_steps}")
        if self.grad_chunk is not None and self.grad_chunk < 1:
            raise ConfigError(f"finetune.grad_chunk must be >= 1 or unset, got {self.grad_chunk}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"finetune.patience must be >= 1 or unset, got {self.patience}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"finetune.lora_layers must be >= 1 or unset, got {self.lora_layers}")
        if self.head_epochs < 0:
            raise ConfigError(f"finetune.head_epochs must be >= 0, got {self.head_epochs}")
        if not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise ConfigError(f"finetune.head_lr must be a positive number, got {self.head_lr}")
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
    if config.head and config.method != "none":
        attach_head(model, trainable=True)
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
    shown: np.ndarray,
    positive: np.ndarray,
    k: int,
    n_items: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """(B, k) negatives: shown-not-clicked items first (random order), then sampled items
    (from `pool`, catalogue rows, when given; else from all n_items)."""
    b = shown.shape[0]
    out = rng.integers(0, n_items if pool is None else len(pool), size=(b, k)).astype(np.int32)
    if pool is not None:
        out = pool[out].astype(np.int32)
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
    cache: LayerCache | None = None,
    history_table: tuple[np.ndarray, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss of one batch (graph attached). Each distinct item is encoded once.

    plain_model: the model without a DDP wrapper, used for the gradient-free history pass.
    cache: lower-layer states of the rows (`recsys.encoder.partial`): only the top layers run.
    history_table: (sorted rows, their vectors (R, D)) encoded without gradients at the start
        of the epoch: history vectors are looked up there instead of encoded each step (with
        history_grad False), so long histories cost nothing per step.
    """

    def encode(rows: np.ndarray) -> torch.Tensor:  # with gradients
        if cache is not None:
            return cache.embed(rows)
        ids, mask = tokens.batch(rows, device)
        return embed_tokens(model, ids, mask)

    def encode_frozen(rows: np.ndarray) -> torch.Tensor:  # current weights, no gradients
        return _encode_nograd(plain_model or model, tokens, rows, device, cache)

    cand_items = np.concatenate([batch.positive, batch.negatives.ravel()])  # (B + B*k,)
    hist = batch.history  # (B, h), -1 = padding
    if config.history_grad:
        rows = np.unique(np.concatenate([cand_items, hist[hist >= 0]]))
        hist_vecs = encode(rows)  # (U, D), one pass for both sides
        cand_vecs = hist_vecs[torch.as_tensor(np.searchsorted(rows, cand_items), device=device)]
    else:
        crows = np.unique(cand_items)
        cand_vecs = encode(crows)[
            torch.as_tensor(np.searchsorted(crows, cand_items), device=device)
        ]
        if history_table is not None:
            rows, hist_vecs = history_table
        else:
            rows = np.unique(hist[hist >= 0])
            hist_vecs = encode_frozen(rows)
    hist_idx = np.where(hist >= 0, np.searchsorted(rows, hist), -1)  # rows of hist_vecs
    users = user_vectors(hist_vecs, torch.as_tensor(hist_idx, device=device))
    return contrastive_loss(
        users,
        cand_vecs,
        torch.as_tensor(cand_items, device=device),
        torch.as_tensor(batch.positive, device=device),
        config.temperature,
        in_batch=config.in_batch_negatives is not False,
    )


def _chunks(batch: StepBatch, config: FinetuneConfig) -> Iterator[tuple[StepBatch, float]]:
    """The parts of a batch that go through one backward pass each, with their share of the
    batch loss.

    Without in-batch negatives, each example's loss depends on its own user and candidates
    only, so the batch loss is the mean of the examples' losses and the sum of
    share * part loss over parts of `grad_chunk` examples has the full batch's gradient, while
    the autograd graph (the activations of the tuned layers) holds one part at a time. With
    in-batch negatives the examples share one softmax: the batch stays whole.
    """
    n = batch.positive.shape[0]
    size = config.grad_chunk
    if config.in_batch_negatives is not False or size is None or size >= n:
        yield batch, 1.0
        return
    for s in range(0, n, size):
        part = slice(s, s + size)
        yield (
            StepBatch(batch.history[part], batch.positive[part], batch.negatives[part]),
            batch.positive[part].shape[0] / n,
        )


def _lr_lambda(total: int) -> Callable[[int], float]:
    warm = max(1, total // 10)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return f


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


@dataclass(frozen=True)
class FitResult:
    """What `fit` did. losses: every step's loss; scores: the validation score before training
    (index 0) and after each epoch (empty without `validate`); best_epoch: the epoch whose
    weights the model holds at the end (0 = the weights it started with)."""

    losses: list[float]
    scores: list[float]
    best_epoch: int


def _encode_nograd(
    model: nn.Module,
    tokens: TokenCache,
    rows: np.ndarray,
    device: torch.device,
    cache: LayerCache | None,
) -> torch.Tensor:
    """Unit vectors (len(rows), D) of catalogue rows with the current weights, eval mode, no
    gradients (through the cached lower layers when there is a cache)."""
    if cache is None:
        return encode_rows(model, tokens, rows, device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parts = [cache.embed(rows[s : s + 256]) for s in range(0, len(rows), 256)]
    model.train(was_training)
    if not parts:
        return torch.zeros((0, 0), device=device)
    return torch.cat(parts)


def _head_epochs(
    model: nn.Module,
    head: nn.Linear,
    tokens: TokenCache,
    examples: Examples,
    config: FinetuneConfig,
    device: torch.device,
    cache: LayerCache | None,
    extra_rows: np.ndarray,
    in_batch: bool,
    rng: np.random.Generator,
) -> Iterator[tuple[list[float], Callable[[np.ndarray], torch.Tensor]]]:
    """Train the projection head alone, `config.head_epochs` epochs; yields after each epoch
    (its step losses, unit vectors of catalogue rows under the current head).

    The encoder's vectors (without the head) of every row the examples name, plus
    `extra_rows` (validation's), are computed once; a step then costs a (rows, D) x (D, D)
    product for the batch's rows only. Both towers get the gradient: the user vector is the
    normalised mean of the projected history vectors. Negatives: every shown-not-clicked item
    (impressions), else `config.negatives` rows sampled from those named; plus the batch's
    other positives when `in_batch`.
    """
    hist, shown = examples.history, examples.shown
    rows = np.unique(
        np.concatenate([hist[hist >= 0], examples.positive, shown[shown >= 0], extra_rows])
    )
    with without_head(model):
        base = _encode_nograd(model, tokens, rows, device, cache).float()  # (R, D)

    def at(r: np.ndarray) -> np.ndarray:  # positions in `rows`, -1 stays -1
        return np.where(r >= 0, np.searchsorted(rows, np.maximum(r, 0)), -1)

    pos, hpos = at(examples.positive), at(hist)
    spos = at(shown) if bool((shown >= 0).any()) else None
    opt = torch.optim.Adam([head.weight], lr=config.head_lr)

    def project(idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.linear(base[idx], head.weight), p=2, dim=-1)

    def vectors(q: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return project(torch.as_tensor(at(np.asarray(q)), device=device))

    n, bs = len(examples), config.head_batch_size
    for _ in range(config.head_epochs):
        perm = rng.permutation(n)
        losses: list[float] = []
        for s in range(0, n, bs):
            b = perm[s : s + bs]
            if spos is not None:
                neg = spos[b]
            else:
                neg = rng.integers(0, len(rows), size=(len(b), max(1, config.negatives)))
            h = torch.as_tensor(hpos[b], device=device)
            p = torch.as_tensor(pos[b], device=device)
            ng = torch.as_tensor(neg, device=device)
            uniq, inv = torch.unique(
                torch.cat([h.flatten(), p, ng.flatten()]).clamp(min=0), return_inverse=True
            )
            x = project(uniq)  # (U, D), the batch's rows only
            k = h.numel()
            hv = torch.where(h >= 0, inv[:k].view(h.shape), -1)
            pv, nv = inv[k : k + len(b)], inv[k + len(b) :].view(ng.shape)
            users = user_vectors(x, hv)  # (B, D)
            cols = [(x[pv] * users).sum(-1, keepdim=True)]
            own = torch.einsum("bkd,bd->bk", x[nv], users)
            cols.append(own.masked_fill((ng < 0) | (ng == p.unsqueeze(1)), float("-inf")))
            if in_batch:
                other = users @ x[pv].T  # (B, B): the others' positives
                cols.append(other.masked_fill(p.unsqueeze(1) == p.unsqueeze(0), float("-inf")))
            logits = torch.cat(cols, dim=1) / config.temperature
            loss = F.cross_entropy(logits, torch.zeros(len(b), dtype=torch.long, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        yield losses, vectors


def _all_reduce_grads(params: Sequence[torch.Tensor], world: int) -> None:
    """Average gradients over the workers (the cached path runs outside the DDP wrapper)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


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
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train `model` in place on `examples`.

    Runs under `deterministic_ops`: the same examples, config and seed give the same weights,
    bit for bit, in any process with the same thread count.

    Every worker (rank of world) walks the same seeded permutation and takes its share, so all
    workers run the same number of steps. A model with a trainable projection head first
    trains the head alone for `config.head_epochs` (`_head_epochs`; its epochs are numbered
    first, and the adapter epochs start from the best head). cache: run only the top layers
    over cached lower-layer states (`recsys.encoder.partial`). validate: scores the current
    weights (higher is better; a `Validator` also scores the head phase's vectors directly);
    called before training and after each epoch, and the best weights are restored at the end
    (the starting ones when no epoch beat them). on_step gets {step, epoch, loss, lr, seconds,
    examples_per_s} (adapter steps); on_epoch gets {epoch, phase ("head" or "adapter"), loss
    (mean of the epoch's steps), steps, seconds, step_losses, val_score (when validating)}.
    """
    if len(examples) == 0:
        raise DataError(
            "no training examples: no click or interaction has an earlier interaction of the same "
            "user to serve as history; the dataset needs users with at least two interactions"
        )
    dev = torch.device(device)
    if config.in_batch_negatives is None:
        in_batch = examples.source != "impressions"
        config = dataclasses.replace(config, in_batch_negatives=in_batch)
    named = [(n, p) for n, p in (plain_model or model).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        return FitResult([], [], 0)
    per_epoch, total = plan_steps(len(examples), config, world)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    rng = np.random.default_rng(config.seed)
    neg_rng = np.random.default_rng([config.seed, rank])
    torch.manual_seed(config.seed)
    use_amp = use_bf16(config, dev)
    losses: list[float] = []
    scores: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def checkpoint(
        epoch: int, vectors: Callable[[np.ndarray], torch.Tensor] | None = None
    ) -> float | None:
        """Validate (the head phase's `vectors` directly, when the validator can); keep the
        best weights."""
        nonlocal best
        if validate is None:
            return None
        if vectors is not None and isinstance(validate, Validator):
            score = validate(vectors)
        else:
            score = float(validate())
        scores.append(score)
        if best is None or score > best[0]:
            best = (score, epoch, {n: p.detach().clone() for n, p in named})
        return score

    def report(epoch: int, phase: str, epoch_losses: list[float], score: float | None) -> None:
        if on_epoch is None:
            return
        payload: dict[str, Any] = {
            "epoch": epoch,
            "phase": phase,
            "loss": float(np.mean(epoch_losses)),
            "steps": len(epoch_losses),
            "seconds": time.perf_counter() - t0,
            "step_losses": epoch_losses,
        }
        if score is not None:
            payload["val_score"] = score
        on_epoch(payload)

    checkpoint(0)
    t0 = time.perf_counter()
    step = epochs_run = 0
    owner = plain_model or model
    head = projection_head(owner)
    if head is not None and head.weight.requires_grad and config.head_epochs > 0:
        extra = getattr(validate, "rows", np.zeros(0, dtype=np.int64))
        phase = _head_epochs(
            owner, head, tokens, examples, config, dev, cache, np.asarray(extra),
            bool(config.in_batch_negatives), np.random.default_rng([config.seed, 11]),
        )  # fmt: skip
        for head_losses, vectors in phase:
            epochs_run += 1
            report(epochs_run, "head", head_losses, checkpoint(epochs_run, vectors))
            if (
                config.patience is not None
                and best is not None
                and epochs_run - best[1] >= config.patience
            ):
                break
        if best is not None:  # the adapter epochs start from the best head (or the identity)
            _restore(named, best[2])
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(head.weight.data, src=0)  # rank 0 validated
    adapter_start = epochs_run
    model.train()
    hist_rows = np.unique(examples.history[examples.history >= 0])
    for epoch in range(config.epochs):
        perm = rng.permutation(len(examples))
        mine = perm[rank::world]
        epoch_losses: list[float] = []
        table = None
        if not config.history_grad:  # history vectors of this epoch's weights, looked up
            table = (hist_rows, _encode_nograd(plain_model or model, tokens, hist_rows, dev, cache))
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
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for part, share in _chunks(batch, config):
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = batch_loss(model, tokens, part, config, dev, plain_model, cache, table)
                (loss * share).backward()
                value += float(loss.detach()) * share
            if cache is not None and world > 1:
                _all_reduce_grads(params, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(value)
            epoch_losses.append(value)
            step += 1
            if on_step is not None:
                seconds = time.perf_counter() - t0
                on_step(
                    {
                        "step": step,
                        "steps": total,
                        "epoch": adapter_start + epoch + 1,
                        "loss": value,
                        "lr": sched.get_last_lr()[0],
                        "seconds": seconds,
                        "examples_per_s": step * config.batch_size / max(seconds, 1e-9),
                    }
                )
        if epoch_losses:
            epochs_run = adapter_start + epoch + 1
            model.eval()
            score = checkpoint(epochs_run)
            model.train()
            report(epochs_run, "adapter", epoch_losses, score)
        if step >= total:
            break
        if (
            config.patience is not None
            and world == 1
            and best is not None
            and epochs_run - max(best[1], adapter_start) >= config.patience
        ):
            break  # the last `patience` epochs did not beat the best: stop early
    model.eval()
    best_epoch = epochs_run if best is None else best[1]
    if best is not None:
        _restore(named, best[2])
    return FitResult(losses, scores, best_epoch)


def _restore(named: Sequence[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, p), value in zip(named, saved.values(), strict=True):
            p.copy_(value)


# ---------------------------------------------------------------------------------------------
# Validation


def _evaluation_rows(
    examples: Examples, sampled_negatives: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalogue rows `evaluate` scores, sorted; sampled negatives (n, k); has_shown (n,))."""
    rng = np.random.default_rng([seed, 7])
    shown = examples.shown
    n = len(examples)
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
    return rows, sampled, has_shown


def evaluate(
    model: nn.Module,
    tokens: TokenCache,
    examples: Examples,
    *,
    device: torch.device | str = "cpu",
    sampled_negatives: int = 20,
    seed: int = 0,
    cache: LayerCache | None = None,
    vectors: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Semantic-score metrics over `examples`: each positive against its shown negatives (or
    `sampled_negatives` sampled items when none were shown).

    vectors: unit vectors of catalogue rows, to score instead of the model's current ones.
    Returns {"val_auc": mean per-example AUC (ties count half), "val_mrr": mean 1/rank of the
    positive (ties rank it below), "val_examples": n}; empty dict for no examples.
    """
    n = len(examples)
    if n == 0:
        return {}
    dev = torch.device(device)
    rows, sampled, has_shown = _evaluation_rows(examples, sampled_negatives, seed)
    shown = examples.shown
    found = _encode_nograd(model, tokens, rows, dev, cache) if vectors is None else vectors(rows)
    vecs = found.float().cpu().numpy()  # (R, D)
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
    val_scores: list[float] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def fell_back(self) -> bool:
        """True when no epoch beat the starting (frozen) weights on validation."""
        return self.config.method != "none" and bool(self.val_scores) and self.best_epoch == 0


def use_bf16(config: FinetuneConfig, device: torch.device) -> bool:
    """bfloat16 autocast for training: asked for, and native on this device (no loss scaling
    is needed in bf16)."""
    if not config.bf16:
        return False
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16()


def layer_cache(
    model: nn.Module, tokens: TokenCache, config: FinetuneConfig, device: torch.device
) -> LayerCache | None:
    """A cache of the frozen lower layers' states when only the top layers are tuned (and the
    config allows it), else None."""
    start = first_tuned_layer(model, config.method, config.lora_layers)
    if not config.cache_frozen_layers or start == 0:
        return None
    return LayerCache(model, tokens, start, device, bf16=use_bf16(config, device))


def validation_score(
    model: nn.Module,
    tokens: TokenCache,
    val: Examples,
    config: FinetuneConfig,
    device: torch.device,
    cache: LayerCache | None,
) -> Validator | None:
    """The `validate` callback of `fit`: validation AUC of the current weights (None without
    validation examples): a `Validator`."""
    if len(val) == 0:
        return None
    return Validator(model, tokens, val, config.seed, device, cache)


class Validator:
    """Validation AUC (`evaluate`) of the model's current weights, or of given vectors.

    rows: the catalogue rows it scores (the head phase embeds them once with the rest)."""

    def __init__(
        self,
        model: nn.Module,
        tokens: TokenCache,
        val: Examples,
        seed: int,
        device: torch.device,
        cache: LayerCache | None,
    ) -> None:
        self.model, self.tokens, self.val, self.seed = model, tokens, val, seed
        self.device, self.cache = device, cache
        self.rows = _evaluation_rows(val, 20, seed)[0]

    def __call__(self, vectors: Callable[[np.ndarray], torch.Tensor] | None = None) -> float:
        m = evaluate(
            self.model, self.tokens, self.val, device=self.device, seed=self.seed,
            cache=self.cache, vectors=vectors,
        )  # fmt: skip
        return float(m.get("val_auc", 0.0))


def trained_state_digest(model: nn.Module) -> str:
    """A digest of the trainable tensors' bytes (identifies an unsaved fine-tuned model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _new_items_only(train: Examples, val: Examples) -> Examples:
    """In a catalogue that moves fast (news: at least NEW_ITEM_SHARE of the validation clicks
    are on items no training example clicked), validation keeps only the clicks on such new
    items, as tomorrow's will be: an encoder that memorised which items get clicked gains
    nothing there. A slow catalogue (films, products) keeps its validation as it is."""
    new = ~np.isin(val.positive, train.positive)
    if new.sum() < max(30, NEW_ITEM_SHARE * len(val)):
        return val
    return val.take(np.flatnonzero(new))


def prepare_examples(config: FinetuneConfig, data: Dataset) -> tuple[Examples, Examples]:
    """(train, validation) examples for `config` (validation capped at `val_examples`,
    keeping the latest)."""
    ex = build_examples(data, history_len=config.history_len, template=config.template)
    train, val = split_by_time(ex, config.val_fraction)
    if config.val_new_items:
        val = _new_items_only(train, val)
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
    fitted = FitResult([], [], 0)
    cache = None
    if config.method != "none":
        cache = layer_cache(model, tokens, config, dev)
        validate = validation_score(model, tokens, val, config, dev, cache)
        fitted = fit(
            model, tokens, train, config, device=dev, cache=cache, validate=validate,
            on_step=on_step,
        )  # fmt: skip
    model.eval()
    val_metrics = evaluate(model, tokens, val, device=dev, seed=config.seed, cache=cache)
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
        losses=fitted.losses,
        trainable_params=trainable,
        total_params=total,
        seconds=time.perf_counter() - t0,
        val_metrics=val_metrics,
        examples={
            "train": len(train),
            "validation": len(val),
            "without_history": train.without_history,
        },
        val_scores=fitted.scores,
        best_epoch=fitted.best_epoch,
    )
