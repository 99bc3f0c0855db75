"""Item texts as token ids, and unit vectors of catalogue rows with a model's current weights.

tokens = TokenCache(tokenizer, examples.texts, max_length=64)
ids, mask = tokens.batch(rows, device)           # (B, T) int64 each, right-padded
vecs = encode_nograd(model, tokens, rows, device, cache)   # (len(rows), D) unit, no grad
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.encoder.model import embed_tokens, pad_batch, tokenize
from recsys.encoder.partial import LayerCache


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


def encode_nograd(
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
