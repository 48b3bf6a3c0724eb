"""A Triton driver for a GPU that is not there: Triton's real compiler, no device.

Two uses, both without a GPU:
- ``compile_only``: every launch becomes a compile-only warm-up and autotuned kernels compile every
  config (tests/triton_gpu_compile.py: do all kernels build for sm_90 with their GPU configs?);
- ``install_stub_launches`` / ``stub_launches``: kernels compile once (autotuning picks the first
  config, with no benchmark),
  then every launch runs the package's host-side path (triton/_launcher.py, or Triton's own:
  argument binding, cache look-up, grid) and stops at a no-op launcher that counts the launch
  (benchmarks/suites/host.py: what the Python around the kernels costs per call) and, when
  ``recorded`` is a list, records what it was handed (tests/triton_launch_replay.py).

Both let the triton backend take CPU tensors (nothing runs, so what the kernels write is garbage),
patch process-wide Triton state and are meant for a process of their own; ``stub_launches`` is a
context manager that puts everything back.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# what the stub reports of the device (an H100 SXM): launchers may size grids and shared memory by it
H100_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                   "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Utils:
    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): non-None handles, so Triton loads once
        return 1, 1, 0, 0, 1024

    def unload_module(self, module):
        pass


class StubDriver:
    """What JITFunction.run, CompiledKernel and the autotuner ask of Triton's driver."""

    def __init__(self, arch: int = 90):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils()
        self.launches = 0
        self.recorded: list | None = None   # a list: each launch appends (kernel name, hash, grid, args)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        name, digest = metadata.name, getattr(metadata, "hash", None)

        def launch(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter, leave, *args):
            self.launches += 1
            if self.recorded is not None:
                self.recorded.append((name, digest, (grid_0, grid_1, grid_2), args))
        return launch

    def get_benchmarker(self):
        # autotuning without a device: every config "takes" the same time, so the first one wins
        return lambda kernel_call, quantiles=None, **kw: [1.0] * len(quantiles) if quantiles else 1.0

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass


def _allow_triton_on_cpu() -> None:
    """The backend check says triton needs CUDA tensors or the interpreter; here it needs neither."""
    import spu_kernels.backends as backends
    reason = backends._reason
    if getattr(reason, "_stub", False):
        return

    def patched(name, device):
        return None if name == "triton" else reason(name, device)
    patched._stub = True
    patched._original = reason
    backends._reason = patched


def _restore_backend_check() -> None:
    import spu_kernels.backends as backends
    backends._reason = getattr(backends._reason, "_original", backends._reason)


COMPILED: list[tuple[str, float, object]] = []


def compile_only(arch: int) -> None:
    """Install for the rest of the process: launches compile (all autotune configs) and never run.
    Each compile is recorded in ``COMPILED`` as (kernel name, seconds, the CompiledKernel)."""
    driver.set_active(StubDriver(arch))
    jit_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t = time.time()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, time.time() - t, kernel))
        return kernel

    def autotuned(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        for cfg in self.configs:
            self.fn.run(*args, grid=None, warmup=True, **{**kwargs, **cfg.all_kwargs()})

    JITFunction.run = run
    Autotuner.run = autotuned
    _allow_triton_on_cpu()


def install_stub_launches(arch: int = 90) -> StubDriver:
    """From now on, Triton launches go through the host path to a counting no-op launcher.
    Kernels compiled here sit in Triton's per-device caches under device 0: use a process without
    a GPU (CUDA_VISIBLE_DEVICES=""), so no real launch can ever pick them up."""
    if torch.cuda.is_available():
        raise RuntimeError("stub launches need a process without a visible GPU (set CUDA_VISIBLE_DEVICES='')")
    stub = StubDriver(arch)
    driver.set_active(stub)
    _allow_triton_on_cpu()
    return stub


@contextlib.contextmanager
def stub_launches(arch: int = 90) -> Iterator[StubDriver]:
    """``install_stub_launches`` for the block only."""
    previous = driver._active      # not reset_active(): without a GPU, creating the default driver fails
    try:
        yield install_stub_launches(arch)
    finally:
        _restore_backend_check()
        driver._active = previous
