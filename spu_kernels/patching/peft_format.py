"""The active patch in PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``).

Only exact equivalents are written (``peft.PeftModel.from_pretrained(base, folder)`` then computes
what the patched model does, to fp32 rounding); anything else is refused with the reason:

* lora -> LoRA. A multi-slice adapter on a fused layer (GPT-2's c_attn with one rank-r adapter per
  q / v third) is one LoRA of rank S·r whose B is block-diagonal (zeros off the blocks): exact.
  The scaling is kept as ``lora_alpha = scaling · rank`` (``rank_pattern`` / ``alpha_pattern``
  where layers differ). LoRA on an ``nn.Embedding`` -> PEFT's ``lora_embedding_A/B``.
* ia3 -> IA3: output-side scales as PEFT's non-feedforward ``ia3_l`` (N, 1) (ones for unscaled
  rows of a fused c_attn), input-side scales and the fused FFN activation's scale (the input of
  the FFN output linear) as feedforward ``ia3_l`` (1, K) on that linear.
* krona -> LoKr with full ``lokr_w1`` = A, ``lokr_w2`` = B: nn.Linear targets without slices whose
  (a1, a2) PEFT's ``factorization`` reproduces with one ``decompose_factor``; r is set so PEFT keeps
  w2 whole, ``alpha = scale · r``. Not with ``init="kopa"`` (the frozen weight is W_res, not W).
* siva / siva_kv -> LoRA of rank 2·S·r on the ORIGINAL weight (as PEFT converts PiSSA):
  ΔW = U S Vᵀ − U₀ S₀ V₀ᵀ = [U S | −U₀ S₀] [Vᵀ; V₀ᵀ], the initial factors re-computed by the
  same seeded SVD of the original weight (kept by ``keep_original=True``). With dropout > 0 PEFT
  also drops the input of the −U₀S₀V₀ᵀ term in training (eval outputs are equal).

No PEFT equivalent: lst, klst, prompt, last_n, bitfit, a soft prompt beside another method, a
trained module inside an adapted one. PEFT itself need not be installed to write the files.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import torch
import torch.nn as nn

from ..modules.ia3 import IA3Linear, IA3ScaledActivation
from ..modules.krona import KronALinear
from ..modules.lora import LoRAEmbedding, LoRALinear
from ..modules.lowrank_base import is_conv1d
from ..modules.siva import SiVALinear
from .core import PatchState, patch_state
from .unwrap import unwrap_model

PREFIX = "base_model.model."
_SEQ_CLS_HEADS = ("classifier", "score")   # PEFT's PeftModelForSequenceClassification adds these
#: transformers class-name endings -> PEFT task_type (which PeftModel subclass from_pretrained builds)
_TASK_TYPES = (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"), ("Model", "FEATURE_EXTRACTION"))


class NoPeftEquivalent(ValueError):
    """The active patch (or a part of it) cannot be written exactly in PEFT's format."""


