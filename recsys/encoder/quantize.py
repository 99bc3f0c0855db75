"""Int8 kernels for CPU inference: every `nn.Linear` of an encoder in int8.

Weights are quantised per output channel, activations per token (row) on the fly
(`Int8Linear`); an attention block's query, key and value run as one product
(`Int8FusedLinear`), and a feed-forward block's exact GELU runs in place inside the int8
layer. The product runs on `torch._int_mm` (VNNI/AMX on x86; see
`recsys.encoder.model.cpu_has_fast_int8` for where that is fast). `quantize_int8` converts a
model in place; `recsys.encoder.model.to_precision` calls it for precision "int8".
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in) float) → (int8 W.T (in, out), scale per output channel (out,) float32)."""
    w = weight.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale


@torch.no_grad()
def int8_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor,
    gelu: bool = False,
) -> torch.Tensor:
    """x (..., in) float @ int8 weights → (..., out) float32, activations quantised per row.

    y = (q(x) @ W_q) * s_x * s_w + b, q(x) = round(x / s_x), s_x = max|x_row| / 127; then the
    exact GELU when `gelu`. The row maximum comes from amax and amin (two reads, no temporary);
    the epilogue (int32 → float, scales, bias, GELU) works in place on the product's buffer: a
    new buffer per step costs about twice as much on CPU (cold memory). Inference only: no
    gradient flows through it (rounding has none), also when called with gradients enabled.
    """
    x2 = x.reshape(-1, x.shape[-1]).float()
    sx = torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_())
    sx = sx.clamp_(min=1e-8).div_(127.0)  # (M, 1)
    xq = torch.div(x2, sx).round_().to(torch.int8)
    m = xq.shape[0]
    if m <= 16:  # _int_mm needs more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
    acc = torch._int_mm(xq, weight_t)[:m]  # int32, a fresh buffer
    y = acc.view(torch.float32).copy_(acc)  # int32 → float32 in place: no second buffer
    y = torch.addcmul(bias, y.mul_(sx), weight_scale, out=y)
    if gelu:
        y = torch.ops.aten.gelu_(y)
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


class Int8Linear(nn.Module):
    """A Linear layer in int8: weights per output channel, activations per token (row).

    Per-token scales matter for BERT-style encoders: a few tokens ([CLS], [SEP], punctuation)
    carry activations far larger than the rest, and one scale per tensor (PyTorch's
    `quantize_dynamic`) then crushes every other token (cosine to fp32 ~0.93 on MiniLM against
    ~0.997 here). The int8 product runs on `torch._int_mm` (VNNI on x86); see `int8_linear`.
    """

    weight_t: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.gelu = gelu  # the exact GELU that followed this layer, applied in place
        self.register_buffer("weight_t", q)  # (in, out) int8
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x, self.weight_t, self.weight_scale, self.bias, self.gelu)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        gelu = " + gelu" if self.gelu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{gelu}"


class Int8FusedLinear(Int8Linear):
    """Sibling Linear layers that read the same input (an attention block's query, key and
    value), concatenated into one int8 product: the input is quantised once and multiplied once.

    Each sibling becomes an `Int8Part`. The first part called with an input computes every
    part's output and keeps it until all parts have taken theirs; a part called with another
    input (cross-attention, any order of calls) or with the same tensor changed in place since
    (its version counter moved; inference-mode tensors have none, and no model here changes its
    hidden states in place) recomputes. When only some parts are ever called, the last output
    stays held until the next call.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [
            lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
            for lin in linears
        ]
        fused = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            fused.weight.copy_(weight)
            fused.bias.copy_(torch.cat(biases))
        super().__init__(fused)
        bounds = itertools.accumulate([lin.out_features for lin in linears], initial=0)
        self.slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        # (input, its version counter, fused output, parts already handed out)
        self._cache: tuple[torch.Tensor, int, torch.Tensor, set[int]] | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part `index`'s output for `x` (a view into the fused output)."""
        cache = self._cache
        version = -1 if x.is_inference() else x._version  # inference tensors keep no counter
        if cache is None or cache[0] is not x or cache[1] != version or index in cache[3]:
            cache = self._cache = (x, version, self(x), set())
        cache[3].add(index)
        if len(cache[3]) == len(self.slices):
            self._cache = None  # every part has its output: hold no tensors between calls
        return cache[2][..., self.slices[index]]


class Int8Part(nn.Module):
    """One former Linear layer of an `Int8FusedLinear` (which its parent module owns)."""

    def __init__(self, fused: Int8FusedLinear, index: int) -> None:
        super().__init__()
        self._fused = [fused]  # a list: not registered again, so the state dict holds it once
        self.index = index
        self.in_features = fused.in_features
        self.out_features = fused.slices[index].stop - fused.slices[index].start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of a fused int8 linear, out_features={self.out_features}"


# Linear siblings that read the same hidden states (BERT/MiniLM, DistilBERT, most decoders).
FUSABLE_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("q_proj", "k_proj", "v_proj"),
)


def is_exact_gelu(module: nn.Module) -> bool:
    """True for torch's nn.GELU() and transformers' GELUActivation (both the erf form)."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with every nn.Linear in int8 (CPU inference only; in place).

    Query/key/value siblings (`FUSABLE_SIBLINGS`) become one `Int8FusedLinear`, owned by their
    parent as `fused_int8`; every other Linear becomes an `Int8Linear`. A feed-forward block
    that is `dense` then an exact GELU `intermediate_act_fn` (BERT's intermediate: its forward
    is exactly act(dense(x))) gets the GELU fused into the int8 layer, and Identity in its place.
    """
    for module in list(model.modules()):
        dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        if isinstance(dense, nn.Linear) and isinstance(act, nn.Module) and is_exact_gelu(act):
            module.dense = Int8Linear(dense, gelu=True)
            module.intermediate_act_fn = nn.Identity()
        children = dict(module.named_children())
        for names in FUSABLE_SIBLINGS:
            linears = [children.get(n) for n in names]
            if all(isinstance(lin, nn.Linear) for lin in linears) and (
                len({lin.in_features for lin in linears if lin is not None}) == 1
            ):
                fused = Int8FusedLinear([lin for lin in linears if isinstance(lin, nn.Linear)])
                module.add_module("fused_int8", fused)
                for i, n in enumerate(names):
                    setattr(module, n, Int8Part(fused, i))
                break
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
