"""Data-dependent (IA)³ (``patch(model, "ia3", dynamic=True)``): the scale vector l is generated per
token from the layer's input by a tiny bottleneck instead of being one learned vector,

    l(x) = 1 + tanh(g(x)),   g(x) = (x Dᵀ) Uᵀ,   D (r_g, K) "ia3_down",  U (S, r_g) "ia3_up",

x (..., K) the wrapped linear's input, S the number of scaled features. U starts at zero, so l = 1
and the wrapped model computes exactly what it did at step 0 (bit for bit: z ⊙ 1 == z). D starts
as nn.Linear's default (Kaiming-uniform), so U's first gradients are not zero. l lies in (0, 2).

* side="output" (keys, values): y = base(x) ⊙ l(x), the generator reading the layer input x.
  ``out_slices`` (GPT-2's k and v thirds of c_attn): only those rows are scaled (S = Σ slice rows).
* side="input" (the FFN output linear): y = base(x ⊙ l(x)), the generator reading the FFN hidden
  state x = act(h) itself (the static method's place for the FFN scale: that linear's input).

Output side: one fused op, ``ia3_dynamic_linear`` (the generator's x Dᵀ accumulated in the GEMM's K
loop, the scale in its epilogue); GPT-2's slices give U zero rows elsewhere (tanh(0) = 0: those
outputs exactly unscaled). Input side: torch's generator, ``dynamic_scale``, then the base layer
called as it is. At step 0 the torch backend (CPU) gives the base layer's outputs bit for bit; the
triton backend to rounding (its GEMM tiling), as static (IA)³. Disabled: the base layer itself.
No merge: a scale that depends on the input cannot be folded into the weights.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.ia3_dynamic import dynamic_scale, ia3_dynamic_linear
from .ia3 import wrap_scaled
from .lowrank_base import WrappedLinear, weight_nk

DEFAULT_GENERATOR_RANK = 4


class IA3DynamicLinear(WrappedLinear):
    """y = base(x) ⊙ l(x) (side="output") or base(x ⊙ l(x)) (side="input"); see the module docstring.

    The generator's weights are kept in ``adapter_dtype`` (fp32 by default): the output side's op
    reads them as they are; on the input side x is cast to it for the generator and l to the
    activations' dtype. Backward saves: output side, the fused op's
    x, W, y and g = x Dᵀ (T, r_g; ops/ia3_dynamic.py); input side (besides the base layer's own) x,
    x Dᵀ and the scale op's tanh(g).
    """

    switchable = True
    merge_error = ("data-dependent (IA)³ (dynamic=True) cannot be merged: its scale depends on each token's "
                   "input, so no fixed weight computes it; keep the patched model for inference, or use "
                   "ia3 with dynamic=False where merging is needed")

    def __init__(self, base_layer: nn.Module, side: str = "output",
                 out_slices: Sequence[tuple[int, int]] | None = None, rank: int = DEFAULT_GENERATOR_RANK,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"IA3DynamicLinear: generator_rank must be a positive int, got {rank!r}")
        size = wrap_scaled(self, base_layer, side, out_slices)
        self.rank = rank
        w = base_layer.weight
        dt = adapter_dtype or w.dtype
        self.ia3_down = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=dt))
        nn.init.kaiming_uniform_(self.ia3_down, a=math.sqrt(5))
        self.ia3_up = nn.Parameter(torch.zeros(size, rank, device=w.device, dtype=dt))

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "ia3_down", self.ia3_down
        yield "ia3_up", self.ia3_up

    def generator_logits(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) (..., S) in the adapter dtype (under autocast, autocast's)."""
        return F.linear(F.linear(x.to(self.ia3_down.dtype), self.ia3_down), self.ia3_up)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """l(x) = 1 + tanh(g(x)) (..., S), for inspection (forward uses the fused-backward op)."""
        return 1 + torch.tanh(self.generator_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(x)
        if self.side == "input":
            return self.base_layer(dynamic_scale(x, self.generator_logits(x)))
        return ia3_dynamic_linear(x, weight_nk(self.base_layer), self.base_layer.bias, self.ia3_down, self.up_full())

    def up_full(self) -> torch.Tensor:
        """U over every output row (N, r_g): zero rows outside ``out_slices`` (differentiable)."""
        if self.out_slices is None:
            return self.ia3_up
        parts, prev, off = [], 0, 0
        for lo, hi in self.out_slices:
            if lo > prev:
                parts.append(self.ia3_up.new_zeros(lo - prev, self.rank))
            parts.append(self.ia3_up[off:off + hi - lo])
            off += hi - lo
            prev = hi
        if prev < self.out_features:
            parts.append(self.ia3_up.new_zeros(self.out_features - prev, self.rank))
        return torch.cat(parts)

    def extra_repr(self) -> str:
        sl = f", out_slices={list(self.out_slices)}" if self.out_slices else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, side={self.side}, "
                f"generator_rank={self.rank}{sl}")
