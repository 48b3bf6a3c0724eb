"""``training.compile``: the training step's forward under torch.compile, and the fallback to eager.

Settings: ``false`` (eager), ``true`` (torch.compile, Inductor), ``reduce-overhead`` (Inductor with
CUDA graphs: the host launches a step's kernels as one graph, what the launch-bound models this
package fine-tunes need; GPU only), ``auto`` (``true`` on a GPU, ``false`` on the CPU, where
Inductor compiles take tens of seconds per model and save little).

Compilation happens at the first step (the forward; Inductor compiles the backward at the first
backward). If that first forward+backward raises, the grads it left are cleared, the reason is
logged and the run goes on eagerly: ``TrainStep.used`` (reported as ``RunResult.compile``) says
which way it trained. Later errors are the training's own and are raised. MeZO runs no backward:
its two forward passes stay eager. Evaluation stays eager too (no_grad, a few batches).
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import COMPILE_SETTINGS


def resolve_compile(setting: str, device: torch.device, use_mezo: bool) -> str:
    """The mode a run uses: "false", "true" or "reduce-overhead" (errors say how to fix the config)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"training.compile: {setting!r} is not one of {', '.join(COMPILE_SETTINGS)}")
    if setting == "auto":
        setting = "true" if device.type == "cuda" else "false"
    if setting == "reduce-overhead" and device.type != "cuda":
        raise ValueError("training.compile: reduce-overhead captures CUDA graphs and needs a CUDA device; "
                         "use true or false on the CPU")
    if use_mezo:
        return "false"
    return setting


class TrainStep:
    """Runs ``forward_backward(forward)`` with ``forward`` the compiled model or the model itself."""

    def __init__(self, model: torch.nn.Module, mode: str, log: Callable[[str], None]):
        self.model = model
        self.used = mode
        self.log = log
        self.forward = model if mode == "false" else \
            torch.compile(model, mode="reduce-overhead" if mode == "reduce-overhead" else None)
        self._first = mode != "false"     # the compiled step has not yet run through once

    def __call__(self, forward_backward: Callable[[Callable], torch.Tensor], clear_grads: Callable[[], None]):
        if self.used == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # the previous step's graph outputs are consumed
        if not self._first:
            return forward_backward(self.forward)
        try:
            loss = forward_backward(self.forward)
        except Exception as e:   # compiling failed (dynamo, AOTAutograd or Inductor): train eagerly
            clear_grads()
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            self.log(f"torch.compile ({self.used}) failed at the first step ({reason}); training eagerly instead "
                     "(set training.compile: false to skip compiling)")
            self.used = f"false (compile failed: {reason})"
            self.forward = self.model
            self._first = False
            return forward_backward(self.forward)
        self._first = False
        return loss
