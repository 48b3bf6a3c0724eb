"""(IA)³ modules (Liu et al. 2022): learned per-feature scales, initialised to ones so the wrapped
model computes what it did (to rounding; on the torch backend the scaled activation is torch's
F.gelu / F.silu / F.relu bit for bit).

* ``IA3Linear``: a frozen ``nn.Linear`` / ``Conv1D`` whose output (keys, values; side="output")
  or input (a gated MLP's down projection; side="input") is scaled by l.
* ``IA3ScaledActivation``: replaces an FFN's activation module: y = act(h) ⊙ l in one kernel.
  It knows the FFN's output linear (not as a submodule) only to fold l into it on ``merge``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..ops.ia3 import ACTIVATIONS, ia3_linear, ia3_scaled_act
from .adapter import AdapterModule
from .lowrank_base import WrappedLinear, is_linear_like, linear_dims, normalise_slices, weight_nk


def wrap_scaled(module: nn.Module, base_layer: nn.Module, side: str, out_slices) -> int:
    """Check ``base_layer`` and wrap it (frozen) in ``module`` for (IA)³ scaling on ``side``; the number of scaled
    features (input side: K; output side: N, or the rows of ``out_slices``)."""
    who = type(module).__name__
    if not is_linear_like(base_layer):
        raise TypeError(f"{who} wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
    if side not in ("output", "input"):
        raise ValueError(f"{who}: side must be 'output' or 'input', got {side!r}")
    module.in_features, module.out_features = linear_dims(base_layer)
    if side == "input" and out_slices is not None:
        raise ValueError(f"{who}: out_slices only applies to side='output'")
    module.out_slices = normalise_slices(out_slices, module.out_features)
    module.side = side
    module.base_layer = base_layer
    base_layer.weight.requires_grad_(False)
    if side == "input":
        return module.in_features
    return sum(hi - lo for lo, hi in module.out_slices) if module.out_slices else module.out_features


class IA3Linear(WrappedLinear):
    """y = (x Wᵀ + b) ⊙ l (side="output") or y = (x ⊙ l) Wᵀ + b (side="input"), fused.

    ``out_slices`` (output side only): scale just these output row ranges (GPT-2's k and v thirds
    of c_attn); l then holds Σ slice rows and the other rows are scaled by a constant 1.
    ``ia3_l`` is kept in ``adapter_dtype`` (fp32 by default) and cast to the activations' dtype.
    """

    switchable = True

    def __init__(self, base_layer: nn.Module, side: str = "output",
                 out_slices: Sequence[tuple[int, int]] | None = None,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        size = wrap_scaled(self, base_layer, side, out_slices)
        w = base_layer.weight
        self.ia3_l = nn.Parameter(torch.ones(size, device=w.device, dtype=adapter_dtype or w.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, side: str = "output", **kwargs) -> "IA3Linear":
        return cls(linear, side=side, **kwargs)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "ia3_l", self.ia3_l

    def scale_vector(self) -> torch.Tensor:
        """l over every output row (or input feature): ones outside the slices (differentiable)."""
        if self.out_slices is None:
            return self.ia3_l
        parts, prev, off = [], 0, 0
        one = self.ia3_l.new_ones(())
        for lo, hi in self.out_slices:
            if lo > prev:
                parts.append(one.expand(lo - prev))
            parts.append(self.ia3_l[off:off + hi - lo])
            off += hi - lo
            prev = hi
        if prev < self.out_features:
            parts.append(one.expand(self.out_features - prev))
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(x)
        return ia3_linear(x, weight_nk(self.base_layer), self.base_layer.bias, self.scale_vector(), side=self.side)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold l into the base layer (in place) and return it: output side scales W's rows and b,
        input side W's columns."""
        w = weight_nk(self.base_layer)
        l = self.scale_vector().float()
        if self.side == "input":
            w.copy_((w.float() * l[None, :]).to(w.dtype))
        else:
            w.copy_((w.float() * l[:, None]).to(w.dtype))
            b = self.base_layer.bias
            if b is not None:
                b.copy_((b.float() * l).to(b.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        sl = f", out_slices={list(self.out_slices)}" if self.out_slices else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, side={self.side}{sl}"


def activation_name(module: nn.Module) -> str | None:
    """Our name ("gelu", "gelu_tanh", "relu", "silu") for a torch / transformers activation
    module, or None when the kernel does not know it."""
    cls = type(module).__name__
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.ReLU) or cls == "ReLU":
        return "relu"
    if isinstance(module, nn.SiLU) or cls in ("SiLUActivation", "SiLU"):
        return "silu"
    if cls == "GELUActivation":
        return "gelu"
    if cls in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "AccurateGELUActivation"):
        return "gelu_tanh"
    return None


class IA3ScaledActivation(AdapterModule):
    """Replaces an FFN activation: y = act(h) ⊙ l, one fused kernel (backward: one pass over dy and h).

    ``next_linear``: the FFN's output projection (the layer that consumes y); ``merge`` folds l
    into its weight's columns (W diag(l)), the exact equivalent for inference. ``base_layer`` is
    the activation module it replaced (held as ``act``).
    """

    switchable = True

    def __init__(self, act_module: nn.Module, features: int, activation: str | None = None,
                 next_linear: nn.Module | None = None, adapter_dtype: torch.dtype | None = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        name = activation or activation_name(act_module)
        if name not in ACTIVATIONS:
            raise ValueError(f"IA3ScaledActivation: cannot fuse activation {type(act_module).__name__} "
                             f"(known: {', '.join(ACTIVATIONS)}); scale the next linear's input instead "
                             "(IA3Linear(side='input'))")
        if not isinstance(features, int) or features < 1:
            raise ValueError(f"IA3ScaledActivation: features must be a positive int, got {features!r}")
        if next_linear is not None and linear_dims(next_linear)[0] != features:
            raise ValueError(f"IA3ScaledActivation: next_linear takes {linear_dims(next_linear)[0]} features, "
                             f"not {features}")
        self.act = act_module
        self.activation = name
        self.features = features
        self._next = [next_linear]          # a plain list: not a submodule (it stays where it is)
        if device is None and next_linear is not None:
            device = next_linear.weight.device
        self.ia3_l = nn.Parameter(torch.ones(features, device=device, dtype=adapter_dtype or torch.float32))

    @property
    def base_layer(self) -> nn.Module:
        return self.act

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "ia3_l", self.ia3_l

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(h)
        return ia3_scaled_act(h, self.ia3_l, self.activation)

    @property
    def merge_error(self) -> str | None:
        if self._next[0] is None:
            return "IA3ScaledActivation.merge needs the next linear (next_linear=...) to fold l into"
        return None

    def merged_tensors(self) -> list[torch.Tensor]:
        return [self._next[0].weight]

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold l into the next linear's weight columns (in place) and return the activation module."""
        if self.merge_error:
            raise RuntimeError(self.merge_error)
        w = weight_nk(self._next[0])
        w.copy_((w.float() * self.ia3_l.float()[None, :]).to(w.dtype))
        return self.act

    def extra_repr(self) -> str:
        return f"activation={self.activation}, features={self.features}"
