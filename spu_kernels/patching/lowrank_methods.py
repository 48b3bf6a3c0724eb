"""The low-rank methods: "lora" (also on nn.Embedding), "siva" and "siva_kv"."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..modules.lora import LoRAEmbedding, LoRALinear
from ..modules.lowrank_base import linear_dims
from ..modules.siva import FACTORS, SVD_METHODS, SiVALinear
from .core import PatchContext, Target
from .options import float_dtype
from .registry import register_method


def _check_rank(targets: list[Target], r: int) -> None:
    """Every target must allow rank r; checked before any module is touched."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    for t in targets:
        k, n = t.module.weight.shape if isinstance(t.module, nn.Embedding) else linear_dims(t.module)
        slices = t.out_slices()
        rows = min(hi - lo for lo, hi in slices) if slices else n
        if r > min(rows, k):
            raise ValueError(f"r={r} is larger than min(N, K) = min({rows}, {k}) of {t.name}; "
                             f"use r <= {min(rows, k)}")


@register_method("lora", "LoRA (Hu et al. 2021): frozen W plus a trainable rank-r update (alpha/r)·B·A")
def lora(ctx: PatchContext, *, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
         use_rslora: bool = False, target_modules: str | Sequence[str] | None = None,
         adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """Default targets: the query and value projections (as PEFT); alpha defaults to 2r. An
    ``nn.Embedding`` named in target_modules gets ``LoRAEmbedding`` (PEFT's lora.Embedding; no dropout)."""
    targets = ctx.find_targets(target_modules, roles=("query", "value"), embeddings=True)
    _check_rank(targets, r)
    dt = float_dtype(adapter_dtype)
    shared = {}   # id(weight) -> how many parameter names hold it: a tied embedding cannot be merged
    for _, p in ctx.model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    for t in targets:
        if isinstance(t.module, nn.Embedding):
            mod = LoRAEmbedding(t.module, r=r, alpha=alpha, use_rslora=use_rslora, adapter_dtype=dt,
                                tied=shared.get(id(t.module.weight), 0) > 1)
        else:
            mod = LoRALinear(t.module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                             out_slices=t.out_slices(), adapter_dtype=dt)
        ctx.replace(t.name, mod)
        ctx.train(p for _, p in mod.adapter_parameters())


def _siva(ctx: PatchContext, roles, r, dropout, train_s, svd, niter, svd_seed, target_modules, keep_original,
          adapter_dtype, factors) -> None:
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    if factors not in FACTORS:
        raise ValueError(f"factors must be one of {', '.join(FACTORS)}, got {factors!r}")
    if factors == "pissa" and train_s:
        raise ValueError("factors='pissa' folds S into both factors (S is ones), so there is no S to train; use "
                         "train_s=False, or factors='svd' to train S")
    targets = ctx.find_targets(target_modules, roles=roles)
    _check_rank(targets, r)
    dt = float_dtype(adapter_dtype)
    for t in targets:
        mod = SiVALinear(t.module, r=r, dropout=dropout, train_s=train_s, svd=svd, niter=niter, svd_seed=svd_seed,
                         out_slices=t.out_slices(), keep_original=True, adapter_dtype=dt, factors=factors)
        ctx.replace(t.name, mod)
        if not keep_original:     # W stays until the patch is complete, so a failed patch still rolls back
            ctx.on_success.append(mod.drop_original)
        ctx.train(p for _, p in mod.adapter_parameters())


@register_method("siva", "SiVA: SVD split, top-r singular factors train, the residual stays frozen")
def siva(ctx: PatchContext, *, r: int = 16, dropout: float = 0.0, train_s: bool = False, svd: str = "randomized",
         niter: int = 4, svd_seed: int = 0, target_modules: str | Sequence[str] | None = None,
         keep_original: bool = True, adapter_dtype: str | torch.dtype | None = "float32",
         factors: str = "svd") -> None:
    """Default targets: the query and value projections. Step 0 equals the original model.
    ``factors="pissa"``: PiSSA's parametrisation (U√S and √S·Vᵀ train; S is ones), the same
    learning rate then behaves as PEFT's PiSSA; "svd": U and Vᵀ train, S frozen between them."""
    _siva(ctx, ("query", "value"), r, dropout, train_s, svd, niter, svd_seed, target_modules, keep_original,
          adapter_dtype, factors)


@register_method("siva_kv", "SiVA on the key and value projections only")
def siva_kv(ctx: PatchContext, *, r: int = 16, dropout: float = 0.0, train_s: bool = False,
            svd: str = "randomized", niter: int = 4, svd_seed: int = 0,
            target_modules: str | Sequence[str] | None = None, keep_original: bool = True,
            adapter_dtype: str | torch.dtype | None = "float32", factors: str = "svd") -> None:
    """Default targets: the key and value projections (GPT-2: the k and v thirds of c_attn)."""
    _siva(ctx, ("key", "value"), r, dropout, train_s, svd, niter, svd_seed, target_modules, keep_original,
          adapter_dtype, factors)
