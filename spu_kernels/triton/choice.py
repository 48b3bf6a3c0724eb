"""Per-shape choice between two ways of computing an op's frozen-linear product, by measurement.

The fused Triton GEMM (triton/gemm.py, the rank-r term in its epilogue) matches cuBLAS at large
shapes, but at small K (few K steps: 16384×768×768 measured 1.96× cuBLAS on an H100) cuBLAS with a
side kernel wins. So, as autotuning does for tile configs, the first eager call of a shape on a
GPU times both ways on the call's own tensors (CUDA events, after a warm-up that compiles and
autotunes) and keeps the faster: in memory, and on disk so that later processes skip the timing.

    choice = ShapeChoice("lowrank_fwd", default=lambda key: "triton")
    way = choice.choose(key, trial)          # trial(way) runs the op's product that way

Keys hold shape buckets (tokens to the next power of two), dtypes and flags; the disk cache
(``$SPU_KERNELS_CACHE_DIR`` or ``~/.cache/spu_kernels``, ``choices.json``) keys them by GPU name and
torch / triton versions too. ``SPU_KERNELS_GEMM=triton|cublas`` forces one way everywhere (a
benchmark and debugging aid); ``auto`` (the default) chooses. Where nothing can be timed (no GPU,
the interpreter, a traced triton_op, CUDA-graph capture) a stored choice is used, else the default.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import warnings
from typing import Callable

import torch
import triton

from ._launcher import direct_launches

WAYS = ("triton", "cublas")
_LOCK = threading.Lock()
_DISK: dict | None = None        # the cache file's entries, loaded on first use
_WARNED = set()


def forced() -> str | None:
    """The way SPU_KERNELS_GEMM forces (None: choose). A bad value is an error naming the good ones."""
    value = os.environ.get("SPU_KERNELS_GEMM", "auto")
    if value == "auto":
        return None
    if value not in WAYS:
        raise ValueError(f"SPU_KERNELS_GEMM={value!r}: expected one of auto, {', '.join(WAYS)}")
    return value


def cache_file() -> str:
    root = os.environ.get("SPU_KERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spu_kernels")
    return os.path.join(root, "choices.json")


@functools.cache
def _has_gpu() -> bool:
    return torch.cuda.is_available()


def measurable() -> bool:
    """Whether a trial can be timed now: eager launches on a GPU, not inside CUDA-graph capture."""
    return _has_gpu() and direct_launches() and not torch.cuda.is_current_stream_capturing()


def time_us(fn: Callable[[], None]) -> float:
    """Median µs of ``fn`` on the current stream, after one warm-up call (compile, autotune)."""
    fn()
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


@functools.cache
def _machine() -> str:
    gpu = torch.cuda.get_device_name() if _has_gpu() else "cpu"
    return f"{gpu}|torch {torch.__version__}|triton {triton.__version__}"


def _warn_once(what: str, err: Exception) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"spu_kernels: {what} {cache_file()} ({type(err).__name__}: {err}); "
                      "choices are kept in memory only", stacklevel=3)


def _read(path: str) -> dict:
    """The cache file's entries ({} where it holds no JSON object). Raises OSError / ValueError."""
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _disk() -> dict:
    global _DISK
    if _DISK is None:
        try:
            _DISK = _read(cache_file())
        except FileNotFoundError:
            _DISK = {}
        except (OSError, ValueError) as err:    # unreadable or not JSON: ignored, rewritten on the next choice
            _warn_once("cannot read", err)
            _DISK = {}
    return _DISK


def _store(entry: str, record: dict) -> None:
    """Add one entry to the cache file: read, merge, write a temporary file, rename (a concurrent
    writer loses at most its own entry, never the file)."""
    path = cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            data = _read(path)
        except (OSError, ValueError):
            data = {}
        data[entry] = record
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".choices-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:       # no half-written temporary file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        _warn_once("cannot write", err)


class ShapeChoice:
    """The choice of one op direction: ``choose(key, trial)`` returns "triton" or "cublas"."""

    def __init__(self, name: str, default: Callable[[tuple], str]):
        self.name = name
        self.default = default
        self._memory: dict[tuple, str] = {}       # measured or stored choices
        self._untimed: dict[tuple, str] = {}      # where nothing could be timed: stored or default
        self.trials = 0             # shapes timed by this process (tests read it)

    def _entry(self, key: tuple) -> str:
        return f"{_machine()}|{self.name}|{key!r}"

    def _stored(self, key: tuple) -> str | None:
        with _LOCK:
            stored = _disk().get(self._entry(key))
        return stored["way"] if isinstance(stored, dict) and stored.get("way") in WAYS else None

    def choose(self, key: tuple, trial: Callable[[str], None]) -> str:
        """The forced way, else this shape's remembered choice, else a new one (timed where possible).
        On the hot path: one environment read and one dict hit."""
        way = forced() or self._memory.get(key)
        return way if way is not None else self._choose(key, trial)

    def _choose(self, key: tuple, trial: Callable[[str], None]) -> str:
        if not measurable():        # a later eager call on a GPU may time it; without a GPU none will
            way = self._untimed.get(key)
            if way is None:
                way = self._untimed[key] = self._stored(key) or self.default(key)
            if not _has_gpu():
                self._memory[key] = way
            return way
        stored = self._stored(key)
        if stored is not None:
            self._memory[key] = stored
            return stored
        times = {w: time_us(lambda w=w: trial(w)) for w in WAYS}
        way = min(WAYS, key=lambda w: times[w])
        self.trials += 1
        self._memory[key] = way
        entry = self._entry(key)
        with _LOCK:
            _disk()[entry] = {"way": way, "us": {w: round(t, 2) for w, t in times.items()}}
            _store(entry, _disk()[entry])
        return way
