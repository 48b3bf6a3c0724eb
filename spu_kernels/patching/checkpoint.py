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
(every rank calls ``load_adapter``).

A method may store its tensors in a layout of its own (``register_file_codec``): it encodes the
options and tensors on save and decodes them, before anything changes, on load; the file's
metadata names the encoding (e.g. FishMask writes only the selected entries: fishmask_format.py).
Formats: v2, and v3 (v2 plus that ``encoding``: only files written through a codec, so older
versions refuse them instead of misreading them); v1 files (which could hold a backbone's buffers)
still load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .._version import __version__
from .core import is_patched, patch, patch_state, unpatch
from .hf_hooks import refuse_peft
from .unwrap import full_tensor, unwrap_model

FORMAT = "spu_kernels.adapter.v2"
#: files whose method stores its tensors through a file codec (older versions refuse them, not misread them)
ENCODED_FORMAT = "spu_kernels.adapter.v3"
_READS = ("spu_kernels.adapter.v1", FORMAT, ENCODED_FORMAT)
#: the native weights file inside an adapter folder
WEIGHTS_NAME = "spu_adapter.safetensors"


@dataclass(frozen=True)
class FileCodec:
    """A method's own file layout. ``name`` (versioned, e.g. "fishmask.sparse.v1") is recorded in
    the file's metadata as ``encoding``.

    ``encode(model, options, tensors) -> (options, tensors)``: from the patched (unwrapped) model,
    its JSON-able recorded options and ``adapter_state_dict``'s whole CPU tensors, what the file holds.
    ``decode(model, options, tensors) -> (options, tensors)``: from the file's, the options ``patch``
    takes and whole tensors under ``adapter_state_dict``'s names, for the (unwrapped) model about to
    be loaded into, patched or not. It must change nothing and raise ``ValueError`` saying what
    does not fit."""
    name: str
    encode: Callable[[nn.Module, dict, dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]
    decode: Callable[[nn.Module, dict, dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]


_CODECS: dict[str, FileCodec] = {}


def register_file_codec(method: str, codec: FileCodec) -> None:
    """Make ``save_adapter`` / ``save_pretrained`` write ``method``'s patches through ``codec`` and
    ``load_adapter`` / ``from_pretrained`` read files naming its encoding (files without one load as usual)."""
    if method in _CODECS:
        raise ValueError(f"method {method!r} already has a file codec ({_CODECS[method].name})")
    _CODECS[method] = codec


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

    inner = unwrap_model(model)
    refuse_peft(inner, "save_adapter")
    state = patch_state(inner, "save_adapter")
    tensors = gathered_adapter_tensors(model)
    path = Path(path)
    if is_main_process:
        _, tensors, metadata = encode_adapter(inner, state, tensors)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
    return path


def encode_adapter(model: nn.Module, state, tensors: dict[str, torch.Tensor]
                   ) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(JSON-able options, tensors, safetensors metadata) of the adapter file for ``state``, the patch
    of the unwrapped ``model``, whose ``gathered_adapter_tensors`` are ``tensors``: through the
    method's file codec where it has one."""
    options = jsonable(state.options)
    metadata = {"format": FORMAT, "spu_kernels": __version__, "method": state.method}
    codec = _CODECS.get(state.method)
    if codec is not None:
        options, tensors = codec.encode(model, options, tensors)
        metadata.update(format=ENCODED_FORMAT, encoding=codec.name)
    metadata["options"] = json.dumps(options)
    return options, tensors, metadata


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
    """(method, options, tensors, format) of an adapter file or folder, as stored (a method's
    encoding, e.g. FishMask's selected entries, not decoded: ``load_adapter`` decodes)."""
    return _read(path)[:4]


def _read(path: str | Path) -> tuple[str, dict, dict[str, torch.Tensor], str, str | None]:
    from safetensors import safe_open
    f_path = _weights_file(Path(path))
    with safe_open(str(f_path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in _READS:
            raise ValueError(f"{f_path} is not an spu_kernels adapter file (format {meta.get('format')!r}; "
                             f"this version reads {', '.join(_READS)})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta["method"], json.loads(meta["options"]), tensors, meta["format"], meta.get("encoding")


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Patch ``model`` as the file (or adapter folder) says, unless it already is with the same
    method, and load the trained tensors. Missing or unexpected names, or shape mismatches, are
    errors raised before any tensor is copied; on any error the model is left as it was (a patch
    done here is undone). Returns ``model``."""
    method, options, tensors, fmt, encoding = _read(path)
    inner = unwrap_model(model)
    refuse_peft(inner, "load_adapter")
    if encoding is not None:
        codec = _CODECS.get(method)
        if codec is None or codec.name != encoding:
            raise ValueError(f"{path} stores its tensors as {encoding!r}, which this version of spu_kernels "
                             f"({__version__}) does not read (it reads "
                             f"{codec.name if codec else 'no encoding'} for {method!r}); upgrade spu_kernels")
        try:
            options, tensors = codec.decode(inner, options, tensors)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
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
