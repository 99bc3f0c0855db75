"""Validation: the semantic score's AUC and MRR over held-out examples.

metrics = evaluate(model, tokens, val)      # {"val_auc", "val_mrr", "val_examples"}
validate = validation_score(model, tokens, val, config, device, cache)   # for `fit`
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from recsys.encoder.config import FinetuneConfig
from recsys.encoder.examples import Examples
from recsys.encoder.partial import LayerCache
from recsys.encoder.tokens import TokenCache, encode_nograd


def evaluation_rows(
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
    rows, sampled, has_shown = evaluation_rows(examples, sampled_negatives, seed)
    shown = examples.shown
    found = encode_nograd(model, tokens, rows, dev, cache) if vectors is None else vectors(rows)
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
        self.rows = evaluation_rows(val, 20, seed)[0]

    def __call__(self, vectors: Callable[[np.ndarray], torch.Tensor] | None = None) -> float:
        m = evaluate(
            self.model, self.tokens, self.val, device=self.device, seed=self.seed,
            cache=self.cache, vectors=vectors,
        )  # fmt: skip
        return float(m.get("val_auc", 0.0))


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
