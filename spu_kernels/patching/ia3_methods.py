"""The "ia3" method: (IA)³ scales on keys, values and the FFN hidden state.

FFN, per MLP block of a known family (its ``ffn_act`` / ``ffn_out`` roles and ``gate_attrs``):
  * plain MLP (BERT, RoBERTa, DistilBERT, T5 with ReLU, GPT-2): the activation module is replaced
    by ``IA3ScaledActivation`` (act(h) ⊙ l in one kernel);
  * gated MLP (LLaMA / Mistral / Qwen2, T5 v1.1 "gated-gelu"): hidden = act(gate) ⊙ up, so the scale
    goes on the down projection's input: ``IA3Linear(side="input")`` (l folded into its GEMM);
  * an activation the kernel does not know: the same input-side scale on the FFN output linear
    (mathematically identical: l ⊙ act(h) is that linear's input).

``dynamic=True`` (data-dependent (IA)³, modules/ia3_dynamic.py): the same places, each scale
generated per token by a bottleneck of rank ``generator_rank`` (default 4) from the layer's input;
the FFN scale always sits on the FFN output linear's input (plain and gated MLPs alike), its
generator reading that hidden state. No merge, no PEFT format.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..modules.ia3 import IA3Linear, IA3ScaledActivation, activation_name
from ..modules.ia3_dynamic import DEFAULT_GENERATOR_RANK, IA3DynamicLinear
from ..modules.lowrank_base import is_linear_like, linear_dims
from .architectures import model_type_of, name_matches
from .core import PatchContext
from .options import float_dtype
from .registry import register_method


def _ffn_sites(ctx: PatchContext) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(activation name, activation module, FFN-output linear name, that linear) per MLP block."""
    fam = ctx.family
    if fam is None or "ffn_act" not in fam.roles or "ffn_out" not in fam.roles:
        raise ValueError(f"ia3: no default feed-forward targets for model_type {model_type_of(ctx.model)!r}; "
                         "pass feedforward_modules=[names of the FFN output linears] (their inputs are scaled), "
                         "or feedforward=False")
    sites = []
    for name, mod in ctx.model.named_modules():
        if not name or not name_matches(name, fam.roles["ffn_act"]):
            continue
        # the FFN output linear: the nearest ancestor holding exactly one module that matches the
        # family's ffn_out (GPT-2: mlp.c_proj beside mlp.act; BERT: layer.i.output.dense, two levels up)
        outs, scope = [], name
        while not outs and scope:
            scope = scope.rpartition(".")[0]
            root = ctx.model.get_submodule(scope) if scope else ctx.model
            outs = [(f"{scope}.{n}" if scope else n, m) for n, m in root.named_modules()
                    if n and is_linear_like(m) and name_matches(f"{scope}.{n}" if scope else n, fam.roles["ffn_out"])]
        if len(outs) != 1:
            raise ValueError(f"ia3: cannot find the one FFN output linear for {name} (found {[n for n, _ in outs]}); "
                             "pass feedforward_modules=[...]")
        sites.append((name, mod, outs[0][0], outs[0][1]))
    if not sites:
        raise ValueError(f"ia3: no FFN activation matched in this {model_type_of(ctx.model)} model; "
                         "pass feedforward_modules=[...] or feedforward=False")
    return sites


@register_method("ia3", "(IA)³: learned scales on keys, values and the FFN hidden state (init ones)")
def ia3(ctx: PatchContext, *, target_modules: str | Sequence[str] | None = None, feedforward: bool = True,
        feedforward_modules: str | Sequence[str] | None = None,
        adapter_dtype: str | torch.dtype | None = "float32", dynamic: bool = False,
        generator_rank: int | None = None) -> None:
    """Default targets: keys and values (GPT-2: the k and v thirds of c_attn) scaled on their output;
    with ``feedforward`` the FFN hidden state (see the module docstring). ``feedforward_modules``
    names linears whose input is scaled instead of the family's FFN default. ``dynamic``: per-token
    scales 1 + tanh(g(x)) from a rank-``generator_rank`` generator (default 4) instead of vectors."""
    dt = float_dtype(adapter_dtype)
    if not isinstance(dynamic, bool):
        raise ValueError(f"ia3: dynamic must be True or False, got {dynamic!r}")
    if generator_rank is not None and not dynamic:
        raise ValueError("ia3: generator_rank only applies with dynamic=True (the data-dependent scales); "
                         "pass dynamic=True or drop generator_rank")
    rank = DEFAULT_GENERATOR_RANK if generator_rank is None else generator_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"ia3: generator_rank must be a positive int, got {generator_rank!r}")
    targets = ctx.find_targets(target_modules, roles=("key", "value"))
    ff_targets = ctx.find_targets(feedforward_modules) if feedforward_modules is not None else None
    if ff_targets is not None:
        clash = sorted({t.name for t in targets} & {t.name for t in ff_targets})
        if clash:
            raise ValueError(f"ia3: {clash} are in both target_modules and feedforward_modules; a layer is scaled "
                             "on its output or its input, not both")
    sites = _ffn_sites(ctx) if feedforward and ff_targets is None else []

    def add(name: str, mod: nn.Module) -> None:
        ctx.replace(name, mod)
        ctx.train(p for _, p in mod.adapter_parameters())

    def scaled_linear(lin: nn.Module, side: str, out_slices=None) -> nn.Module:
        if dynamic:
            return IA3DynamicLinear(lin, side=side, out_slices=out_slices, rank=rank, adapter_dtype=dt)
        return IA3Linear(lin, side=side, out_slices=out_slices, adapter_dtype=dt)

    for t in targets:
        add(t.name, scaled_linear(t.module, "output", t.out_slices()))
    for t in ff_targets or ():
        add(t.name, scaled_linear(t.module, "input"))
    for act_name, act, out_name, out in sites:
        parent = ctx.model.get_submodule(act_name.rpartition(".")[0])
        gated = any(isinstance(getattr(parent, a, None), nn.Module) for a in ctx.family.gate_attrs)
        kind = activation_name(act)
        if dynamic or gated or kind is None:   # the scale on the FFN output linear's input
            add(out_name, scaled_linear(out, "input"))
        else:
            add(act_name, IA3ScaledActivation(act, linear_dims(out)[0], kind, next_linear=out, adapter_dtype=dt))
