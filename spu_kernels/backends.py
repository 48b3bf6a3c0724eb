"""Which implementation of an op runs: ``torch`` (the reference, anywhere), ``triton`` or ``cuda``.

Selection, first match wins:
  1. the op's ``backend=`` argument,
  2. ``spu_kernels.use_backend(name)`` (a context manager; ``use_backend(None)`` clears it),
  3. the environment variable ``SPU_BACKEND=torch|triton|cuda``,
  4. the default for the tensors' device: on CUDA the first one available of triton, cuda, torch
     (the cuda backend comes after triton until a GPU run has measured and verified it: see
     benchmarks/RESULTS.md), on any other device ``torch``.
A backend that is asked for (1-3) and cannot run is an error that says why; there is no
silent fallback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("torch", "triton", "cuda")
_DEFAULT_ORDER_CUDA = ("triton", "cuda", "torch")

_local = threading.local()


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def triton_kernels(op_module: str):
    """``spu_kernels.triton.<op_module>``: the triton backend's launchers of one op, imported on first
    use (importing Triton kernels costs start-up time an unused backend need not pay) and cached, so
    that the ops' eager path pays a dict look-up per call, not an import statement."""
    return importlib.import_module(f"spu_kernels.triton.{op_module}")


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else the error (cached: this sits on every op call's path)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def _triton_reason() -> str | None:
    """None when Triton can run here, else why not."""
    err = _import_error("triton")
    if err is not None:
        return f"triton is not importable ({err}); `pip install triton`"
    if triton_interpret() or torch.cuda.is_available():
        return None
    return ("no CUDA GPU is visible and TRITON_INTERPRET=1 is not set "
            "(set it before importing spu_kernels to run Triton kernels on the CPU, slowly)")


def _cuda_reason() -> str | None:
    """None when spu_kernels._C loads (prebuilt, or SPU_JIT=1) and a GPU is visible, else why not."""
    from ._extension import extension_error
    err = extension_error()
    if err is not None:
        return err
    if not torch.cuda.is_available():
        return "spu_kernels._C is built but no CUDA GPU is visible"
    return None


def backend_status() -> dict[str, str]:
    """Each backend's state on this machine: ``"available"`` or the reason it is not."""
    out = {"torch": "available"}
    for name, fn in (("triton", _triton_reason), ("cuda", _cuda_reason)):
        reason = fn()
        out[name] = "available" if reason is None else reason
    return out


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, e.g. ``['torch', 'triton']``."""
    return [name for name, state in backend_status().items() if state == "available"]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for the ops called inside the ``with`` block (this thread only)."""
    if name is not None:
        _check_name(name, "use_backend")
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def requested_backend() -> tuple[str | None, str]:
    """The backend asked for by use_backend() or SPU_BACKEND (or None), and where it came from."""
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced, "spu_kernels.use_backend()"
    env = os.environ.get("SPU_BACKEND", "").strip().lower()
    if env:
        _check_name(env, "SPU_BACKEND")
        return env, "SPU_BACKEND"
    return None, ""


def resolve_backend(op_name: str, implemented: tuple[str, ...], device: torch.device,
                    backend: str | None = None) -> str:
    """Pick the backend for one call of ``op_name`` on tensors of ``device``.

    ``implemented`` lists the backends this op has. Raises ValueError/RuntimeError with the
    reason when the requested backend cannot run here.
    """
    source = "backend="
    if backend is None:
        backend, source = requested_backend()
    else:
        _check_name(backend, f"{op_name}(backend=...)")
    if backend is None:
        if device.type != "cuda":
            return "torch"
        for name in _DEFAULT_ORDER_CUDA:
            if name in implemented and _reason(name, device) is None:
                return name
        return "torch"
    if backend not in implemented:
        raise RuntimeError(f"{op_name}: backend {backend!r} (from {source}) is not implemented for this op; "
                           f"it has {', '.join(implemented)}")
    reason = _reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op_name}: backend {backend!r} (from {source}) cannot run on {device.type} "
                           f"tensors: {reason}")
    return backend


def _reason(name: str, device: torch.device) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        reason = _triton_reason()
        if reason is None and device.type != "cuda":
            if device.type != "cpu":
                reason = f"Triton does not run on {device.type} tensors"
            elif not triton_interpret():
                reason = ("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 (set before importing "
                          "spu_kernels) to run on CPU tensors")
        return reason
    if name == "cuda":
        reason = _cuda_reason()
        if reason is None and device.type != "cuda":
            reason = "the cuda backend needs CUDA tensors"
        return reason
    raise AssertionError(name)
