"""SiVALinear: SVD-split low-rank adaptation.

W = U S Vᵀ. The top-r singular triplets train (U_r as B, V_rᵀ as A, S_r as the per-rank scale g,
trainable only if asked); the rest stays frozen as the residual W_res = W − U_r S_r V_rᵀ:

    y = x W_resᵀ + b + ((drop(x) V_r) ⊙ S_r) U_rᵀ

No random or zero init: at step 0 the layer computes W exactly (up to rounding W_res and the
factors to the layer's dtype). The SVD runs in fp32 on the weight's device.

Memory: W_res is written into the base layer's own weight tensor (no second N×K copy on the
device); the original weight is kept on the CPU (``keep_original=True``) so ``restore()`` puts
back the very same bits.

Factors: ``factors="svd"`` (the default) trains U_r and V_rᵀ with S_r frozen between them;
``factors="pissa"`` is PiSSA's parametrisation (Meng et al. 2024, PEFT's ``init_lora_weights="pissa"``):
U_r√S_r and √S_r·V_rᵀ train and S is a buffer of ones, so the same learning rate behaves as PEFT's
PiSSA (with "svd" the same lr moves ΔW about σ/1 times more along large singular directions).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .lowrank_base import LowRankAdapterLinear, weight_nk
from .residual_weight import ResidualWeight

SVD_METHODS = ("exact", "randomized")
FACTORS = ("svd", "pissa")


def top_r_svd(w: torch.Tensor, r: int, method: str = "randomized", niter: int = 4, oversample: int = 10,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (N, r), S_r (r,), Vh_r (r, K)) of an fp32 matrix, largest singular values first.

    ``randomized`` is Halko et al.'s range finder (torch.svd_lowrank) with ``niter`` power
    iterations, seeded so that the same call gives the same factors."""
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if method == "randomized":
        q = min(r + oversample, *w.shape)
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        return u[:, :r], s[:r], v[:, :r].t()
    raise ValueError(f"unknown svd method {method!r}; choose one of {', '.join(SVD_METHODS)}")


class SiVALinear(ResidualWeight, LowRankAdapterLinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` split by SVD into a frozen residual and trainable
    top-r factors.

    Parameters: ``siva_U`` (rows, r) = U_r (B), ``siva_Vh`` (S·r, K) = V_rᵀ (A); ``siva_S`` (S·r,)
    = S_r (g), a parameter with ``train_s=True`` and a buffer otherwise. With ``out_slices`` each
    slice of output rows gets its own SVD of rank r. ``factors="pissa"``: U_r√S_r, √S_r·V_rᵀ and
    S = ones (a buffer; train_s must be False).
    """

    def __init__(self, base_layer: nn.Module, r: int = 16, dropout: float = 0.0, train_s: bool = False,
                 svd: str = "randomized", niter: int = 4, svd_seed: int = 0,
                 out_slices: Sequence[tuple[int, int]] | None = None, keep_original: bool = True,
                 adapter_dtype: torch.dtype | None = torch.float32, factors: str = "svd"):
        if svd not in SVD_METHODS:
            raise ValueError(f"SiVALinear: unknown svd {svd!r}; choose one of {', '.join(SVD_METHODS)}")
        if factors not in FACTORS:
            raise ValueError(f"SiVALinear: unknown factors {factors!r}; choose one of {', '.join(FACTORS)}")
        if factors == "pissa" and train_s:
            raise ValueError("SiVALinear: factors='pissa' folds S into both factors (S is ones), so there is no "
                             "S to train; use train_s=False, or factors='svd' to train S")
        super().__init__(base_layer, r, 1.0, dropout, out_slices)
        self.train_s = bool(train_s)
        self.factors = factors
        self.svd, self.niter = svd, int(niter)
        w = weight_nk(base_layer)
        dtype = adapter_dtype or w.dtype
        self.keep_original(base_layer.weight, keep_original)
        with torch.no_grad():
            w32 = w.detach().float()
            res = w32.clone()
            us, ss, vhs = [], [], []
            for lo, hi in self.out_slices or [(0, self.out_features)]:
                u, s, vh = top_r_svd(w32[lo:hi], r, svd, niter, seed=svd_seed)
                res[lo:hi] -= (u * s) @ vh
                us.append(u)
                ss.append(s)
                vhs.append(vh)
            w.copy_(res.to(w.dtype))   # the base layer now holds W_res
        u, vh, s = torch.cat(us), torch.cat(vhs), torch.cat(ss)
        # the split as computed, (U₀S₀ per slice (ΣN_slice, r), V₀ᵀ (S·r, K)) fp32 on the CPU beside W:
        # what PEFT's LoRA form of this adapter subtracts (patching/peft_format.py); re-running the
        # seeded SVD later could give other bits (another device's RNG stream)
        self._initial_factors = ((torch.cat([ui * si for ui, si in zip(us, ss)]).to("cpu", copy=True),
                                  vh.to("cpu", copy=True)) if keep_original else None)   # copies: vh becomes siva_Vh
        if factors == "pissa":
            root = s.sqrt()
            # U√S per output row: each slice's rows take its own r roots
            row_root = torch.cat([root[i * r:(i + 1) * r].expand(hi - lo, r) for i, (lo, hi)
                                  in enumerate(self.out_slices or [(0, self.out_features)])])
            u, vh, s = u * row_root, vh * root[:, None], torch.ones_like(s)
        self.siva_U = nn.Parameter(u.to(dtype))
        self.siva_Vh = nn.Parameter(vh.to(dtype))
        s = s.to(dtype)
        if self.train_s:
            self.siva_S = nn.Parameter(s)
        else:
            self.register_buffer("siva_S", s)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, **kwargs) -> "SiVALinear":
        """Split ``linear`` in place: its weight becomes W_res (``restore()`` undoes it)."""
        return cls(linear, r=r, **kwargs)

    def lowrank_factors(self):
        return self.siva_Vh, self._assemble_b(self.siva_U), self.siva_S

    def drop_original(self) -> None:
        """keep_original=False: no host copies, of W or of the initial factors."""
        super().drop_original()
        self._initial_factors = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", train_s={self.train_s}, svd={self.svd}, factors={self.factors}"
