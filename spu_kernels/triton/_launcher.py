"""How the package's Triton kernels are launched: through ``wrap_triton`` inside a triton_op (so
Inductor sees them), as plain kernels under the interpreter, and in eager calls on a GPU through a
cached path that skips most of Triton's host-side work.

``kernel[grid](*args)`` in Triton 3.8 binds every argument, specialises it (dtype, 16-byte
alignment, integer value classes), builds a cache key string and looks the kernel up. One of the
low-rank op's launcher calls cost 16 µs of host time that way (39 µs for the autotuned GEMM),
11 and 13 µs on the cached path below (CPU with the stub driver: AMD EPYC, 2 cores, triton 3.8.0,
2026-11-24); a 2,048-token GEMM takes about 6 µs on an H100. Two layers cut that:

``CachedLauncher`` (one per kernel, what ``launch`` returns in eager mode) keys each call on what
decides Triton's specialisation, made *finer* than Triton's so that a hit can never pick a kernel
Triton would not pick:
  - a tensor: its dtype and whether its data pointer is 16-byte aligned;
  - an int: its exact value (a ``do_not_specialize`` int: Triton's width class only, so that a
    per-call value such as a threshold or seed does not miss every time);
  - a float: nothing (Triton passes every float as fp32); a bool, None, a str: the value;
  - the keyword arguments (constexprs, launch options) and the current device.
On a miss the kernel runs through Triton (compiling or autotuning as usual) and the returned
``CompiledKernel`` is kept with the arguments Triton appends (constexprs, the autotuned config's
values); on a hit the compiled kernel's launcher gets exactly what ``JITFunction.run`` would hand
it. An argument of another type (a tensor descriptor, a tuple) keeps that call on Triton's path.

``PlanCache`` (one per op direction) goes further: an op computes one key for its whole call
(shapes, strides, dtypes and alignment of its tensors, its scalars) and, on a miss, runs its
launchers while the launches are recorded; each tensor argument is traced by identity to the
op's list of tensors (``env``). On a hit the recorded launches are replayed with the new call's
tensors: no launcher Python, no per-kernel key.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable

import torch
import triton
from torch import Tensor
from triton import knobs
from triton.knobs import HookChain
from triton.runtime import _allocation, driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from ._common import INTERPRET

_MAX_ENTRIES = 512          # launch signatures (plans) kept per kernel (op); the cache starts over past this
_CACHEABLE = (Tensor, int, float, bool, str)
_I32 = (-(2 ** 31), 2 ** 31)
_I64 = (-(2 ** 63), 2 ** 63)

# SPU_KERNELS_CACHED_LAUNCH=0 sends every eager launch through Triton's own path (a debugging aid;
# tests compare the two)
ENABLED = os.environ.get("SPU_KERNELS_CACHED_LAUNCH", "1") != "0"
# set while a triton_op's body runs (ops/_library.py): its launches must go through wrap_triton
_IN_TRITON_OP = contextvars.ContextVar("spu_kernels_in_triton_op", default=False)
# a list while a PlanCache records an op's launches: (compiled, grid, args) per launch, None for
# a launch that cannot be replayed
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("spu_kernels_recording", default=None)
_CACHED: dict = {}          # kernel -> its CachedLauncher


@contextlib.contextmanager
def in_triton_op():
    """The context a ``torch.library.triton_op`` body runs its launchers in (ops/_library.py)."""
    token = _IN_TRITON_OP.set(True)
    try:
        yield
    finally:
        _IN_TRITON_OP.reset(token)


def direct_launches() -> bool:
    """Whether launches take the cached path (eager, compiled Triton): not under the interpreter
    and not inside a triton_op, whose launches wrap_triton must see."""
    return ENABLED and not INTERPRET and not _IN_TRITON_OP.get()


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global scratch for a launch (Triton's allocator protocol): the device-side TMA descriptors of
    triton/gemm.py, 128 bytes each per program, from torch's caching allocator (CUDA-graph safe)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Kernels that build TMA descriptors on the device need Triton's allocator, a context variable:
    unset in a new thread (autograd's device threads run the backward). Set ours where none is set;
    a user's own allocator is left alone."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def launch(kernel):
    """How launchers call a kernel, ``launch(kernel)[grid](*args, **constexprs)``: inside a
    triton_op's body through ``torch.library.wrap_triton``, which records the launch for Inductor
    when the op is traced (and dispatches a higher-order op when it is not: ~0.3 ms a launch);
    under the interpreter the kernel itself; everywhere else through the kernel's CachedLauncher."""
    if _IN_TRITON_OP.get():
        return torch.library.wrap_triton(kernel)
    if INTERPRET:
        return kernel
    ensure_allocator()
    if not ENABLED:
        return kernel
    cached = _CACHED.get(kernel)
    if cached is None:
        cached = _CACHED[kernel] = CachedLauncher(kernel)
    return cached


