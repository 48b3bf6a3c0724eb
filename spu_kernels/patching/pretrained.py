"""Adapter folders: ``save_pretrained`` / ``from_pretrained`` for patched transformers models.

A folder holds the adapter only, never the base weights:

* ``spu_config.json``: the base model (``base_model_name_or_path``, its class), the method and its
  options, the spu_kernels version;
* ``spu_adapter.safetensors``: what ``save_adapter`` writes (``checkpoint.WEIGHTS_NAME``);
* where the patch has an exact PEFT equivalent and the base model has a path, also PEFT's
  ``adapter_config.json`` + ``adapter_model.safetensors``, so that a plain
  ``AutoModel*.from_pretrained(folder)`` (transformers' PEFT integration) gives the trained model.

No ``config.json`` is written: ``AutoModel*.from_pretrained`` on a folder without the PEFT files
fails (no config) instead of returning the base with random adapted layers.
``spu_kernels.from_pretrained(folder)`` loads the base, re-patches and loads the adapter: outputs are
bit-identical to the saved model's for every method.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._version import __version__
from .checkpoint import (
    WEIGHTS_NAME,
    adapter_state_dict,
    encode_adapter,
    gathered_adapter_tensors,
    load_adapter,
)
from .core import patch_state
from .hf_hooks import refuse_peft
from .peft_format import peft_adapter_files
from .unwrap import unwrap_model

CONFIG_NAME = "spu_config.json"
FOLDER_FORMAT = "spu_kernels.adapter_folder.v1"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

# save_pretrained keywords of transformers that mean nothing for an adapter folder
_IGNORED = ("max_shard_size", "token", "save_peft_format", "save_original_format", "distributed_checkpoint")

def base_model_path(model: nn.Module) -> str | None:
    """Where ``model``'s base weights came from (``name_or_path`` / ``config._name_or_path``), or None."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(path) if path else None


def base_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's frozen floating-point weights ("float32", "bfloat16", ...), or None."""
    dt = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return None if dt is None else str(dt).removeprefix("torch.")


