"""A model's training state changed for a moment and put back: for the passes a patch method runs
on the model before training (Fisher scoring, recording activations for an initialisation).

``evaluating(model)``: eval mode inside; every submodule's own ``training`` flag restored after.
``grads_only_for(model, params)``: also autograd on, and requires_grad on ``params`` only (every
parameter's flag restored after), so ``torch.autograd.grad`` reaches just those; ``.grad`` is never
touched. Both restore on error too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn as nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def grads_only_for(model: nn.Module, params: Iterable[nn.Parameter]) -> Iterator[nn.Module]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with evaluating(model), torch.enable_grad():
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