def _no_hooks(hook) -> bool:
    """A launch hook that would do nothing (Triton 3.8 keeps an empty HookChain there)."""
    return hook is None or (isinstance(hook, HookChain) and not hook.calls)


def _run_compiled(compiled, grid: tuple, stream, args, hooks: bool | None = None) -> None:
    """What JITFunction.run does once it has the kernel: the launch hooks (profilers) only when set
    (``hooks``: whether they are, if the caller knows)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if hooks is None:
        hooks = not (_no_hooks(enter) and _no_hooks(leave))
    if not hooks:
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args)
    else:
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *args), enter, leave, *args)


def _grid3(grid) -> tuple:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def _int_class(v: int) -> str:
    if _I32[0] <= v < _I32[1]:
        return "i32"
    return "i64" if _I64[0] <= v < _I64[1] else "u64"


def _jit_function(kernel) -> JITFunction:
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


class CachedLauncher:
    """``CachedLauncher(kernel)[grid](*args, **constexprs)``: as ``kernel[grid](...)``. ``grid`` is
    a tuple or, for an autotuned kernel, a callable of the chosen config's meta-parameters."""

    __slots__ = ("kernel", "_jit", "_unspecialized", "_cache", "_autotuned")

    def __init__(self, kernel):
        self.kernel = kernel
        self._jit = _jit_function(kernel)
        self._unspecialized = tuple(p.num for p in self._jit.params if p.do_not_specialize)
        self._autotuned = isinstance(kernel, Autotuner)
        self._cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _key(self, args, kwargs):
        # one pass, no call per scalar: a tensor -> (dtype, aligned), a float -> a marker, a bool ->
        # ("b", value) (True == 1 otherwise), anything else -> itself (a type _first_launch does not
        # accept is never stored, so such a key only ever misses)
        key = [(a.dtype, not a.data_ptr() & 15) if isinstance(a, Tensor)
               else (0.5 if (t := type(a)) is float else (("b", a) if t is bool else a)) for a in args]
        for i in self._unspecialized:
            if i < len(key) and type(key[i]) is int:
                key[i] = _int_class(key[i])
        key.append(tuple(kwargs.items()))
        key.append(driver.active.get_current_device())
        return tuple(key)

    def run(self, grid, args, kwargs):
        key = self._key(args, kwargs)
        try:
            entry = self._cache.get(key)
        except TypeError:           # an unhashable argument (a list): Triton's path
            entry = key = None
        if entry is None:
            return self._first_launch(key, grid, args, kwargs)
        compiled, tail, meta = entry
        grid = _grid3(grid(meta) if callable(grid) else grid)
        full = args + tail
        _run_compiled(compiled, grid, driver.active.get_current_stream(key[-1]), full)
        recording = _RECORDING.get()
        if recording is not None:
            recording.append((compiled, grid, full))
        return compiled

    def _first_launch(self, key, grid, args, kwargs):
        """Triton's own path; its compiled kernel and appended arguments are kept for the next call."""
        compiled = self.kernel[grid](*args, **kwargs)
        entry = self._entry(compiled, args, kwargs) if key is not None else None
        if entry is not None:
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = entry
        recording = _RECORDING.get()
        if recording is not None:
            recording.append(None if entry is None else
                              (compiled, _grid3(grid(entry[2]) if callable(grid) else grid), args + entry[1]))
        return compiled

    def _entry(self, compiled, args, kwargs):
        """(compiled, the arguments Triton appends after ``args``, the meta-parameters) or None."""
        if compiled is None or not hasattr(compiled, "packed_metadata") \
                or not all(a is None or isinstance(a, _CACHEABLE) for a in args):
            return None
        meta = dict(kwargs)
        if self._autotuned:
            meta.update(self.kernel.best_config.all_kwargs())
        names = self._jit.arg_names
        if any(name not in meta for name in names[len(args):]):
            return None             # a parameter left to its default: not worth replicating
        return compiled, tuple(meta[name] for name in names[len(args):]), meta


