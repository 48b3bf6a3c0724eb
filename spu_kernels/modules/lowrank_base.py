"""What LoRALinear and SiVALinear share: a frozen base layer plus a low-rank branch computed by the
fused op, y = base(x) + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ.

The base layer is an ``nn.Linear`` (weight (N, K)) or a transformers ``Conv1D`` (GPT-2; weight
stored (K, N)); the op is handed an (N, K) view either way, never a copy.

Output slices: a fused projection (GPT-2's c_attn = [q; k; v]) can carry one rank-r adapter per
output row block. A is then (S·r, K), B stacks the slices' rows ((Σ rows, r)) and the op sees the
block matrix B_full (N, S·r) whose block i holds slice i's rows of B in columns i·r..(i+1)·r: rows
outside every slice stay exactly zero and get no parameter.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..ops.lowrank_linear import lowrank_linear
from .adapter import AdapterModule


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing or moved: only nn.Linear is then supported
        return None


def is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D: the layers the low-rank adapters wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of an nn.Linear or Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        k, n = layer.weight.shape
        return k, n
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def weight_nk(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (N, K) tensor (a transposed view for Conv1D)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def normalise_slices(out_slices: Sequence[tuple[int, int]] | None, n: int) -> tuple[tuple[int, int], ...] | None:
    if out_slices is None:
        return None
    sl = tuple((int(lo), int(hi)) for lo, hi in out_slices)
    if not sl:
        raise ValueError("out_slices is empty; pass None to adapt every output row")
    prev = 0
    for lo, hi in sl:
        if not (prev <= lo < hi <= n):
            raise ValueError(f"out_slices must be increasing, non-overlapping (lo, hi) ranges inside [0, {n}), "
                             f"got {sl}")
        prev = hi
    return sl


class WrappedLinear(AdapterModule):
    """An adapter around a frozen ``base_layer`` (nn.Linear / Conv1D) that still shows the base
    layer's ``weight`` and ``bias`` in its own layout, as transformers code expects of a Linear.
    ``base_layer.weight`` stays frozen while wrapped (``patch`` refuses to train it)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class LowRankAdapterLinear(WrappedLinear):
    """Base class: subclasses define the parameters and ``lowrank_factors()``."""

    switchable = True

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float,
                 out_slices: Sequence[tuple[int, int]] | None = None):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        self.in_features, self.out_features = linear_dims(base_layer)
        self.out_slices = normalise_slices(out_slices, self.out_features)
        rows = [hi - lo for lo, hi in self.out_slices] if self.out_slices else [self.out_features]
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{type(self).__name__}: rank r must be a positive int, got {r!r}")
        if r > min(min(rows), self.in_features):
            raise ValueError(f"{type(self).__name__}: rank r={r} exceeds min(out, in) = "
                             f"min({min(rows)}, {self.in_features}) of this layer; use r <= "
                             f"{min(min(rows), self.in_features)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer
        self.r = r
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        base_layer.weight.requires_grad_(False)

    # -- what subclasses provide -------------------------------------------------------------
    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A (S·r, K), B_full (N, S·r), g (S·r,) or None) as the op takes them."""
        raise NotImplementedError

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters of the adapter that train (not the base layer's)."""
        for name, p in self.named_parameters(recurse=False):
            yield name, p

    # -- shared ------------------------------------------------------------------------------
    def _rows(self) -> int:
        return sum(hi - lo for lo, hi in self.out_slices) if self.out_slices else self.out_features

    def _assemble_b(self, b: torch.Tensor) -> torch.Tensor:
        """B (Σ slice rows, r) -> B_full (N, S·r); the identity without slices."""
        if self.out_slices is None:
            return b
        full = b.new_zeros(self.out_features, len(self.out_slices) * self.r)
        off = 0
        for i, (lo, hi) in enumerate(self.out_slices):
            full[lo:hi, i * self.r:(i + 1) * self.r] = b[off:off + hi - lo]
            off += hi - lo
        return full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(x)
        a, b, g = self.lowrank_factors()
        return lowrank_linear(x, weight_nk(self.base_layer), self.base_layer.bias, a, b, scale=self.scaling,
                              rank_scale=g, dropout_p=self.dropout if self.training else 0.0)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B_full diag(g) A as an fp32 (N, K) tensor."""
        a, b, g = self.lowrank_factors()
        a, b = a.float(), b.float()
        if g is not None:
            b = b * g.float()
        return self.scaling * (b @ a)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the adapter into the base layer's weight (in place, rounded to its dtype) and return
        the base layer, for inference. The adapter is spent afterwards."""
        w = weight_nk(self.base_layer)
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        sl = f", out_slices={list(self.out_slices)}" if self.out_slices else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, dropout={self.dropout:g}{sl}")
