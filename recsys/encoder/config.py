"""`FinetuneConfig`: the fine-tuning settings (the `[finetune]` section of an experiment config).

The defaults are sized for the nightly's budget (a few minutes on 2 CPU cores for a 5k-item news
catalogue of 64-token Danish texts). First a projection head, up to 4 epochs of every training
example with all its shown negatives, over the frozen encoder's vectors computed once. Then LoRA
r=16 on every linear layer of the top 2 of 6 layers, trained with the head over cached states of
the frozen 4 below (`cache_frozen_layers`): 3 epochs of 50 steps of 16 examples, 50 history
items (as the ranker's semantic features use), 6 shown-not-clicked negatives of the same
impression and no in-batch ones (those are other users' clicks, so popular items: on EB-NeRD
they cost the tuned encoder 0.011 AUC), 64 tokens as the catalogue embedding uses. The epoch
with the best validation AUC ships, from either phase, or the frozen encoder when none beats it;
the adapter phase stops after `patience` epochs without a better one.

Measured in process on EB-NeRD (tuned on week 1's first half, per-click AUC of the semantic
score against the shown items on 2,500 week-2 impressions): frozen 0.526; the adapter alone
(head = false, temperature 0.05) 0.525 after 3 epochs; the default 0.569, its best epoch the
head's second, in 247 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError

METHODS: tuple[str, ...] = ("lora", "full", "none")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings, validated when built (the module docstring says why the defaults).

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
    val_fraction: the latest share of examples (by time) held out for validation metrics,
        raised on a small log until val_examples are held out (at most 30% of them);
        val_examples: at most this many of them are scored. val_new_items: when at least 30% of
        them click an item that no training example clicked (a fast catalogue such as news),
        validate on those clicks only (when at least 200): tomorrow's clicks are on new items.
    patience: stop the adapter phase after this many epochs in a row that do not beat the
        best validation score so far (the frozen encoder counts as epoch 0); unset = run every
        epoch. The head phase always runs its head_epochs (seconds each; its first epoch often
        dips before it climbs). Only a single worker stops early (validation runs on rank 0;
        rank 0's head is broadcast to the others).
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
    base_model: a local `transformers` model folder (BERT-like: config.json, safetensors
        weights, a tokenizer) to tune, e.g. a multilingual sentence encoder for a catalogue not
        in English; its frozen vectors are the semantic_frozen baseline. None: the packaged
        all-MiniLM-L6-v2 (English).
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
    base_model: str | None = None

    def __post_init__(self) -> None:
        _validate(self)


def _validate(c: FinetuneConfig) -> None:
    """A `ConfigError` naming the first setting of `c` out of its range."""
    if c.method not in METHODS:
        raise ConfigError(f"finetune.method must be one of {', '.join(METHODS)}, got {c.method!r}")
    positive_ints = ("lora_r", "lora_alpha", "epochs", "batch_size", "history_len")
    for name in (*positive_ints, "num_workers", "val_examples", "head_batch_size"):
        if getattr(c, name) < 1:
            raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(c, name)}")
    for name in ("max_steps", "grad_chunk", "patience", "lora_layers"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ConfigError(f"finetune.{name} must be >= 1 or unset, got {value}")
    if c.head_epochs < 0:
        raise ConfigError(f"finetune.head_epochs must be >= 0, got {c.head_epochs}")
    if not (c.head_lr > 0 and math.isfinite(c.head_lr)):
        raise ConfigError(f"finetune.head_lr must be a positive number, got {c.head_lr}")
    if c.negatives < 0:
        raise ConfigError(f"finetune.negatives must be >= 0, got {c.negatives}")
    if not 0.0 <= c.lora_dropout < 1.0:
        raise ConfigError(f"finetune.lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if not 0.0 <= c.val_fraction < 0.9:
        raise ConfigError(f"finetune.val_fraction must be in [0, 0.9), got {c.val_fraction}")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise ConfigError(f"finetune.lr must be a positive number, got {c.lr}")
    if not c.temperature > 0:
        raise ConfigError(f"finetune.temperature must be > 0, got {c.temperature}")
    if not 8 <= c.max_length <= 512:
        raise ConfigError(f"finetune.max_length must be in [8, 512], got {c.max_length}")
    if not c.target_modules:
        raise ConfigError("finetune.target_modules must name at least one module, e.g. query")
    template_fields(c.template)