def peft_adapter_files(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(``adapter_config.json`` content without ``base_model_name_or_path``, the tensors of
    ``adapter_model.safetensors`` under PEFT's key names, contiguous on the CPU) for ``model``'s
    active patch, or None when it has no exact PEFT equivalent (``peft_mapping`` says why)."""
    try:
        return peft_mapping(model)
    except NoPeftEquivalent:
        return None


def peft_mapping(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """As ``peft_adapter_files``, but raises ``NoPeftEquivalent`` saying why instead of returning None."""
    inner = unwrap_model(model)
    state = patch_state(inner, "peft_adapter_files")
    if state.options.get("soft_prompt") is not None:
        raise NoPeftEquivalent(f"a {state.method!r} patch with a soft prompt beside it has no PEFT equivalent "
                               "(a PEFT model holds one adapter type)")
    build = _BUILDERS.get(state.method)
    if build is None:
        raise NoPeftEquivalent(f"spu_kernels method {state.method!r} has no exact PEFT equivalent (PEFT's format "
                               f"covers {', '.join(sorted(_BUILDERS))}); use spu_kernels.save_adapter")
    config, tensors = build(inner, state)
    task = _task_type(inner)
    extra, saved = _modules_to_save(inner, state, task)
    config = {"task_type": task, **config, "modules_to_save": extra or None,
              "inference_mode": True}
    tensors.update(saved)
    return config, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


# -- shared ------------------------------------------------------------------------------------
def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for end, t in _TASK_TYPES if name.endswith(end)), None)


def _modules_to_save(model: nn.Module, state: PatchState, task: str | None) -> tuple[list[str], dict]:
    """The modules that train beside the adapters (task head, trainable_modules) as PEFT's
    ``modules_to_save``: their names and every tensor of their state dicts. For SEQ_CLS, PEFT
    always wraps (and expects) the head ("classifier" / "score"), trained or not."""
    adapter = {id(p) for rep in state.replacements for p in rep.new.parameters()}
    replaced = [rep.name for rep in state.replacements]
    owners: list[str] = [n for n in _SEQ_CLS_HEADS if task == "SEQ_CLS" and isinstance(getattr(model, n, None),
                                                                                        nn.Module)]
    for name, p in model.named_parameters(remove_duplicate=False):   # a tied weight: every module holding it
        if p.requires_grad and id(p) not in adapter:
            owner = name.rpartition(".")[0]
            if not owner:
                raise NoPeftEquivalent(f"{name} trains on the model itself; PEFT's modules_to_save names submodules")
            inside = next((r for r in replaced if owner == r or owner.startswith(r + ".")), None)
            if inside is not None:
                raise NoPeftEquivalent(f"{name} trains inside the adapted module {inside}; PEFT's "
                                       "modules_to_save cannot hold it beside the adapter")
            if owner not in owners:
                owners.append(owner)
    # the outermost modules only (a module inside another one saved whole is saved with it)
    owners = [o for o in owners if not any(o.startswith(q + ".") for q in owners if q != o)]
    tensors = {}
    for o in owners:
        for k, t in model.get_submodule(o).state_dict().items():
            tensors[f"{PREFIX}{o}.{k}"] = t
    return owners, tensors


def _rank_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """r / lora_alpha as the most common values, rank_pattern / alpha_pattern for the others."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},     # PEFT reads regexes
            "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha}}


def _lora_config(targets: list[str], ranks: dict, alphas: dict, dropout: float, fan_in_fan_out: bool) -> dict:
    return {"peft_type": "LORA", "target_modules": targets, **_rank_config(ranks, alphas),
            "lora_dropout": dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False,
            "use_dora": False, "init_lora_weights": True}


def _one_dropout(values: list[float]) -> float:
    if len(set(values)) > 1:
        raise NoPeftEquivalent(f"layers use different dropouts {sorted(set(values))}; PEFT's lora_dropout is one value")
    return values[0] if values else 0.0


# -- per method --------------------------------------------------------------------------------
#: per adapted layer: (PEFT's tensors by key suffix, rank, lora_alpha, the module whose dropout and
#: base layer count for lora_dropout / fan_in_fan_out, or None for an embedding)
_LoraFactors = tuple[dict[str, torch.Tensor], int, float, nn.Module | None]


def _as_lora(factors_fn: Callable[[str, nn.Module], _LoraFactors]) -> Callable[[nn.Module, PatchState],
                                                                              tuple[dict, dict]]:
    """A builder writing every replaced layer as a PEFT LoRA layer, from ``factors_fn(name, module)``."""
    def build(model: nn.Module, state: PatchState) -> tuple[dict, dict]:
        tensors, ranks, alphas, drops, conv = {}, {}, {}, [], False
        for rep in state.replacements:
            parts, ranks[rep.name], alphas[rep.name], layer = factors_fn(rep.name, rep.new)
            tensors.update({f"{PREFIX}{rep.name}.{k}": t for k, t in parts.items()})
            if layer is not None:
                drops.append(layer.dropout)
                conv |= is_conv1d(layer.base_layer)
        names = [rep.name for rep in state.replacements]
        return _lora_config(names, ranks, alphas, _one_dropout(drops), conv), tensors
    return build


def _lora_factors(name: str, m: nn.Module) -> _LoraFactors:
    if isinstance(m, LoRAEmbedding):
        return ({"lora_embedding_A": m.lora_embedding_A, "lora_embedding_B": m.lora_embedding_B},
                m.r, m.scaling * m.r, None)
    if not isinstance(m, LoRALinear):
        raise NoPeftEquivalent(f"{name} is a {type(m).__name__}, not a LoRA layer")
    a, b, _ = m.lowrank_factors()         # B block-diagonal over the slices: one LoRA of rank S·r
    return {"lora_A.weight": a, "lora_B.weight": b}, a.shape[0], m.scaling * a.shape[0], m


@torch.no_grad()
def _siva_initial(m: SiVALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(U₀S₀ block-assembled (N, S·r), V₀ᵀ (S·r, K)): the factors the module started from, as its
    __init__ kept them."""
    if m._initial_factors is None:
        raise NoPeftEquivalent("SiVA was patched with keep_original=False: the original weight and the initial "
                               "factors PEFT's LoRA subtracts are gone")
    us0, vh0 = m._initial_factors
    return m._assemble_b(us0), vh0


def _siva_factors(name: str, m: nn.Module) -> _LoraFactors:
    """[U S | −U₀ S₀] [Vᵀ; V₀ᵀ]: rank 2·S·r, lora_alpha = rank (scaling 1)."""
    if not isinstance(m, SiVALinear):
        raise NoPeftEquivalent(f"{name} is a {type(m).__name__}, not a SiVA layer")
    a, b, g = m.lowrank_factors()
    b0, a0 = _siva_initial(m)
    dt = a.dtype
    parts = {"lora_A.weight": torch.cat([a.detach(), a0.to(dt)]),
             "lora_B.weight": torch.cat([(b * g).detach().to(dt), -b0.to(dt)], dim=1)}
    return parts, 2 * a.shape[0], float(2 * a.shape[0]), m


_lora = _as_lora(_lora_factors)
_siva = _as_lora(_siva_factors)


def _ia3(model: nn.Module, state: PatchState) -> tuple[dict, dict]:
    if state.options.get("dynamic"):
        raise NoPeftEquivalent("ia3 with dynamic=True (per-token scales from a generator) has no PEFT equivalent: "
                               "PEFT's IA3 scales by fixed vectors; use spu_kernels.save_adapter")
    tensors, targets, ff, conv = {}, [], [], False
    for rep in state.replacements:
        m = rep.new
        if isinstance(m, IA3Linear):
            name, lin = rep.name, m.base_layer
            l = m.scale_vector()
            l = l.reshape(1, -1) if m.side == "input" else l.reshape(-1, 1)
            if m.side == "input":
                ff.append(name)
        elif isinstance(m, IA3ScaledActivation):
            lin = m._next[0]
            if lin is None:
                raise NoPeftEquivalent(f"{rep.name}: the scaled activation does not know its FFN output linear")
            name = _module_name(model, lin, rep.name)
            l = m.ia3_l.reshape(1, -1)
            ff.append(name)
        else:
            raise NoPeftEquivalent(f"{rep.name} is a {type(m).__name__}, not an (IA)³ layer")
        if name in targets:
            raise NoPeftEquivalent(f"{name} is scaled on both sides; PEFT's IA3 scales a layer on one side")
        targets.append(name)
        tensors[f"{PREFIX}{name}.ia3_l"] = l
        conv |= is_conv1d(lin)
    config = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff,
              "fan_in_fan_out": conv, "init_ia3_weights": True}
    return config, tensors


def _module_name(model: nn.Module, module: nn.Module, near: str) -> str:
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise NoPeftEquivalent(f"cannot find the FFN output linear of {near} in the model")
    return name


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT 0.21's ``lokr.layer.factorization``: (m, n), m·n = dimension, m <= n."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _krona(model: nn.Module, state: PatchState) -> tuple[dict, dict]:
    mods = []
    for rep in state.replacements:
        m = rep.new
        if not isinstance(m, KronALinear):
            raise NoPeftEquivalent(f"{rep.name} is a {type(m).__name__}, not a KronA layer")
        if m.init != "zeros":
            raise NoPeftEquivalent(f"{rep.name} is KronA with init={m.init!r}: its frozen base weight is the residual "
                                   "W − s·A₀⊗B₀, not W, and the difference from W is no single Kronecker product, "
                                   "so PEFT's LoKr cannot encode it; use spu_kernels.save_adapter / save_pretrained")
        if not isinstance(m.base_layer, nn.Linear):
            raise NoPeftEquivalent(f"{rep.name} wraps a {type(m.base_layer).__name__}; PEFT's LoKr adapts "
                                   "nn.Linear layers only")
        if m.out_slices is not None:
            raise NoPeftEquivalent(f"{rep.name} has per-slice Kronecker pairs {list(m.out_slices)}; PEFT's LoKr "
                                   "has one pair over the whole layer")
        mods.append((rep.name, m))
    factor = next((f for f in sorted({-1} | {m.a_shape[0] for _, m in mods})
                   if all((factorization(m.out_features, f)[0], factorization(m.in_features, f)[0]) == m.a_shape
                          for _, m in mods)), None)
    if factor is None:
        raise NoPeftEquivalent(f"the Kronecker shapes {sorted({m.a_shape for _, m in mods})} are not what PEFT's LoKr "
                               "builds for one decompose_factor (use a_shape=None, or a1 == a2)")
    r = max(max(m.b_shape) for _, m in mods)      # r >= max(b1, b2) / 2 keeps lokr_w2 whole
    scales = {m.scaling for _, m in mods}
    tensors = {}
    for name, m in mods:
        tensors[f"{PREFIX}{name}.lokr_w1"] = m.krona_A[0]
        tensors[f"{PREFIX}{name}.lokr_w2"] = m.krona_B[0]
    config = {"peft_type": "LOKR", "target_modules": [n for n, _ in mods], "r": r, "alpha": scales.pop() * r,
              "decompose_both": False, "decompose_factor": factor, "rank_dropout": 0.0, "module_dropout": 0.0,
              "use_effective_conv2d": False, "init_weights": True}
    return config, tensors


_BUILDERS: dict[str, Callable[[nn.Module, PatchState], tuple[dict, dict]]] = {
    "lora": _lora, "siva": _siva, "siva_kv": _siva, "ia3": _ia3, "krona": _krona}