def tensor_key(t: Tensor | None):
    """What a plan key holds of a tensor: shape, strides, dtype, 16-byte alignment (None for None)."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, not t.data_ptr() & 15


def aligned(*tensors) -> int:
    """What a plan key holds of tensors whose shape the rest of the key fixes (outputs,
    workspaces): two bits each, one set for None, one for a data pointer not 16-byte aligned."""
    bits = 0
    for i, t in enumerate(tensors):
        if t is None:
            bits |= 1 << (2 * i)
        elif t.data_ptr() & 15:
            bits |= 2 << (2 * i)
    return bits


class _Plan:
    """The launches of one op call: per launch the compiled kernel, its grid, its arguments with
    the tensors taken out, and (argument position, index into env) for each tensor."""

    __slots__ = ("steps",)

    def __init__(self, steps):
        self.steps = steps

    @classmethod
    def from_recording(cls, recorded: list, env: tuple) -> _Plan | None:
        named = [id(t) for t in env if t is not None]
        if len(set(named)) != len(named):
            return None     # one tensor in two roles: a later call may pass two, and a slot must say which
        steps = []
        for launch_ in recorded:
            if launch_ is None:
                return None
            compiled, grid, args = launch_
            template, slots = list(args), []
            for pos, a in enumerate(args):
                if isinstance(a, Tensor):
                    src = next((j for j, t in enumerate(env) if t is a), None)
                    if src is None:         # a tensor the op did not name: cannot be replayed
                        return None
                    slots.append((pos, src))
                    template[pos] = None
            steps.append((compiled, grid, template, tuple(slots)))
        return cls(steps) if steps else None

    def replay(self, env: tuple, stream) -> None:
        hooks = not (_no_hooks(knobs.runtime.launch_enter_hook) and _no_hooks(knobs.runtime.launch_exit_hook))
        for compiled, grid, template, slots in self.steps:
            args = template.copy()
            for pos, src in slots:
                args[pos] = env[src]
            _run_compiled(compiled, grid, stream, args, hooks)


class PlanCache:
    """Recorded launch plans of one op direction, by the op's key."""

    def __init__(self):
        self._plans: dict = {}
        self.replays = 0            # how many calls were served by a plan (tests read it)

    def run(self, key: Callable[[], tuple], env: tuple, body: Callable[[], None]) -> None:
        """Launch what ``body()`` launches. ``key()`` must determine every launch's grid, scalars and
        Triton specialisation (``tensor_key`` of each tensor in ``env``, the op's scalars); ``env``
        holds every tensor ``body`` passes to a kernel (outputs and workspaces included), by
        identity. Off the cached path (interpreter; a triton_op, traced with fake tensors that have
        no data pointer) ``body`` just runs and ``key`` is not called."""
        if not direct_launches():
            body()
            return
        device = driver.active.get_current_device()
        key = (key(), device)
        plan = self._plans.get(key)
        if plan is not None:
            ensure_allocator()
            plan.replay(env, driver.active.get_current_stream(device))
            self.replays += 1
            return
        token = _RECORDING.set([])
        try:
            body()
            recorded = _RECORDING.get()
        finally:
            _RECORDING.reset(token)
        plan = _Plan.from_recording(recorded, env)
        if plan is not None:
            if len(self._plans) >= _MAX_ENTRIES:
                self._plans.clear()
            self._plans[key] = plan