def model_class(model: nn.Module) -> type:
    """``model``'s own class: FSDP2's ``fully_shard`` swaps in a subclass (FSDP<Name>) to skip."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))


def _saves_own(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the model's own adapter tensors are whole and what is saved (PEFT's files are built
    from them): not so under FSDP, or where a trainer's gathered ``state_dict`` replaced them."""
    return all(not hasattr(t, "device_mesh") and t.shape == tensors[n].shape
               and torch.equal(t.detach().cpu(), tensors[n]) for n, t in adapter_state_dict(model).items())


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
                    is_main_process: bool = True, safe_serialization: bool = True, push_to_hub: bool = False,
                    variant: str | None = None, peft_format: bool = True, **kwargs: Any) -> Path:
    """Write ``model``'s patch as an adapter folder (see the module docstring) and return its path.

    What ``model.save_pretrained`` and ``Trainer.save_model`` / its checkpoints call on a patched
    model. ``state_dict`` (a state dict a trainer gathered, e.g. under FSDP) supplies the adapter
    tensors where it has their names; ``is_main_process=False`` writes nothing (FSDP2 parameters are
    still gathered: every rank must call it). PEFT's files are written where the patch has a PEFT
    equivalent, the base model has a path, ``peft_format`` is True, and the model's own adapter tensors
    are whole and equal to those saved (not under FSDP: convert such a folder afterwards by loading
    it with ``from_pretrained`` and saving it again)."""
    unknown = sorted(set(kwargs) - set(_IGNORED))
    if unknown:
        raise TypeError(f"spu_kernels.save_pretrained: unexpected keyword(s) {unknown}")
    if not safe_serialization:
        raise ValueError("spu_kernels.save_pretrained writes safetensors only; drop safe_serialization=False")
    if push_to_hub or variant is not None:
        raise ValueError("spu_kernels.save_pretrained writes a local adapter folder only (no push_to_hub, no "
                         "variant); upload the folder with huggingface_hub.upload_folder")
    inner = unwrap_model(model)
    refuse_peft(inner, "save_pretrained")
    state = patch_state(inner, "save_pretrained")
    tensors = gathered_adapter_tensors(inner, state_dict)   # a collective under FSDP2: before the rank check
    folder = Path(save_directory)
    if not is_main_process:
        return folder
    base = base_model_path(inner)
    peft = peft_adapter_files(inner) if peft_format and base is not None and _saves_own(inner, tensors) else None
    options, file_tensors, metadata = encode_adapter(inner, state, tensors)
    from safetensors.torch import save_file
    if folder.is_file():
        raise FileExistsError(f"save_pretrained: {folder} is a file; give a folder path")
    if (folder / "config.json").exists():   # AutoModel*.from_pretrained would load that model, not this one
        raise FileExistsError(f"save_pretrained: {folder} holds a whole model (config.json); save the adapter "
                              "folder elsewhere, or empty this one first")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = getattr(inner, "config", None)
    spu_config = {
        "format": FOLDER_FORMAT, "spu_kernels": __version__,
        "base_model_name_or_path": base, "architecture": model_class(inner).__name__,
        "model_type": getattr(cfg, "model_type", None), "dtype": base_dtype(inner),
        "method": state.method, "options": options,
        "weights": WEIGHTS_NAME, "peft_files": peft is not None,
    }
    for stale in (CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):   # from an earlier save into this folder
        (folder / stale).unlink(missing_ok=True)
    save_file(file_tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    if peft is not None:
        peft_config, peft_tensors = peft
        peft_config = {**peft_config, "base_model_name_or_path": base, "revision": None}
        save_file({k: v.detach().contiguous().cpu() for k, v in peft_tensors.items()},
                  str(folder / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    # written last: a folder with spu_config.json is complete
    (folder / CONFIG_NAME).write_text(json.dumps(spu_config, indent=2) + "\n")
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """The ``spu_config.json`` of an adapter folder (clear errors for anything else)."""
    folder = Path(folder)
    f = folder / CONFIG_NAME
    if not f.is_file():
        hint = (" It holds a PEFT adapter: load it with peft.PeftModel.from_pretrained, or convert it with "
                "spu_kernels.from_peft" if (folder / PEFT_CONFIG_NAME).is_file() else "")
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not an spu_kernels adapter folder "
                                f"(model.save_pretrained on a patched model writes one).{hint}")
    cfg = json.loads(f.read_text())
    if cfg.get("format") != FOLDER_FORMAT:
        raise ValueError(f"{f}: format {cfg.get('format')!r} is not {FOLDER_FORMAT!r} (written by a newer "
                         "spu_kernels? upgrade it)")
    return cfg


def from_pretrained(folder: str | os.PathLike, model: nn.Module | None = None, **from_pretrained_kwargs: Any
                    ) -> nn.Module:
    """The patched model an adapter folder was saved from: its base model (``model``, else loaded with
    the recorded class from the recorded ``base_model_name_or_path`` in the recorded dtype;
    ``from_pretrained_kwargs`` go to that ``from_pretrained``), patched and loaded as ``load_adapter``
    does. Outputs are bit-identical to the saved model's (given the same base weights)."""
    cfg = read_config(folder)
    if model is not None:
        if from_pretrained_kwargs:
            raise TypeError(f"from_pretrained: keyword(s) {sorted(from_pretrained_kwargs)} are for loading the "
                            "base model; none is loaded when model= is given")
        got = model_class(unwrap_model(model)).__name__
        if cfg["architecture"] and got != cfg["architecture"]:
            raise ValueError(f"{folder} was saved from a {cfg['architecture']}; model= is a {got}")
    else:
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{folder} does not record where its base model came from (it was built in memory, "
                             f"not loaded with from_pretrained); pass the base model: "
                             f"spu_kernels.from_pretrained({str(folder)!r}, model=<a fresh {cfg['architecture']}>)")
        import transformers
        cls = getattr(transformers, cfg["architecture"], None)
        if cls is None:
            raise ValueError(f"{folder}: transformers {transformers.__version__} has no class "
                             f"{cfg['architecture']!r}; load the base model yourself and pass it as model=")
        if cfg.get("dtype") and "dtype" not in from_pretrained_kwargs and "torch_dtype" not in from_pretrained_kwargs:
            from_pretrained_kwargs["dtype"] = getattr(torch, cfg["dtype"])   # as the saved model had it
        model = cls.from_pretrained(base, **from_pretrained_kwargs)
    return load_adapter(model, folder)
