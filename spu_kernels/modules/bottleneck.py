"""Bottleneck adapter (Houlsby et al. 2019; ``patch(model, "adapter")``) around a projection's output:

    y = out + up(act(down(out))),   out = base(x),   down: (r, N) "adapter_down" + (r,) "adapter_down_bias",
                                                     up:   (N, r) "adapter_up"   + (N,) "adapter_up_bias",

N the wrapped layer's output width, r the bottleneck width. The adapter sits on the output of the
wrapped projection (an attention output or FFN output linear), before the block's residual add and
layer norm. up starts at zero, so y == out bit for bit at step 0 (out + 0); down starts at
N(0, init_std²), its bias at zero. The residual, down, act, up and the residual add run as one op
(ops/bottleneck_adapter.py). With ``dropout`` > 0 while training, dropout applies to the adapter's
branch up(act(down(out))) before the residual add, computed unfused in torch; otherwise (eval, or
dropout 0) the fused op runs. No merge: the non-linearity between down and up folds into no weight.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.bottleneck_adapter import ACTIVATIONS, activation_reference, bottleneck_adapter
from .lowrank_base import WrappedLinear, is_linear_like, linear_dims


class BottleneckAdapterLinear(WrappedLinear):
    """out = base(x); y = out + up(act(down(out))) (see the module docstring).

    The adapter's weights are kept in ``adapter_dtype`` (fp32 by default) and cast to the
    activations' dtype by the op. Backward saves (besides the base layer's own) the op's z
    (tokens × r) and a reference to ``out`` (the base layer's output, which the model keeps anyway).
    """

    switchable = True
    merge_error = ("bottleneck adapters cannot be merged: the non-linearity between the down and up projections "
                   "makes out + up(act(down(out))) no linear function of the input, so no weight of the wrapped "
                   "layer computes it; keep the patched model for inference (spu_kernels.unpatch removes the "
                   "adapters)")

    def __init__(self, base_layer: nn.Module, r: int, non_linearity: str = "relu", dropout: float = 0.0,
                 init_std: float = 0.02, adapter_dtype: torch.dtype | None = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        who = type(self).__name__
        if not is_linear_like(base_layer):
            raise TypeError(f"{who} wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{who}: the bottleneck width r must be a positive int, got {r!r}")
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"{who}: unknown non_linearity {non_linearity!r}; choose one of {', '.join(ACTIVATIONS)}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{who}: dropout must be in [0, 1), got {dropout!r}")
        if (isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not math.isfinite(init_std)
                or init_std <= 0):
            raise ValueError(f"{who}: init_std must be a finite number > 0, got {init_std!r}")
        self.in_features, self.out_features = linear_dims(base_layer)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.r = r
        self.non_linearity = non_linearity
        self.dropout = float(dropout)
        w = base_layer.weight
        dt = adapter_dtype or w.dtype
        n = self.out_features
        down = torch.randn(r, n, generator=generator, dtype=torch.float32) * float(init_std)
        self.adapter_down = nn.Parameter(down.to(device=w.device, dtype=dt))
        self.adapter_down_bias = nn.Parameter(torch.zeros(r, device=w.device, dtype=dt))
        self.adapter_up = nn.Parameter(torch.zeros(n, r, device=w.device, dtype=dt))
        self.adapter_up_bias = nn.Parameter(torch.zeros(n, device=w.device, dtype=dt))

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "adapter_down", self.adapter_down
        yield "adapter_down_bias", self.adapter_down_bias
        yield "adapter_up", self.adapter_up
        yield "adapter_up_bias", self.adapter_up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(x)
        out = self.base_layer(x)
        if self.dropout and self.training:
            dt = out.dtype if not torch.is_autocast_enabled(out.device.type) else None
            cast = (lambda t: t.to(dt)) if dt is not None else (lambda t: t)
            z = F.linear(out, cast(self.adapter_down), cast(self.adapter_down_bias))
            branch = F.linear(activation_reference(z, self.non_linearity), cast(self.adapter_up),
                              cast(self.adapter_up_bias))
            return out + F.dropout(branch, self.dropout, True).to(out.dtype)
        return bottleneck_adapter(out, self.adapter_down, self.adapter_down_bias, self.adapter_up,
                                  self.adapter_up_bias, self.non_linearity)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"non_linearity={self.non_linearity}, dropout={self.dropout:g}")
