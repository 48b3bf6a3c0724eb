"""save_adapter / load_adapter: what a patch trained, in one safetensors file.

The file holds every parameter that trains (adapters, task head, ``trainable_modules``) and the
adapters' buffers (e.g. SiVA's frozen S), under their names in the model, plus metadata: the
method and its options. Loading into a fresh copy of the base model re-runs ``patch`` with those
options (SiVA's SVD is seeded, so the frozen residual is the same) and then copies the tensors in.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .._version import __version__
from .core import is_patched, patch, patch_state, unpatch

_FORMAT = "spu_kernels.adapter.v1"


def _jsonable(options: dict) -> dict:
    return {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in options.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for everything ``save_adapter`` writes."""
    state = patch_state(model, "adapter_state_dict")
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for rep in state.replacements:
        for n, b in rep.new.named_buffers():
            if not n.startswith("base_layer."):
                out[f"{rep.name}.{n}"] = b
    return out


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    state = patch_state(model, "save_adapter")
    tensors = {n: t.detach().contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    meta = {"format": _FORMAT, "spu_kernels": __version__, "method": state.method,
            "options": json.dumps(_jsonable(state.options))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Patch ``model`` as the file says (unless it already is, with the same method) and load the
    trained tensors. Missing or unexpected names, or shape mismatches, are errors raised before
    any tensor is copied; on any error the model is left as it was (a patch done here is undone)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an spu_kernels adapter file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    method, options = meta["method"], json.loads(meta["options"])
    patched_here = not is_patched(model)
    if patched_here:   # what the unpatched model already has (the head, trainable_modules) must fit first
        own = dict(model.named_parameters())
        _check_shapes(path, {n: t for n, t in tensors.items() if n in own}, own)
        patch(model, method, **options)
    elif patch_state(model).method != method:
        raise ValueError(f"{path} holds a {method!r} adapter but the model is patched with "
                         f"{patch_state(model).method!r}; unpatch it first")
    try:
        own = adapter_state_dict(model)
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _check_shapes(path, tensors, own)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    return model


def _check_shapes(path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    bad = [f"{n} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)}"
           for n, t in tensors.items() if own[n].shape != t.shape]
    if bad:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(bad[:5])
                         + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
                         + ". Load it into the model it was trained on (same architecture and head)")
