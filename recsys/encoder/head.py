"""The head phase: the projection head alone, over the frozen encoder's vectors computed once.

Seconds per epoch, and the history side gets its gradient too, which the adapter phase cannot
afford. `fit` (`recsys.encoder.loop`) runs it before the adapter epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.encoder.config import FinetuneConfig
from recsys.encoder.examples import Examples
from recsys.encoder.loss import user_vectors
from recsys.encoder.model import without_head
from recsys.encoder.partial import LayerCache
from recsys.encoder.tokens import TokenCache, encode_nograd

Vectors = Callable[[np.ndarray], torch.Tensor]  # catalogue rows (n,) → unit vectors (n, D)


def head_epochs(
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
) -> Iterator[tuple[list[float], Vectors]]:
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
        base = encode_nograd(model, tokens, rows, device, cache).float()  # (R, D)

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
            loss = _head_loss(project, hpos[b], pos[b], neg, config.temperature, in_batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        yield losses, vectors


def _head_loss(
    project: Callable[[torch.Tensor], torch.Tensor],
    history: np.ndarray,
    positive: np.ndarray,
    negatives: np.ndarray,
    temperature: float,
    in_batch: bool,
    device: torch.device,
) -> torch.Tensor:
    """The head phase's loss of one batch; arguments are positions in the phase's row table:
    history (B, h) and negatives (B, k) with -1 = none, positive (B,). Each row the batch
    names is projected once."""
    h = torch.as_tensor(history, device=device)
    p = torch.as_tensor(positive, device=device)
    ng = torch.as_tensor(negatives, device=device)
    uniq, inv = torch.unique(
        torch.cat([h.flatten(), p, ng.flatten()]).clamp(min=0), return_inverse=True
    )
    x = project(uniq)  # (U, D), the batch's rows only
    k, b = h.numel(), len(positive)
    hv = torch.where(h >= 0, inv[:k].view(h.shape), -1)
    pv, nv = inv[k : k + b], inv[k + b :].view(ng.shape)
    users = user_vectors(x, hv)  # (B, D)
    cols = [(x[pv] * users).sum(-1, keepdim=True)]
    own = torch.einsum("bkd,bd->bk", x[nv], users)
    cols.append(own.masked_fill((ng < 0) | (ng == p.unsqueeze(1)), float("-inf")))
    if in_batch:
        other = users @ x[pv].T  # (B, B): the others' positives
        cols.append(other.masked_fill(p.unsqueeze(1) == p.unsqueeze(0), float("-inf")))
    logits = torch.cat(cols, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=device))
