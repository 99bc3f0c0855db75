"""Encoder directories: what fine-tuning changed, plus a manifest naming the base model.

ENCODER_DIR/encoder.json                      manifest (see `save_encoder`)
ENCODER_DIR/adapter/adapter_model.safetensors LoRA weights (method "lora"), adapter_config.json
ENCODER_DIR/model/model.safetensors           all weights (method "full"), config, tokenizer
ENCODER_DIR/{adapter,model}/head.safetensors  the projection head's weight, when trained
                                              (`recsys.encoder.model.attach_head`)
(method "none" writes the manifest alone: the base model is the encoder)

Only safetensors are written and read, never pickle. A directory is complete when it exists: it
is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from recsys.encoder.model import (
    MODEL_HINT,
    default_model_path,
    encoder_identity,
    load_base,
    projection_head,
    weights_digest,
    without_head,
)
from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError, DataError
from recsys.io import atomic_dir, replace_dir, write_json

MANIFEST = "encoder.json"
HEAD_FILE = "head.safetensors"  # in the delta folder, so the delta digest covers it
FORMAT = "recsys-encoder/1"
METHODS: tuple[str, ...] = ("lora", "full", "none")


class Trained(Protocol):
    """A training result `save_encoder` saves (`recsys.encoder.trainer.TrainResult` is one):
    the trained model, its base model folder and the fine-tuning config."""

    model: nn.Module
    base_model: Path
    config: Any


@dataclass
class LoadedWeights:
    """An fp32 model (adapter merged) with its tokenizer and the digests that identify it."""

    model: nn.Module
    tokenizer: Any
    base_digest: str
    delta_digest: str | None
    template: str
    source: Path
    manifest: dict[str, Any] | None
    head: torch.Tensor | None = None  # the projection head's weight (D, D), if any


def is_encoder_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(enc_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed encoder.json of `enc_dir` (a `ConfigError` if missing or malformed)."""
    p = Path(enc_dir) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: file missing; {MODEL_HINT}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: unreadable encoder manifest ({e}); re-run the fine-tuning") from e
    if manifest.get("format") != FORMAT or manifest.get("method") not in METHODS:
        raise ConfigError(
            f"{p}: not an encoder manifest (expected format {FORMAT!r} and method in {METHODS}); "
            "re-run the fine-tuning"
        )
    return manifest  # type: ignore[no-any-return]


def base_model_dir(manifest: dict[str, Any]) -> Path:
    """The base model folder a manifest refers to (the packaged model resolves per install)."""
    base = manifest["base_model"]
    return default_model_path() if base.get("packaged") else Path(base["path"])


def _delta_dir(enc_dir: Path, method: str) -> Path | None:
    return {"lora": enc_dir / "adapter", "full": enc_dir / "model"}.get(method)


def _checked_base(enc_dir: Path, manifest: dict[str, Any]) -> tuple[Path, str]:
    base = base_model_dir(manifest)
    if not base.is_dir():
        raise ConfigError(
            f"{enc_dir}: its base model {base} is missing; install it or copy it back there"
        )
    digest = weights_digest(base)
    if digest != manifest["base_model"]["weights_digest"]:
        raise ConfigError(
            f"{enc_dir}: the base model at {base} has other weights than the ones this encoder "
            "was trained on; point it at the original base model or re-run the fine-tuning"
        )
    return base, digest


def encoder_id_for(
    path: str | os.PathLike[str] | None, max_length: int, template: str | None = None
) -> str:
    """The `encoder_id` `TextEncoder.load(path, max_length=..., template=...)` would have,
    computed from file digests without loading the model."""
    p = default_model_path() if path is None else Path(path)
    if is_encoder_dir(p):
        manifest = read_manifest(p)
        _, base_digest = _checked_base(p, manifest)
        delta = _delta_dir(p, manifest["method"])
        tmpl = template if template is not None else manifest.get("template", DEFAULT_TEMPLATE)
        delta_digest = weights_digest(delta) if delta is not None else None
        return encoder_identity(base_digest, delta_digest, max_length, tmpl)
    from recsys.encoder.model import check_model_dir

    check_model_dir(p)
    return encoder_identity(weights_digest(p), None, max_length, template or DEFAULT_TEMPLATE)


def load_encoder_weights(path: Path) -> LoadedWeights:
    """Load a base model folder or an encoder directory as one fp32 eval-mode model."""
    if not is_encoder_dir(path):
        model, tokenizer = load_base(path)
        return LoadedWeights(
            model, tokenizer, weights_digest(path), None, DEFAULT_TEMPLATE, path, None
        )
    manifest = read_manifest(path)
    base, base_digest = _checked_base(path, manifest)
    method = manifest["method"]
    template = manifest.get("template", DEFAULT_TEMPLATE)
    delta = _delta_dir(path, method)
    if method == "none":
        model, tokenizer = load_base(base)
        return LoadedWeights(model, tokenizer, base_digest, None, template, path, manifest)
    assert delta is not None
    if not delta.is_dir() or not [f for f in delta.glob("*.safetensors") if f.name != HEAD_FILE]:
        raise DataError(
            f"{path}: encoder.json says method {method!r} but {delta} holds no safetensors; "
            "the directory is incomplete, re-run the fine-tuning"
        )
    if method == "full":
        model, tokenizer = load_base(delta)
    else:
        from peft import PeftModel

        model, tokenizer = load_base(base)
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, str(delta), is_trainable=False)
        except Exception as e:  # peft raises ValueError/KeyError/OSError for a bad adapter
            raise DataError(
                f"{delta}: cannot load the LoRA adapter ({e}); re-run the fine-tuning"
            ) from e
        model = model.merge_and_unload()  # type: ignore[operator]
        model.eval()
    head = None
    if (delta / HEAD_FILE).is_file():
        from safetensors.torch import load_file

        try:
            head = load_file(str(delta / HEAD_FILE))["weight"]
        except Exception as e:  # a truncated or foreign file
            raise DataError(
                f"{delta / HEAD_FILE}: cannot read the projection head ({e}); re-run the "
                "fine-tuning"
            ) from e
    return LoadedWeights(
        model, tokenizer, base_digest, weights_digest(delta), template, path, manifest, head
    )


