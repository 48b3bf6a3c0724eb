"""Counting the GPU kernels one op call launches, on the CPU: every Triton launch (through
``spu_kernels.triton._launcher.launch``, the one door the launchers use) and every ATen op that would
launch a kernel on a GPU (not views, allocations or metadata), recorded with a TorchDispatchMode.
What runs inside a Triton kernel under the interpreter is not counted."""
from __future__ import annotations

import collections
import contextlib
import importlib

from torch.utils._python_dispatch import TorchDispatchMode

TRITON_MODULES = ("lowrank_linear", "ia3", "ia3_dynamic", "kron_linear", "ladder_cross_attention", "bottleneck_adapter",
                  "gemm", "partials")
# ATen ops that launch no kernel: views, allocations without fill, metadata
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "alias", "_reshape_alias", "set_", "resize_"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels = collections.Counter()
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.inside_triton and not func.is_view and name not in NO_KERNEL:
            self.kernels[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as kernels:`` -> a Counter of kernel names launched inside."""
    rec = _Recorder()
    modules = [importlib.import_module(f"spu_kernels.triton.{m}") for m in TRITON_MODULES]
    originals = [m.launch for m in modules]

    def counting(real):
        def launch(kernel):
            inner = real(kernel)
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")

            class Launch:
                def __getitem__(self, grid):
                    def run(*args, **kwargs):
                        rec.kernels[f"triton.{name}"] += 1
                        rec.inside_triton = True
                        try:
                            return inner[grid](*args, **kwargs)
                        finally:
                            rec.inside_triton = False
                    return run
            return Launch()
        return launch

    for m, real in zip(modules, originals):
        m.launch = counting(real)
    try:
        with rec:
            yield rec.kernels
    finally:
        for m, real in zip(modules, originals):
            m.launch = real
