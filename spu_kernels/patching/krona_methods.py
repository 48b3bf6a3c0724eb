"""The "krona" method: Kronecker adapters (KronA) on linear layers."""
from __future__ import annotations

from typing import Sequence

import torch

from ..modules.krona import KronALinear
from .core import PatchContext
from .options import float_dtype
from .registry import register_method


@register_method("krona", "KronA: frozen W plus a trainable Kronecker update s·(A ⊗ B), B starts at zero")
def krona(ctx: PatchContext, *, a_shape: Sequence[int] | None = None, scale: float = 1.0,
          target_modules: str | Sequence[str] | None = None,
          adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """Default targets: the query and value projections (GPT-2: the q and v thirds of c_attn, one
    (A, B) pair each). ``a_shape`` = (a1, a2) for every target, or None: per layer, the most square
    factorisation of N and K. Every target is built (and its shapes checked) before any is replaced."""
    targets = ctx.find_targets(target_modules, roles=("query", "value"))
    dt = float_dtype(adapter_dtype)
    mods = []
    for t in targets:
        try:
            mods.append((t.name, KronALinear(t.module, a_shape=a_shape, scale=scale, out_slices=t.out_slices(),
                                             adapter_dtype=dt)))
        except ValueError as e:
            raise ValueError(f"krona: {t.name}: {e}") from None
    for name, mod in mods:
        ctx.replace(name, mod)
        ctx.train(p for _, p in mod.adapter_parameters())
