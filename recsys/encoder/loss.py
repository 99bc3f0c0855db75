"""The contrastive loss of one training batch: user vectors against positives and negatives.

item vector  v = normalise(W normalise(mean_pool(encoder(text))))         (D,)
             (W: the projection head, identity at the start; without a head, no W)
user vector  u = normalise(mean of the history item vectors)              (D,)
loss = cross-entropy of softmax(u · [positive, shown negatives, in-batch candidates] / T)
       with the positive as target; other examples' positives and negatives serve as
       in-batch negatives (a candidate equal to the row's own positive is masked out).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.encoder.config import FinetuneConfig
from recsys.encoder.model import embed_tokens
from recsys.encoder.partial import LayerCache
from recsys.encoder.tokens import TokenCache, encode_nograd


def user_vectors(item_vecs: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """Unit user vectors (B, D): the normalised mean of item_vecs[history] over valid entries.

    item_vecs: (M, D); history: (B, h) indices into item_vecs, -1 = padding.
    """
    valid = (history >= 0).unsqueeze(-1).to(item_vecs.dtype)  # (B, h, 1)
    gathered = item_vecs[history.clamp(min=0)] * valid  # (B, h, D)
    mean = gathered.sum(1) / valid.sum(1).clamp(min=1.0)
    return F.normalize(mean, p=2, dim=-1)


def contrastive_loss(
    users: torch.Tensor,
    candidates: torch.Tensor,
    candidate_items: torch.Tensor,
    positive_items: torch.Tensor,
    temperature: float,
    in_batch: bool = True,
) -> torch.Tensor:
    """Softmax cross-entropy over each example's candidates, with in-batch negatives.

    users: (B, D) unit; candidates: (C, D) unit with C = B + B*k: rows 0..B-1 = each example's
    positive, then k negatives per example (example b's at B + b*k .. B + b*k + k - 1);
    candidate_items: (C,) catalogue rows; positive_items: (B,). Target of row b is column b.
    in_batch: the other examples' candidates are negatives too; False = only the row's own k.
    A column holding the same item as row b's positive (another click of it) is masked out,
    so an item never counts against itself.
    """
    logits = users @ candidates.T / temperature  # (B, C)
    b, c = users.shape[0], candidates.shape[0]
    rows = torch.arange(b, device=users.device)
    same = candidate_items.unsqueeze(0) == positive_items.unsqueeze(1)  # (B, C)
    same[rows, rows] = False
    if not in_batch:
        k = (c - b) // b
        owner = torch.cat([rows, rows.repeat_interleave(k)])  # (C,) example of each column
        same |= owner.unsqueeze(0) != rows.unsqueeze(1)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(b, device=users.device))


def pick_negatives(
    shown: np.ndarray,
    positive: np.ndarray,
    k: int,
    n_items: int,
    rng: np.random.Generator,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """(B, k) negatives: shown-not-clicked items first (random order), then sampled items
    (from `pool`, catalogue rows, when given; else from all n_items)."""
    b = shown.shape[0]
    out = rng.integers(0, n_items if pool is None else len(pool), size=(b, k)).astype(np.int32)
    if pool is not None:
        out = pool[out].astype(np.int32)
    for i in range(b):  # B is small (a batch); per-row choice of the shown items
        cand = shown[i][shown[i] >= 0]
        cand = cand[cand != positive[i]]
        if cand.size:
            take = rng.permutation(cand)[:k]
            out[i, : take.size] = take
    return out


@dataclass
class StepBatch:
    history: np.ndarray  # (B, h)
    positive: np.ndarray  # (B,)
    negatives: np.ndarray  # (B, k)


def batch_loss(
    model: nn.Module,
    tokens: TokenCache,
    batch: StepBatch,
    config: FinetuneConfig,
    device: torch.device,
    plain_model: nn.Module | None = None,
    cache: LayerCache | None = None,
    history_table: tuple[np.ndarray, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The loss of one batch (graph attached). Each distinct item is encoded once.

    plain_model: the model without a DDP wrapper, used for the gradient-free history pass.
    cache: lower-layer states of the rows (`recsys.encoder.partial`): only the top layers run.
    history_table: (sorted rows, their vectors (R, D)) encoded without gradients at the start
        of the epoch: history vectors are looked up there instead of encoded each step (with
        history_grad False), so long histories cost nothing per step.
    """

    def encode(rows: np.ndarray) -> torch.Tensor:  # with gradients
        if cache is not None:
            return cache.embed(rows)
        ids, mask = tokens.batch(rows, device)
        return embed_tokens(model, ids, mask)

    def encode_frozen(rows: np.ndarray) -> torch.Tensor:  # current weights, no gradients
        return encode_nograd(plain_model or model, tokens, rows, device, cache)

    cand_items = np.concatenate([batch.positive, batch.negatives.ravel()])  # (B + B*k,)
    hist = batch.history  # (B, h), -1 = padding
    if config.history_grad:
        rows = np.unique(np.concatenate([cand_items, hist[hist >= 0]]))
        hist_vecs = encode(rows)  # (U, D), one pass for both sides
        cand_vecs = hist_vecs[torch.as_tensor(np.searchsorted(rows, cand_items), device=device)]
    else:
        crows = np.unique(cand_items)
        cand_vecs = encode(crows)[
            torch.as_tensor(np.searchsorted(crows, cand_items), device=device)
        ]
        if history_table is not None:
            rows, hist_vecs = history_table
        else:
            rows = np.unique(hist[hist >= 0])
            hist_vecs = encode_frozen(rows)
    hist_idx = np.where(hist >= 0, np.searchsorted(rows, hist), -1)  # rows of hist_vecs
    users = user_vectors(hist_vecs, torch.as_tensor(hist_idx, device=device))
    return contrastive_loss(
        users,
        cand_vecs,
        torch.as_tensor(cand_items, device=device),
        torch.as_tensor(batch.positive, device=device),
        config.temperature,
        in_batch=config.in_batch_negatives is not False,
    )


def grad_chunks(batch: StepBatch, config: FinetuneConfig) -> Iterator[tuple[StepBatch, float]]:
    """The parts of a batch that go through one backward pass each, with their share of the
    batch loss.

    Without in-batch negatives, each example's loss depends on its own user and candidates
    only, so the batch loss is the mean of the examples' losses and the sum of
    share * part loss over parts of `grad_chunk` examples has the full batch's gradient, while
    the autograd graph (the activations of the tuned layers) holds one part at a time. With
    in-batch negatives the examples share one softmax: the batch stays whole.
    """
    n = batch.positive.shape[0]
    size = config.grad_chunk
    if config.in_batch_negatives is not False or size is None or size >= n:
        yield batch, 1.0
        return
    for s in range(0, n, size):
        part = slice(s, s + size)
        yield (
            StepBatch(batch.history[part], batch.positive[part], batch.negatives[part]),
            batch.positive[part].shape[0] / n,
        )
