"""Fine-tuning in this process (no Ray): examples, model, `fit`, validation, a `TextEncoder`.

    result = train_encoder(FinetuneConfig(), dataset)   # plain loop, no Ray
    save_encoder(result, "out/encoder")                 # encoder.json + adapter safetensors

`pipelines/finetune.py` runs the same steps inside Ray Train workers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recsys.data.dataset import Dataset
from recsys.encoder.callbacks import EpochEnd, StepEnd
from recsys.encoder.config import FinetuneConfig
from recsys.encoder.examples import Examples, build_examples, split_by_time
from recsys.encoder.loop import FitResult, fit
from recsys.encoder.model import default_model_path, encoder_identity, weights_digest
from recsys.encoder.textencoder import TextEncoder
from recsys.encoder.tokens import TokenCache
from recsys.encoder.trainable import build_model, count_params, layer_cache
from recsys.encoder.validation import evaluate, validation_score

NEW_ITEM_SHARE = 0.3  # validation clicks on unseen items from which a catalogue counts as fast
NEW_ITEM_MIN = 200  # ... and how many of them validate on new items alone
MAX_VALIDATION_SHARE = 0.3  # of a small log's examples, held out to reach config.val_examples


@dataclass
class TrainResult:
    """What `train_encoder` returns.

    encoder: a `TextEncoder` over the trained model (fp32, adapter not merged; its encoder_id
        marks it unsaved - save it with `save_encoder` and load the directory for the real id).
    model: the trained torch module (a peft model for "lora"); base_model: its base folder.
    losses: loss per step; val_metrics: see `evaluate` (empty without validation examples);
    epochs: every epoch's payload (see `recsys.encoder.callbacks.EpochEnd`).
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
    epochs: tuple[EpochEnd, ...] = ()

    @property
    def fell_back(self) -> bool:
        """True when no epoch beat the starting (frozen) weights on validation."""
        return self.config.method != "none" and bool(self.val_scores) and self.best_epoch == 0


def trained_state_digest(model: nn.Module) -> str:
    """A digest of the trainable tensors' bytes (identifies an unsaved fine-tuned model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _new_items_only(train: Examples, val: Examples, least: int = NEW_ITEM_MIN) -> Examples:
    """In a catalogue that moves fast (news: at least NEW_ITEM_SHARE of the validation clicks
    are on items no training example clicked), validation keeps only the clicks on such new
    items, as tomorrow's will be: an encoder that memorised which items get clicked gains
    nothing there. A slow catalogue (films, products) keeps its validation as it is, and so
    does one with fewer than `least` such clicks: too few to tell an epoch from noise."""
    new = ~np.isin(val.positive, train.positive)
    if new.sum() < max(least, NEW_ITEM_SHARE * len(val)):
        return val
    return val.take(np.flatnonzero(new))


def validation_share(config: FinetuneConfig, n: int) -> float:
    """The latest share of `n` examples held out: `config.val_fraction`, raised on a small log
    until it holds `config.val_examples` (at most MAX_VALIDATION_SHARE of them). A few dozen
    validation clicks cannot tell an epoch from noise (AUC's standard error is ~0.03 at 60),
    and they pick the epoch that ships."""
    if config.val_fraction <= 0 or n == 0:
        return config.val_fraction
    return max(config.val_fraction, min(MAX_VALIDATION_SHARE, config.val_examples / n))


def prepare_examples(config: FinetuneConfig, data: Dataset) -> tuple[Examples, Examples]:
    """(train, validation) examples for `config` (validation capped at `val_examples`,
    keeping the latest)."""
    ex = build_examples(data, history_len=config.history_len, template=config.template)
    train, val = split_by_time(ex, validation_share(config, len(ex)))
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
    on_step: Callable[[StepEnd], None] | None = None,
    device: str = "cpu",
) -> TrainResult:
    """Fine-tune the encoder on `data`'s clicks in this process (no Ray): `fit` with the best
    epoch restored, then the validation metrics of the weights it ends on."""
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
    encoder_id = encoder_identity(weights_digest(base), delta, config.max_length, config.template)
    encoder = TextEncoder(model, tokenizer, encoder_id=encoder_id, max_length=config.max_length,
                          template=config.template, device=dev, source=None)  # fmt: skip
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
        epochs=fitted.epochs,
    )
