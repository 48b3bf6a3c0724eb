"""save_adapter / load_adapter: what a patch trained, in one safetensors file.

The file holds every parameter that trains (adapters, task head, ``trainable_modules``) and the
adapter modules' own buffers (e.g. SiVA's frozen S; never the wrapped base layer's, such as a
backbone's ``position_ids``), under their names in the model, plus metadata: the method and its
options. Loading into a fresh copy of the base model re-runs ``patch`` with those options (SiVA's
SVD is seeded, so the frozen residual is the same) and then copies the tensors in: outputs are
bit-identical to the saved model's. ``load_adapter`` also takes an adapter folder
(``spu_kernels.save_pretrained``). Wrapped models (DDP, DataParallel, torch.compile) are unwrapped;
FSDP2 / DTensor parameters are gathered (every rank must call ``save_adapter``; only
``is_main_process`` writes) and, on load into an already patched and sharded model, scattered
(every rank calls ``load_adapter``). Format v1 files (which could hold a backbone's buffers) still load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .._version import __version__
from .core import is_patched, patch, patch_state, unpatch
from .hf_hooks import refuse_peft
from .unwrap import full_tensor, unwrap_model

FORMAT = "spu_kernels.adapter.v2"
_READS = ("spu_kernels.adapter.v1", FORMAT)
#: the native weights file inside an adapter folder
WEIGHTS_NAME = "spu_adapter.safetensors"


def jsonable(options: dict) -> dict:
    return {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in options.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor for everything ``save_adapter`` writes (names in the unwrapped model;
    DTensor shards as they are: ``save_adapter`` gathers them)."""
    model = unwrap_model(model)
    state = patch_state(model, "adapter_state_dict")
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for rep in state.replacements:
        base = {id(b) for b in rep.new.base_layer.buffers()}
        for n, b in rep.new.named_buffers():
            if id(b) not in base:
                out[f"{rep.name}.{n}"] = b
    return out


def gathered_adapter_tensors(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """adapter_state_dict as whole CPU tensors: taken from ``state_dict`` where it has the name (a
    state dict a trainer gathered), else from the model (gathering DTensors: a collective)."""
    out = {}
    for n, t in adapter_state_dict(model).items():
        src = state_dict[n] if state_dict is not None and n in state_dict else t
        out[n] = full_tensor(src).detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, path: str | Path, *, is_main_process: bool = True) -> Path:
    """Write what ``model``'s patch trains to the safetensors file ``path`` (see the module docstring)."""
    from safetensors.torch import save_file

    refuse_peft(unwrap_model(model), "save_adapter")
    state = patch_state(unwrap_model(model), "save_adapter")
    tensors = gathered_adapter_tensors(model)
    path = Path(path)
    if is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=file_metadata(state))
    return path


def file_metadata(state) -> dict[str, str]:
    return {"format": FORMAT, "spu_kernels": __version__, "method": state.method,
            "options": json.dumps(jsonable(state.options))}


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        f = path / WEIGHTS_NAME
        if not f.is_file():
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS_NAME}: not an spu_kernels adapter folder "
                                    "(spu_kernels.save_pretrained / model.save_pretrained on a patched model "
                                    "write one); a PEFT folder loads with peft.PeftModel.from_pretrained")
        return f
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file or folder at {path}")
    return path


def read_adapter(path: str | Path) -> tuple[str, dict, dict[str, torch.Tensor], str]:
    """(method, options, tensors, format) of an adapter file or folder."""
    from safetensors import safe_open
    f_path = _weights_file(Path(path))
    with safe_open(str(f_path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in _READS:
            raise ValueError(f"{f_path} is not an spu_kernels adapter file (format {meta.get('format')!r}; "
                             f"this version reads {', '.join(_READS)})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta["method"], json.loads(meta["options"]), tensors, meta["format"]


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Patch ``model`` as the file (or adapter folder) says, unless it already is with the same
    method, and load the trained tensors. Missing or unexpected names, or shape mismatches, are
    errors raised before any tensor is copied; on any error the model is left as it was (a patch
    done here is undone). Returns ``model``."""
    method, options, tensors, fmt = read_adapter(path)
    inner = unwrap_model(model)
    refuse_peft(inner, "load_adapter")
    patched_here = not is_patched(inner)
    if patched_here:   # what the unpatched model already has (the head, trainable_modules) must fit first
        own = dict(inner.named_parameters())
        _check_shapes(path, {n: t for n, t in tensors.items() if n in own}, own)
        patch(inner, method, **options)
    elif patch_state(inner).method != method:
        raise ValueError(f"{path} holds a {method!r} adapter but the model is patched with "
                         f"{patch_state(inner).method!r}; unpatch it first")
    try:
        own = adapter_state_dict(inner)
        if fmt == "spu_kernels.adapter.v1":   # v1 also wrote the wrapped backbone's buffers: not ours to load
            buffers = {n for n, _ in inner.named_buffers()}
            tensors = {n: t for n, t in tensors.items() if n in own or n not in buffers}
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _check_shapes(path, tensors, own)
    except BaseException:
        if patched_here:
            unpatch(inner)
        raise
    with torch.no_grad():
        for name, t in tensors.items():
            _copy_into(own[name], t)
    return model


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; into an FSDP2 / DTensor parameter, this rank's part of ``src`` (every rank
    reads the whole file and must call it)."""
    if hasattr(dst, "device_mesh") and hasattr(dst, "placements"):
        from torch.distributed.tensor import distribute_tensor
        src = distribute_tensor(src.to(device=dst.device, dtype=dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


def _check_shapes(path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    bad = [f"{n} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)}"
           for n, t in tensors.items() if own[n].shape != t.shape]
    if bad:
        raise ValueError(f"{path} does not fit this model: " + "; ".join(bad[:5])
                         + (f"; ... ({len(bad)} in all)" if len(bad) > 5 else "")
                         + ". Load it into the model it was trained on (same architecture and head)")
