"""The model a wrapper holds: DDP, DataParallel, FSDP1, accelerate's and torch.compile's wrappers
keep the patched model (and its patch state) one or more attributes down; FSDP2's ``fully_shard``
keeps the model itself but turns its parameters into DTensors (``local`` gathers one)."""
from __future__ import annotations

import torch
import torch.nn as nn


def _wrapper_types() -> tuple[type, ...]:
    types: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        types.append(FullyShardedDataParallel)
    except ImportError:   # torch built without distributed
        pass
    return tuple(types)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / FSDP1 (``.module``) and torch.compile (``._orig_mod``) wrappers,
    however nested; any other module is returned as it is."""
    wrappers = _wrapper_types()
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 / tensor-parallel DTensor (a collective: every rank must
    call it), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "device_mesh") else t
