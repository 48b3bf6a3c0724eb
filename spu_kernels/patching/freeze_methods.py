"""Methods that replace nothing and only choose what trains: "last_n" and "bitfit".

They go through the core like every other method, so the task head stays trainable (unless
``train_head=False``), ``summary`` reports the trainable count, ``save_adapter`` writes exactly
the trainable tensors, and ``unpatch`` / ``merge`` restore the original ``requires_grad`` flags.
"""
from __future__ import annotations

import torch.nn as nn

from .architectures import Family, model_type_of, name_matches
from .core import PatchContext
from .registry import register_method


def _layer_stacks(model: nn.Module, family: Family | None) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists of transformer blocks: the family's (``Family.stacks``), else the largest
    list of blocks."""
    mods = dict(model.named_modules())
    if family is not None and family.stacks:
        stacks = [(n, m) for n, m in mods.items() if isinstance(m, nn.ModuleList)
                  and any(name_matches(n, p) for p in family.stacks)]
        if stacks:
            return stacks
    candidates = [(n, m) for n, m in mods.items() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(c) for c in m}) == 1 and sum(p.numel() for p in m.parameters()) > 0]
    if not candidates:
        return []
    best = max(candidates, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return [best]


@register_method("last_n", "train only the last n transformer blocks (of each stack) and the head")
def last_n(ctx: PatchContext, *, n: int = 2, include_top: bool = True) -> None:
    """n = 0 trains the head alone (a linear probe). Encoder-decoder models (T5): the last n
    blocks of each stack. ``include_top`` also trains what follows the last block (BERT's
    pooler, the final layer norm of GPT-2, LLaMA and T5)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"last_n: n must be an int >= 0, got {n!r}")
    stacks = _layer_stacks(ctx.model, ctx.family)
    if not stacks:
        raise ValueError(f"last_n: found no list of transformer blocks in this {model_type_of(ctx.model)} model")
    for name, stack in stacks:
        if n > len(stack):
            raise ValueError(f"last_n: n={n} but {name} has {len(stack)} layers; use n <= {len(stack)}")
        for block in list(stack)[len(stack) - n:] if n else []:
            ctx.train(block.parameters())
    if include_top and n > 0 and ctx.family is not None:
        for name, mod in ctx.model.named_modules():
            if name and any(name_matches(name, p) for p in ctx.family.top):
                ctx.train(mod.parameters())


@register_method("bitfit", "BitFit (Ben Zaken et al. 2021): train only the bias terms (and the head)")
def bitfit(ctx: PatchContext) -> None:
    """Every parameter named ``*.bias`` trains; a model without biases (LLaMA, Mistral) is an error."""
    biases = [p for name, p in ctx.model.named_parameters() if name == "bias" or name.endswith(".bias")]
    if not biases:
        raise ValueError(f"bitfit: this {model_type_of(ctx.model)} model has no bias parameters "
                         "(LLaMA and Mistral have none), so BitFit would train nothing; use another method")
    ctx.train(biases)
