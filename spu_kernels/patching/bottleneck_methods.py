"""The "adapter" method: bottleneck adapters (modules/bottleneck.py) on the outputs of projections.

placement="houlsby" (Houlsby et al. 2019): one after the attention output projection and one after the
FFN output projection of every layer (the family's ``attn_out`` and ``ffn_out`` roles; in T5's decoder
``attn_out`` is the self- and the cross-attention's ``o``); placement="pfeiffer" (Pfeiffer et al. 2021):
after the FFN output projection only. Each adapter acts on the projection's output, before the block's
residual add and layer norm. ``target_modules`` names the wrapped projections instead. No merge; no
PEFT format (PEFT has no bottleneck adapter): ``save_pretrained`` writes spu_kernels' files only.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from ..modules.bottleneck import BottleneckAdapterLinear
from ..ops.bottleneck_adapter import ACTIVATIONS
from .core import PatchContext
from .options import float_dtype
from .registry import register_method

PLACEMENTS = {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",)}


@register_method("adapter", "bottleneck adapters (Houlsby / Pfeiffer): out + up(act(down(out))) after the "
                            "attention / FFN output projections (up zeros)")
def adapter(ctx: PatchContext, *, r: int = 64, non_linearity: str = "relu", placement: str = "houlsby",
            dropout: float = 0.0, init_std: float = 0.02, seed: int = 0,
            target_modules: str | Sequence[str] | None = None,
            adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """``r``: the bottleneck width (not a reduction factor). ``non_linearity``: relu, gelu, silu or
    tanh. ``placement``: houlsby (after attention and FFN) or pfeiffer (after the FFN only).
    ``dropout`` on the adapter branch while training. The down projection starts at N(0, init_std²)
    drawn from a generator seeded with ``seed``; the up projection and both biases at zero."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"adapter: r (the bottleneck width) must be a positive int, got {r!r}")
    if non_linearity not in ACTIVATIONS:
        raise ValueError(f"adapter: unknown non_linearity {non_linearity!r}; choose one of {', '.join(ACTIVATIONS)}")
    if placement not in PLACEMENTS:
        raise ValueError(f"adapter: unknown placement {placement!r}; choose 'houlsby' (after the attention and the "
                         "FFN output projections) or 'pfeiffer' (after the FFN output projection only)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"adapter: dropout must be a number in [0, 1), got {dropout!r}")
    if (isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not math.isfinite(init_std)
            or init_std <= 0):
        raise ValueError(f"adapter: init_std must be a finite number > 0, got {init_std!r}")
    try:
        seed = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        seed = None
    if seed is None or seed < 0:
        raise ValueError("adapter: seed must be an int >= 0 (it seeds the down projections' init)")
    dt = float_dtype(adapter_dtype)
    targets = ctx.find_targets(target_modules, roles=PLACEMENTS[placement])
    gen = torch.Generator().manual_seed(seed)
    for t in targets:
        mod = BottleneckAdapterLinear(t.module, r, non_linearity, dropout=dropout, init_std=float(init_std),
                                      adapter_dtype=dt, generator=gen)
        ctx.replace(t.name, mod)
        ctx.train(p for _, p in mod.adapter_parameters())
