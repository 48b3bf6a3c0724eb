"""KronALinear: y = x Wᵀ + b + s · x (A ⊗ B)ᵀ (Edalati et al. 2022), fused; A ⊗ B is never formed
in training (only ``merge`` forms it, once, for inference)."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..ops.kron_linear import kron_linear, split_near_sqrt
from .lowrank_base import WrappedLinear, is_linear_like, linear_dims, normalise_slices, weight_nk


def kron_shapes(n: int, k: int, a_shape: Sequence[int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a1, a2), (b1, b2)) with a1·b1 = n and a2·b2 = k: given a_shape = (a1, a2), or the most
    square splits (a1 = largest divisor of n <= √n, likewise a2). Clear error when not factorable."""
    if a_shape is None:
        (a1, b1), (a2, b2) = split_near_sqrt(n), split_near_sqrt(k)
        return (a1, a2), (b1, b2)
    if (not isinstance(a_shape, (tuple, list)) or len(a_shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in a_shape)):
        raise ValueError(f"a_shape must be two positive ints (a1, a2), got {a_shape!r}")
    a1, a2 = a_shape
    bad = []
    if n % a1:
        bad.append(f"a1={a1} does not divide N={n} (divisors: {_divisors(n)})")
    if k % a2:
        bad.append(f"a2={a2} does not divide K={k} (divisors: {_divisors(k)})")
    if bad:
        raise ValueError("KronA needs a1·b1 = N and a2·b2 = K: " + "; ".join(bad)
                         + ". Pick a_shape from the divisors, or a_shape=None for the most square split")
    return (a1, a2), (n // a1, k // a2)


def _divisors(n: int, limit: int = 12) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:limit])) + (", ..." if len(ds) > limit else "")


class KronALinear(WrappedLinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a trainable Kronecker update s · (A ⊗ B).

    A (``krona_A``, (S, a1, a2)) starts uniform in ±1/√a2 and B (``krona_B``, (S, b1, b2)) at
    zero, so step 0 equals the original layer. ``a_shape`` = (a1, a2) or None (most square split
    of N and K). ``out_slices``: one (A, B) pair per output row range (GPT-2's q / v thirds of
    c_attn; all ranges the same width), S = number of slices (1 without slices).
    """

    switchable = True

    def __init__(self, base_layer: nn.Module, a_shape: Sequence[int] | None = None, scale: float = 1.0,
                 out_slices: Sequence[tuple[int, int]] | None = None,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"KronALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"KronALinear: scale must be a finite number, got {scale!r}")
        self.in_features, self.out_features = linear_dims(base_layer)
        self.out_slices = normalise_slices(out_slices, self.out_features)
        widths = {hi - lo for lo, hi in self.out_slices} if self.out_slices else {self.out_features}
        if len(widths) != 1:
            raise ValueError(f"KronALinear: out_slices must all have one width, got {list(self.out_slices)}")
        (a1, a2), (b1, b2) = kron_shapes(widths.pop(), self.in_features, a_shape)
        self.a_shape, self.b_shape = (a1, a2), (b1, b2)
        self.scaling = float(scale)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        w = base_layer.weight
        s = len(self.out_slices) if self.out_slices else 1
        dtype = adapter_dtype or w.dtype
        bound = 1.0 / math.sqrt(a2)
        self.krona_A = nn.Parameter(torch.empty(s, a1, a2, device=w.device, dtype=dtype).uniform_(-bound, bound))
        self.krona_B = nn.Parameter(torch.zeros(s, b1, b2, device=w.device, dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, a_shape=None, scale: float = 1.0, **kwargs) -> "KronALinear":
        return cls(linear, a_shape=a_shape, scale=scale, **kwargs)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "krona_A", self.krona_A
        yield "krona_B", self.krona_B

    def _offsets(self) -> list[int]:
        return [lo for lo, _ in self.out_slices] if self.out_slices else [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypassed():
            return self.base_forward(x)
        return kron_linear(x, weight_nk(self.base_layer), self.base_layer.bias, self.krona_A, self.krona_B,
                           scale=self.scaling, out_offsets=self._offsets())

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · (A ⊗ B) placed at the slices, fp32 (N, K): formed only here, for merging."""
        d = torch.zeros(self.out_features, self.in_features, device=self.krona_A.device, dtype=torch.float32)
        n = self.a_shape[0] * self.b_shape[0]
        for s, off in enumerate(self._offsets()):
            d[off:off + n] = self.scaling * torch.kron(self.krona_A[s].float(), self.krona_B[s].float())
        return d

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold s · (A ⊗ B) into the base layer's weight (in place) and return the base layer."""
        w = weight_nk(self.base_layer)
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        sl = f", out_slices={list(self.out_slices)}" if self.out_slices else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
                f"B={self.b_shape}, scaling={self.scaling:g}{sl}")
