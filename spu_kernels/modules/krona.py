"""KronALinear: y = x Wᵀ + b + s · x (A ⊗ B)ᵀ (Edalati et al. 2022), fused; A ⊗ B is never formed
in training (only ``merge`` forms it, once, for inference).

Two initialisations (``init``):

* ``"zeros"``: A uniform in ±1/√a2, B = 0, W untouched: step 0 is the original layer.
* ``"kopa"``: the nearest Kronecker product (Van Loan & Pitsianis 1993), as SiVA does for low rank:
  W = s · (A ⊗ B) + W_res with s · A ⊗ B the best Frobenius approximation of W by one Kronecker
  product (``nearest_kronecker``); A and B train, W_res = W − s · A ⊗ B (fp32, rounded to W's
  dtype) is written into the base layer's own weight and stays frozen. Step 0 is the original
  layer up to that rounding, and neither factor starts at zero. The original W is kept on the CPU
  (``keep_original``) so that ``restore`` / ``detach_base`` put back the very same bits.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..ops.kron_linear import kron_linear, split_near_sqrt
from .lowrank_base import WrappedLinear, is_linear_like, linear_dims, normalise_slices, weight_nk
from .residual_weight import ResidualWeight


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


INITS = ("zeros", "kopa")


def rearrange(w: torch.Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> torch.Tensor:
    """Van Loan's R(W) (a1·a2, b1·b2) of W (a1·b1, a2·b2): row i·a2 + k is W's block (i, k) of shape
    (b1, b2), read row-major, so that R(A ⊗ B) = vec(A) vec(B)ᵀ (torch.kron's layout)."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    return w.reshape(a1, b1, a2, b2).permute(0, 2, 1, 3).reshape(a1 * a2, b1 * b2)


@torch.no_grad()
def nearest_kronecker(w: torch.Tensor, a_shape: Sequence[int], b_shape: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (a1, a2), B (b1, b2), σ (a1·a2 or fewer,)) for W (a1·b1, a2·b2), fp32: A ⊗ B minimises
    ‖W − A ⊗ B‖_F, A = √σ₁ u₁ and B = √σ₁ v₁ from the top singular pair of ``rearrange(W)``
    (exact SVD, fp32, on W's device); σ are all its singular values, so ‖W − A ⊗ B‖_F = √(Σ_{i≥2} σ_i²).
    The sign is fixed (u₁'s largest-magnitude entry positive): the same W gives the same bits."""
    u, sv, vh = torch.linalg.svd(rearrange(w.float(), a_shape, b_shape), full_matrices=False)
    u1, v1 = u[:, 0], vh[0]
    if u1[u1.abs().argmax()] < 0:
        u1, v1 = -u1, -v1
    root = sv[0].sqrt()
    return (root * u1).reshape(tuple(a_shape)), (root * v1).reshape(tuple(b_shape)), sv


def _divisors(n: int, limit: int = 12) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:limit])) + (", ..." if len(ds) > limit else "")


class KronALinear(ResidualWeight, WrappedLinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a trainable Kronecker update s · (A ⊗ B).

    A (``krona_A``, (S, a1, a2)) and B (``krona_B``, (S, b1, b2)): with ``init="zeros"`` A starts
    uniform in ±1/√a2 and B at zero; with ``init="kopa"`` each slice's pair is its nearest
    Kronecker factors (A = sign(s)·√(σ₁/|s|)·u₁, B = √(σ₁/|s|)·v₁, so s · A ⊗ B = σ₁ u₁ ⊗ v₁ and
    ‖A‖ = ‖B‖) and the base weight becomes W_res (module docstring). Step 0 equals the original
    layer either way. ``a_shape`` = (a1, a2) or None (most square split of N and K).
    ``out_slices``: one (A, B) pair per output row range (GPT-2's q / v thirds of c_attn; all
    ranges the same width), S = number of slices (1 without slices). ``keep_original`` (kopa):
    keep W on the CPU for ``restore`` and adapter switching (``drop_original`` frees it).
    """

    switchable = True

    def __init__(self, base_layer: nn.Module, a_shape: Sequence[int] | None = None, scale: float = 1.0,
                 out_slices: Sequence[tuple[int, int]] | None = None,
                 adapter_dtype: torch.dtype | None = torch.float32, init: str = "zeros", keep_original: bool = True):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"KronALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"KronALinear: scale must be a finite number, got {scale!r}")
        if init not in INITS:
            raise ValueError(f"KronALinear: unknown init {init!r}; choose one of {', '.join(INITS)}")
        if init == "kopa" and scale == 0:
            raise ValueError("KronALinear: init='kopa' splits W = s·(A ⊗ B) + W_res, which needs scale != 0")
        self.in_features, self.out_features = linear_dims(base_layer)
        self.out_slices = normalise_slices(out_slices, self.out_features)
        widths = {hi - lo for lo, hi in self.out_slices} if self.out_slices else {self.out_features}
        if len(widths) != 1:
            raise ValueError(f"KronALinear: out_slices must all have one width, got {list(self.out_slices)}")
        (a1, a2), (b1, b2) = kron_shapes(widths.pop(), self.in_features, a_shape)
        self.a_shape, self.b_shape = (a1, a2), (b1, b2)
        self.scaling = float(scale)
        self.init = init
        w = base_layer.weight
        s = len(self.out_slices) if self.out_slices else 1
        dtype = adapter_dtype or w.dtype
        if init == "kopa":
            a, b = self._kopa_split(weight_nk(base_layer), dtype)   # checks everything before writing W_res
            self.keep_original(w, keep_original)
        else:
            bound = 1.0 / math.sqrt(a2)
            a = torch.empty(s, a1, a2, device=w.device, dtype=dtype).uniform_(-bound, bound)
            b = torch.zeros(s, b1, b2, device=w.device, dtype=dtype)
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.krona_A = nn.Parameter(a)
        self.krona_B = nn.Parameter(b)
        if init == "kopa":
            with torch.no_grad():
                w_nk = weight_nk(base_layer)
                w_nk.copy_((w_nk.float() - self.delta_weight()).to(w.dtype))   # the base layer now holds W_res

    @torch.no_grad()
    def _kopa_split(self, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slice's nearest Kronecker factors, scaled for s, in ``dtype`` (S, a1, a2), (S, b1, b2)."""
        root = 1.0 / math.sqrt(abs(self.scaling))
        sign = math.copysign(1.0, self.scaling)
        n = self.a_shape[0] * self.b_shape[0]
        a_list, b_list = [], []
        for off in self._offsets():
            a, b, sv = nearest_kronecker(w[off:off + n], self.a_shape, self.b_shape)
            if not sv[0] > 0:
                raise ValueError(f"KronALinear: init='kopa': the weight rows {off}..{off + n} are zero, so their "
                                 "nearest Kronecker factors are zero and would never train; use init='zeros'")
            a_list.append(a * (sign * root))
            b_list.append(b * root)
        return torch.stack(a_list).to(dtype), torch.stack(b_list).to(dtype)

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
        """Fold s · (A ⊗ B) into the base layer's weight (in place; kopa: W_res + s · A ⊗ B) and
        return the base layer."""
        w = weight_nk(self.base_layer)
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        return self.base_layer

    @property
    def holds_residual(self) -> bool:
        """kopa: the base layer holds W_res (ResidualWeight); "zeros" leaves W untouched."""
        return self.init == "kopa"

    def extra_repr(self) -> str:
        sl = f", out_slices={list(self.out_slices)}" if self.out_slices else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={self.a_shape}, "
                f"B={self.b_shape}, scaling={self.scaling:g}, init={self.init}{sl}")
