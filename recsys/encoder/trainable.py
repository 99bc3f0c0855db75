"""The model fine-tuning trains: the base model with a LoRA adapter (or all weights) and a
projection head, its parameter counts, and the cache of its frozen lower layers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys.encoder.config import FinetuneConfig
from recsys.encoder.model import attach_head, cpu_has_bf16, default_model_path, load_base
from recsys.encoder.partial import LayerCache, first_tuned_layer
from recsys.encoder.tokens import TokenCache
from recsys.errors import ConfigError


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
