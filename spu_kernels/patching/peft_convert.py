"""from_peft / to_peft: move a model between PEFT's tuner layers and spu_kernels' fused modules.

``from_peft(peft_model)``: a PeftModel's one active LoRA / IA3 / LoKr adapter becomes the spu
"lora" / "ia3" / "krona" patch of the same tensors, in place; returns the underlying transformers
model, patched (the PeftModel wrapper is spent: do not use it afterwards).
``to_peft(model)``: the reverse, via the exact mapping of ``peft_format`` (also siva / siva_kv,
as a LoRA of rank 2r): unpatches ``model`` and returns ``peft.get_peft_model(model, config)`` with
the mapped tensors loaded. Outputs are equal to fp32 rounding both ways. Everything is checked
before the model changes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..modules.krona import kron_shapes
from ..modules.lowrank_base import is_linear_like, linear_dims
from .adapters import list_adapters
from .architectures import HEAD_NAMES
from .core import is_patched, patch, unpatch
from .peft_format import NoPeftEquivalent, factorization, peft_mapping
from .pretrained import base_model_path
from .unwrap import unwrap_model


def to_peft(model: nn.Module):
    """Unpatch ``model`` and return it as a ``peft.PeftModel`` computing the same outputs (adapter
    "default", trainable). Raises ValueError (``NoPeftEquivalent``) for a patch PEFT cannot express,
    before anything changes."""
    import peft
    from peft import get_peft_model, set_peft_model_state_dict

    inner = unwrap_model(model)
    if not is_patched(inner):
        raise RuntimeError("spu_kernels.to_peft: this model is not patched (call spu_kernels.patch first)")
    names = list_adapters(inner)
    if len(names) > 1:
        raise ValueError(f"spu_kernels.to_peft: the model holds adapters {names}; a PeftModel built here holds "
                         "one: delete the others first (spu_kernels.delete_adapter)")
    config, tensors = peft_mapping(inner)
    peft_config = peft.get_peft_config({**config, "inference_mode": False,
                                        "base_model_name_or_path": base_model_path(inner)})
    unpatch(inner)
    pm = get_peft_model(inner, peft_config)
    result = set_peft_model_state_dict(pm, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:   # a bug in the mapping, not the user's doing
        raise RuntimeError(f"spu_kernels.to_peft: PEFT did not take {unexpected[:5]}")
    return pm


def _layers(base: nn.Module, cls) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in base.named_modules() if isinstance(m, cls)]


def _same(values: dict, what: str, hint: str):
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        raise NotImplementedError(f"spu_kernels.from_peft: layers differ in {what} ({distinct}); spu_kernels' patch "
                                  f"takes one value. {hint}")
    return distinct[0]


def _lora(cfg, layers, name):
    from peft.tuners.lora import LoraLayer
    if getattr(cfg, "use_dora", False) or getattr(cfg, "lora_bias", False) or cfg.bias != "none":
        raise NotImplementedError("spu_kernels.from_peft: DoRA, lora_bias and bias training have no spu_kernels "
                                  "equivalent (plain LoRA only)")
    tensors, ranks, scales, drops = {}, {}, {}, {}
    for n, m in layers:
        if not isinstance(m, LoraLayer):
            raise NotImplementedError(f"spu_kernels.from_peft: {n} is a {type(m).__name__}")
        base = m.get_base_layer()
        ranks[n], scales[n] = m.r[name], m.scaling[name]
        if name in m.lora_embedding_A:
            if not isinstance(base, nn.Embedding):
                raise NotImplementedError(f"spu_kernels.from_peft: {n} wraps a {type(base).__name__}")
            tensors[f"{n}.lora_embedding_A"] = m.lora_embedding_A[name]
            tensors[f"{n}.lora_embedding_B"] = m.lora_embedding_B[name]
            continue
        if name not in m.lora_A or not is_linear_like(base):
            raise NotImplementedError(f"spu_kernels.from_peft: {n} is a LoRA {type(base).__name__}; spu_kernels "
                                      "adapts nn.Linear, transformers Conv1D and nn.Embedding")
        drop = m.lora_dropout[name]
        drops[n] = drop.p if isinstance(drop, nn.Dropout) else 0.0
        tensors[f"{n}.lora_A"] = m.lora_A[name].weight
        tensors[f"{n}.lora_B"] = m.lora_B[name].weight
    r = _same(ranks, "rank", "Convert a PEFT LoRA without rank_pattern")
    for n, m in layers:   # spu's limit (PEFT has none): checked before the PeftModel changes
        base = m.get_base_layer()
        dims = tuple(base.weight.shape) if isinstance(base, nn.Embedding) else linear_dims(base)
        if r > min(dims):
            raise NotImplementedError(f"spu_kernels.from_peft: rank {r} exceeds min{dims} of {n}; spu_kernels' "
                                      "LoRA needs r <= min(in, out)")
    scaling = _same(scales, "scaling", "Convert a PEFT LoRA without alpha_pattern")
    dropout = _same(drops, "lora_dropout", "") if drops else 0.0
    return "lora", {"r": r, "alpha": scaling * r, "dropout": dropout}, tensors


def _ia3(cfg, layers, name):
    tensors, out_side, in_side = {}, [], []
    for n, m in layers:
        if not is_linear_like(m.get_base_layer()):
            raise NotImplementedError(f"spu_kernels.from_peft: {n}: only IA3 on nn.Linear / Conv1D converts")
        (in_side if m.is_feedforward else out_side).append(n)
        tensors[f"{n}.ia3_l"] = m.ia3_l[name].flatten()
    if not out_side:
        raise NotImplementedError("spu_kernels.from_peft: an IA3 adapter without non-feedforward layers has no "
                                  "spu_kernels 'ia3' equivalent (it scales at least one layer's output)")
    return "ia3", {"target_modules": out_side, "feedforward_modules": in_side or None,
                   "feedforward": bool(in_side)}, tensors


def _lokr(cfg, layers, name):
    if cfg.rank_dropout or cfg.module_dropout:
        raise NotImplementedError("spu_kernels.from_peft: LoKr rank_dropout / module_dropout have no spu_kernels "
                                  "equivalent; set them to 0 in peft_model.peft_config first")
    tensors, shapes, scales, default = {}, {}, {}, {}
    for n, m in layers:
        base = m.get_base_layer()
        if not isinstance(base, nn.Linear) or name in m.lokr_t2:
            raise NotImplementedError(f"spu_kernels.from_peft: {n}: only LoKr on nn.Linear converts")
        w1 = m.lokr_w1[name] if name in m.lokr_w1 else m.lokr_w1_a[name] @ m.lokr_w1_b[name]
        w2 = m.lokr_w2[name] if name in m.lokr_w2 else m.lokr_w2_a[name] @ m.lokr_w2_b[name]
        tensors[f"{n}.krona_A"], tensors[f"{n}.krona_B"] = w1[None], w2[None]
        shapes[n], scales[n] = tuple(w1.shape), m.scaling[name]
        default[n] = (factorization(base.out_features)[0], factorization(base.in_features)[0]) == shapes[n]
    scale = _same(scales, "scaling", "Convert a LoKr without alpha_pattern / rank_pattern")
    # spu's a_shape=None is PEFT's default split (the most square); else one a_shape must fit all
    a_shape = None if all(default.values()) else _same(shapes, "Kronecker shapes", "")
    for n, m in layers:   # what spu's krona builds must hold these tensors
        base = m.get_base_layer()
        want = kron_shapes(base.out_features, base.in_features, a_shape)
        if want != (shapes[n], tuple(tensors[f"{n}.krona_B"].shape[1:])):
            raise NotImplementedError(f"spu_kernels.from_peft: {n}: LoKr factors {shapes[n]} do not fit KronA's "
                                      f"shapes {want}")
    return "krona", {"a_shape": a_shape, "scale": scale}, tensors


def from_peft(peft_model) -> nn.Module:
    """Swap a ``peft.PeftModel``'s LoRA / IA3 / LoKr layers (one adapter) for spu_kernels' fused
    modules holding the same tensors, and return the underlying transformers model, patched
    ("lora", "ia3" or "krona"; ``spu_kernels.summary`` / ``save_adapter`` / ``to_peft`` work on it).
    PEFT's ``modules_to_save`` stay trainable (the task head, else as ``trainable_modules``).
    LoKr factors PEFT keeps decomposed (w = a·b) become full Kronecker factors. Raises before
    anything changes where spu_kernels has no exact equivalent."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"spu_kernels.from_peft expects a peft.PeftModel, got {type(peft_model).__name__}")
    if len(peft_model.peft_config) != 1:
        raise NotImplementedError(f"spu_kernels.from_peft: the PeftModel holds adapters "
                                  f"{sorted(peft_model.peft_config)}; delete all but one first")
    name = next(iter(peft_model.peft_config))
    cfg = peft_model.peft_config[name]
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    convert = {"LORA": _lora, "IA3": _ia3, "LOKR": _lokr}.get(kind)
    if convert is None:
        raise NotImplementedError(f"spu_kernels.from_peft: PEFT type {kind} has no spu_kernels equivalent "
                                  "(LORA, IA3 and LOKR convert)")
    base = peft_model.base_model.model
    layers = _layers(base, BaseTunerLayer)
    if not layers:
        raise ValueError("spu_kernels.from_peft: the PeftModel holds no tuner layers")
    if any(getattr(m, "merged", False) for _, m in layers):
        raise ValueError("spu_kernels.from_peft: the adapter is merged into the base weights; call "
                         "peft_model.unmerge_adapter() first")
    method, options, tensors = convert(cfg, layers, name)
    saved = [n for n, _ in _layers(base, ModulesToSaveWrapper)]
    trainable = [n for n in saved if n.split(".")[0] not in HEAD_NAMES]
    head = any(n.split(".")[0] in HEAD_NAMES for n in saved)
    dtype = next(iter(tensors.values())).dtype
    tensors = {n: t.detach().clone() for n, t in tensors.items()}
    model = peft_model.unload()     # tuner layers out, modules_to_save's trained copies in
    if method != "ia3":
        options["target_modules"] = [n for n, _ in layers]
    patch(model, method, train_head=head, trainable_modules=trainable or None, adapter_dtype=dtype, **options)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t.reshape(own[n].shape))
    return model


__all__ = ["from_peft", "to_peft", "NoPeftEquivalent"]
