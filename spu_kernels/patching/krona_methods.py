"""The "krona" method: Kronecker adapters (KronA) on linear layers."""
from __future__ import annotations

from typing import Sequence

import torch

from ..modules.krona import INITS, KronALinear
from .core import PatchContext
from .options import float_dtype
from .registry import register_method


@register_method("krona", "KronA: frozen W plus a trainable Kronecker update s·(A ⊗ B), B starts at zero "
                          "(init='kopa': A ⊗ B starts as W's nearest Kronecker product, W_res frozen)")
def krona(ctx: PatchContext, *, a_shape: Sequence[int] | None = None, scale: float = 1.0,
          target_modules: str | Sequence[str] | None = None,
          adapter_dtype: str | torch.dtype | None = "float32", init: str = "zeros",
          keep_original: bool = True) -> None:
    """Default targets: the query and value projections (GPT-2: the q and v thirds of c_attn, one
    (A, B) pair each). ``a_shape`` = (a1, a2) for every target, or None: per layer, the most square
    factorisation of N and K. ``init="zeros"``: B starts at zero; ``init="kopa"``: W = s·(A ⊗ B) + W_res
    by the nearest Kronecker product (an fp32 SVD of an (a1·a2, b1·b2) matrix per layer and slice), A
    and B train, W_res stays frozen in the base weight; step 0 equals the original model either way.
    ``keep_original`` (kopa): keep W on the CPU, which unpatch, named adapters and disable_adapter
    need. Every target is built (and its shapes checked) before any is replaced."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not isinstance(keep_original, bool):
        raise TypeError(f"keep_original must be a bool, got {keep_original!r}")
    if init == "kopa" and scale == 0:
        raise ValueError("init='kopa' splits W = scale·(A ⊗ B) + W_res, which needs scale != 0")
    if init == "zeros" and not keep_original:
        raise ValueError("keep_original=False applies to init='kopa' only (init='zeros' leaves W as it is)")
    targets = ctx.find_targets(target_modules, roles=("query", "value"))
    dt = float_dtype(adapter_dtype)
    mods = []
    try:
        for t in targets:
            try:
                # keep_original=True until the whole patch succeeded, so a failed patch still rolls back
                mods.append((t.name, KronALinear(t.module, a_shape=a_shape, scale=scale, out_slices=t.out_slices(),
                                                 adapter_dtype=dt, init=init, keep_original=True)))
            except ValueError as e:
                raise ValueError(f"krona: {t.name}: {e}") from None
    except BaseException:
        for _, mod in reversed(mods):   # kopa wrote W_res into the weights already built
            mod.restore()
        raise
    for name, mod in mods:
        ctx.replace(name, mod)
        if not keep_original:
            ctx.on_success.append(mod.drop_original)
        ctx.train(p for _, p in mod.adapter_parameters())