def head_only(path: str | os.PathLike[str]) -> tuple[np.ndarray, Path] | None:
    """(the projection head's weight (D, D) float32, the base model folder) when the encoder
    directory at `path` is its base model followed by that head alone: a LoRA adapter whose
    every update is zero (its lora_B matrices, as when fine-tuning shipped a head epoch) plus
    a head. Its vectors are then normalize(W v) of the base model's vectors v. Else None."""
    p = Path(path)
    if not is_encoder_dir(p):
        return None
    manifest = read_manifest(p)
    delta = _delta_dir(p, manifest["method"])
    if manifest["method"] != "lora" or delta is None or not (delta / HEAD_FILE).is_file():
        return None
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(delta / "adapter_model.safetensors"))
        head = load_file(str(delta / HEAD_FILE))["weight"]
    except Exception:  # no or unreadable adapter: `load_encoder_weights` says what is wrong
        return None
    updates = [v for k, v in weights.items() if "lora_B" in k]
    if not updates or any("lora_A" not in k and "lora_B" not in k for k in weights):
        return None  # other trained weights (modules_to_save, DoRA magnitudes...)
    if any(np.any(v) for v in updates):
        return None
    base, _ = _checked_base(p, manifest)
    return np.ascontiguousarray(head, dtype=np.float32), base


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel-style wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _method_of(model: nn.Module | None) -> str:
    if model is None:
        return "none"
    from peft import PeftModel

    return "lora" if isinstance(model, PeftModel) else "full"


def save_encoder(
    source: nn.Module | Trained | None,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    config: Any = None,
    max_length: int = 64,
    template: str | None = None,
) -> Path:
    """Write an encoder directory for `source`; return its path.

    source: a training result (`Trained`, e.g. a `TrainResult`: its model, base model and
        config are used), a peft LoRA model (adapter saved), a plain transformer (all weights
        saved, "full"), or None (the base model alone, "none").
    base_model: the base model folder (None = packaged MiniLM); taken from a TrainResult.
    config: the fine-tuning config (a dataclass or dict), recorded in the manifest.
    max_length, template: the inference settings recorded in the manifest's `encoder_id`
        (template None = the config's template, else the default).

    encoder.json: format, method, base_model {path, packaged, name, weights_digest},
    delta_digest, max_length, template, encoder_id, config, created_at.
    """
    model = source
    if source is not None and not isinstance(source, nn.Module):  # a training result
        model, base_model, config = source.model, source.base_model, source.config
    if model is not None:
        model = _unwrap(model)
    method = getattr(config, "method", None) or _method_of(model)
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "none":
        model = None
    elif model is None:
        raise ConfigError(f"save_encoder: method {method!r} needs a model to save")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        cfg = dataclasses.asdict(config)
    else:
        cfg = dict(config or {})
    tmpl = template or cfg.get("template") or DEFAULT_TEMPLATE
    template_fields(tmpl)
    base = Path(base_model) if base_model is not None else default_model_path()
    base_digest = weights_digest(base)
    packaged = base.resolve() == default_model_path().resolve()

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        delta_digest = None
        if method in ("lora", "full"):
            assert model is not None
            delta_digest = _write_delta(model, method, base, tmp)
        name = json.loads((base / "config.json").read_text()).get("_name_or_path") or base.name
        manifest = {
            "format": FORMAT,
            "method": method,
            "base_model": {
                "path": str(base.resolve()),
                "packaged": packaged,
                "name": name,
                "weights_digest": base_digest,
            },
            "delta_digest": delta_digest,
            "max_length": max_length,
            "template": tmpl,
            "encoder_id": encoder_identity(base_digest, delta_digest, max_length, tmpl),
            "config": cfg,
            "created_at": datetime.now(UTC).isoformat(),
        }
        write_json(manifest, tmp / MANIFEST)
    return out


def _write_delta(model: nn.Module, method: str, base: Path, enc_dir: Path) -> str:
    """Write what fine-tuning changed (the adapter, or all weights and the tokenizer, plus the
    projection head apart) into `enc_dir`'s delta folder; its weights digest."""
    head = projection_head(model)
    delta = _delta_dir(enc_dir, method)
    assert delta is not None
    with without_head(model):  # saved apart: the transformer's own files stay standard
        model.save_pretrained(str(delta), safe_serialization=True)
    if method == "full":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(delta))
    if head is not None:
        from safetensors.torch import save_file

        weight = head.weight.detach().float().cpu().contiguous()
        save_file({"weight": weight}, str(delta / HEAD_FILE))
    return weights_digest(delta)


def install_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an existing `out` (moved aside first, then deleted)."""
    replace_dir(tmp, out)
