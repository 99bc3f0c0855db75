"""`TextEncoder`: texts → unit vectors, from a base model folder or an encoder directory.

    enc = TextEncoder.load()                      # packaged all-MiniLM-L6-v2, fp32 CPU
    enc = TextEncoder.load(dir, quantize="int8")  # a fine-tuned encoder directory, int8
    vectors = enc.embed(texts)                    # (n, 384) float32, unit rows

It sits above `recsys.encoder.store` (which reads encoder directories) and
`recsys.encoder.model` (the transformer, pooling, precision), so neither of those imports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.encoder.model import (
    attach_head,
    default_model_path,
    embed_tokens,
    encoder_identity,
    keep_freed_memory,
    pad_batch,
    resolve_device,
    resolve_precision,
    to_precision,
    tokenize,
)
from recsys.encoder.store import LoadedWeights, load_encoder_weights
from recsys.encoder.text import DEFAULT_TEMPLATE, template_fields
from recsys.errors import ConfigError


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
        if not 8 <= max_length <= 512:
            raise ConfigError(f"max_length must be in [8, 512], got {max_length}")
        dev = resolve_device(device)
        precision = resolve_precision(quantize, dev)
        loaded = load_encoder_weights(default_model_path() if path is None else Path(path))
        tmpl = template if template is not None else loaded.template
        template_fields(tmpl)
        return cls(
            _for_inference(loaded, precision, dev),
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

        Each distinct token sequence is embedded once: catalogues repeat texts (H&M: 105,542
        article texts, 49,750 distinct; colour variants share one description), and texts that
        differ only beyond `max_length` tokens truncate to the same input. Sequences are sorted
        by token count and batched, so each batch pads to a similar length.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        by_text: dict[str, int] = {}
        text_row = [by_text.setdefault(t, len(by_text)) for t in texts]
        by_tokens: dict[tuple[int, ...], int] = {}
        token_row = [
            by_tokens.setdefault(tuple(s), len(by_tokens))
            for s in tokenize(self.tokenizer, list(by_text), self.max_length)
        ]
        vecs = self.embed_token_ids(list(by_tokens), batch_size, progress)
        return vecs[np.asarray(token_row, dtype=np.int64)[text_row]]

    def embed_token_ids(
        self, ids: Sequence[Sequence[int]], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Unit vectors (n, dim) float32 for token id sequences (as `tokenize` returns them)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        pad_id = self.tokenizer.pad_token_id or 0
        self.model.eval()
        with torch.inference_mode():
            for rows in _length_batches(ids, batch_size, progress):
                input_ids, mask = pad_batch([ids[i] for i in rows], pad_id, self.device)
                out[rows] = embed_tokens(self.model, input_ids, mask).cpu().numpy()
        return out

    def __repr__(self) -> str:
        return (
            f"TextEncoder(source={self.source}, dim={self.dim}, precision={self.precision}, "
            f"device={self.device}, max_length={self.max_length}, id={self.encoder_id[:12]})"
        )


def _for_inference(loaded: LoadedWeights, precision: str, device: torch.device) -> nn.Module:
    """The loaded model in `precision` on `device`, eval mode, its head (float32) attached."""
    model = loaded.model
    if device.type == "cpu":
        keep_freed_memory()
        # For item texts (tens of tokens) on CPU, plain matmul + softmax attention beats
        # the fused SDPA kernel (int8 forward 290 → 329 texts/s on bench_embed's texts);
        # the same values to float rounding.
        set_attn = getattr(model, "set_attn_implementation", None)
        if callable(set_attn):
            set_attn("eager")
    model = to_precision(model, precision, device)
    if loaded.head is not None:  # after the precision change: the head stays float32
        attach_head(model, loaded.head.to(device))
    model.eval()
    return model


def _length_batches(
    ids: Sequence[Sequence[int]], batch_size: int, progress: bool
) -> Iterator[np.ndarray]:
    """Positions in `ids`, longest sequences first, `batch_size` at a time (so each batch pads
    to a similar length); a progress bar when `progress`."""
    order = np.argsort([-len(s) for s in ids], kind="stable")
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="embedding", unit="batch")  # type: ignore[assignment]
    for s in starts:
        yield order[s : s + batch_size]
