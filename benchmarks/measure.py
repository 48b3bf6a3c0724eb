"""What a suite declares (cases and their variants) and how one variant is measured.

A suite module (benchmarks/suites/NAME.py) has ``cases(smoke: bool, device: str) -> list[Case]``.
A Case is one comparison: the same work done by several kinds (the frozen base layer, PEFT,
spu_kernels per backend, full fine-tuning, ...), one of which is the reference the ratios divide by.
A Variant's ``setup()`` builds everything outside the timed region and returns the callable that
does the work once; it raises ``Skip`` when the kind cannot run here (a backend or package missing).
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch


class Skip(Exception):
    """The variant cannot run on this machine; the message says why (it becomes the row's note)."""


@dataclass
class Variant:
    kind: str                                    # e.g. "base", "peft_lora", "spu_lora_triton", "full_ft"
    setup: Callable[[], Callable[[], object]]


@dataclass
class Case:
    suite: str
    name: str                                    # unique in the suite, e.g. "lowrank/T8192_K4096_N4096/p0"
    config: str                                  # what it measures, for people: "T=8192 K=4096 N=4096 r=16 p=0"
    dtype: str
    variants: list[Variant]
    reference: str                               # the kind every ratio divides by
    target: float | None = None                  # the target ratio to the reference (of time, unless noted)
    target_kinds: tuple[str, ...] = ()           # kinds (prefixes) the target applies to
    target_metric: str | None = None             # the metric it bounds (default: the time metric)
    items_per_call: int | None = None            # samples per call: adds samples_per_s
    bytes_per_call: int | None = None            # the fewest bytes a call must move: adds gbps
    peak_gbps: float | None = None               # the device's memory bandwidth: adds hbm_share
    memory: str | None = "extra"                 # CUDA peak memory: "extra" beyond what was live, "absolute", None
    host_timing: bool = False                    # CPU host cost in microseconds (metric host_us) instead of time_ms
    warmup_ms: float = 50.0
    rep_ms: float = 300.0
    probe: Callable[[str, Callable], dict[str, float]] | None = None   # extra metrics of a variant's callable

    @property
    def headline(self) -> str:
        """The time metric: what a skipped or failed variant's row is filed under."""
        return "host_us" if self.host_timing else "time_ms"


def _quantiles(times: list[float]) -> list[float]:
    q = statistics.quantiles(times, n=10, method="inclusive")       # deciles: q[1] = 20th, q[7] = 80th
    return [statistics.median(times), q[1], q[7]]


def cpu_times(fns: list[Callable], warmup_ms: float, rep_ms: float, min_reps: int,
              rounds: int = 1) -> list[list[float]]:
    """Seconds per call of each callable, timed call by call on the host clock with Python's cyclic
    garbage collector paused (as timeit does: its passes land on random calls). With several
    callables and ``rounds`` > 1 they take turns, ``rep_ms / rounds`` each per round, so that a
    noisy host's slow spells fall on all of them alike and their ratios hold."""
    for fn in fns:
        stop = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < stop:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for fn, ts in zip(fns, times):
                stop = time.perf_counter() + rep_ms / 1e3 / rounds
                while len(ts) < min_reps * (r + 1) // rounds or time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def _cuda_peak_mib(fn: Callable, floor: int | None) -> float:
    """Peak memory allocated during one call beyond what was live before it, or, with ``floor`` (what
    was allocated before the variant was set up), beyond that: the whole footprint of a training step
    (weights, optimizer state, activations), not what an earlier variant may have left behind."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - (before if floor is None else floor)) / 2**20


def measure(case: Case, fn: Callable, device: str, smoke: bool, times: list[float] | None = None,
            allocated_before_setup: int = 0) -> list[tuple[str, float, float | None, float | None]]:
    """(metric, value, p20, p80) of one variant's callable, already set up and not yet called; with
    ``times`` (seconds per call, from ``cpu_times`` over several variants) it is not timed again."""
    if times is None:
        fn()                                     # first calls: compilation, autotuning, lazy init
        fn()
    out = []
    if device == "cuda" and case.memory:
        absolute = case.memory == "absolute"
        out.append(("peak_mib" if absolute else "peak_extra_mib",
                    _cuda_peak_mib(fn, allocated_before_setup if absolute else None), None, None))
    if times is not None:
        med, p20, p80 = (1e3 * t for t in _quantiles(times))
    elif device == "cuda" and not case.host_timing:
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=case.warmup_ms, rep=case.rep_ms, quantiles=[0.5, 0.2, 0.8])
    else:
        scale = 0.05 if smoke else 1.0
        med, p20, p80 = (1e3 * t for t in _quantiles(cpu_times([fn], case.warmup_ms * scale, case.rep_ms * scale,
                                                               3 if smoke else 20)[0]))
    if case.host_timing:
        out.append(("host_us", 1e3 * med, 1e3 * p20, 1e3 * p80))
    else:
        out.append(("time_ms", med, p20, p80))
    if case.items_per_call:
        out.append(("samples_per_s", case.items_per_call / (med / 1e3), None, None))
    if case.bytes_per_call:
        gbps = case.bytes_per_call / (med / 1e3) / 1e9
        out.append(("gbps", gbps, None, None))
        if case.peak_gbps:
            out.append(("hbm_share", gbps / case.peak_gbps, None, None))
    return out


def allocated() -> int:
    """CUDA memory allocated now (0 without a GPU)."""
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def release() -> None:
    """Free what the last variant left behind before the next one is built (torch.compile's caches
    hold on to compiled models: reset them too)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
