"""The seeded perturbation of zeroth-order optimisers (MeZO), over any set of tensors at once:

    t ← α·t + β·z        for every tensor t,   z ~ N(0, 1) elementwise

z is never stored: it is regenerated from (seed, element index) whenever it is needed, so a MeZO
step (θ+εz, θ−2εz, restore-and-update) needs no memory beyond the parameters themselves.

Spec of z (every backend computes exactly this, up to the last ulp of log / cos / sqrt): element e
— its global index, i.e. its tensor's base offset in the parameter list plus its row-major index —
takes the first two words (w0, w1) of Philox4x32-10 with key = seed and counter
(e_lo, e_hi, ZO_STREAM, 0) (ops/dropout_rng.py, the dropout generator on another stream), and

    u1 = (fp32(w0) + 0.5) · 2⁻³²       in (0, 1]
    u2 = fp32(w1) · 2⁻³²               in [0, 1]
    z  = sqrt(−2 ln u1) · cos(2π u2)   (Box–Muller, fp32)

The update is computed in fp32 and rounded once to the tensor's dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..backends import resolve_backend, triton_kernels
from ._checks import FLOAT_DTYPES, check_seed
from ._library import define_inplace_ops
from .dropout_rng import philox4x32_words

OP_NAME = "zo_axpby"
ZO_STREAM = 0x4D655A4F          # "MeZO": keeps z independent of dropout masks drawn from the same seed
_TWO_M32 = 2.0 ** -32
_TWO_PI = 2.0 * math.pi
_CHUNK = 1 << 20                # the torch backend generates z in chunks: bounded extra memory
Z_MAX = 6.8                     # |z| <= sqrt(−2 ln 2⁻³³) = 6.764: u1 >= 2⁻³³


def zo_normal(seed: int, start: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The reference z (fp32, shape (numel,)) for global element indices start .. start + numel - 1."""
    e = torch.arange(start, start + numel, device=device, dtype=torch.int64)
    w0, w1, _, _ = philox4x32_words(seed, e, ZO_STREAM)
    u1 = (w0.to(torch.float32) + 0.5) * _TWO_M32
    u2 = w1.to(torch.float32) * _TWO_M32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


def base_offsets(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Each tensor's first global element index: the numels of the tensors before it."""
    out, total = [], 0
    for t in tensors:
        out.append(total)
        total += t.numel()
    return out


def _torch_axpby_(tensors, bases, seed, alpha, beta):
    for t, base in zip(tensors, bases):
        flat = t.view(-1)
        for lo in range(0, flat.numel(), _CHUNK):
            part = flat[lo:lo + _CHUNK]
            z = zo_normal(seed, base + lo, part.numel(), t.device)
            part.copy_((part.float() * alpha + z * beta).to(t.dtype))


def zo_axpby_(tensors: Sequence[torch.Tensor], seed: int, alpha: float, beta: float,
              bases: Sequence[int] | None = None, backend: str | None = None) -> None:
    """In place, for every tensor t: t ← α·t + β·z with z from (seed, global element index).

    Args:
        tensors: floating tensors (fp32 / fp16 / bf16) on one device, each contiguous; any mix of
            dtypes and sizes (the triton backend updates them all in one launch per dtype).
        seed: the step's seed (a non-negative int below 2**63).
        bases: each tensor's global base offset (default: ``base_offsets(tensors)``), so that z of a
            tensor does not depend on which other tensors are updated with it.
        backend: "torch" or "triton"; default as in spu_kernels.backends.
    """
    tensors = list(tensors)
    if not tensors:
        return
    bases = list(base_offsets(tensors) if bases is None else bases)
    if len(bases) != len(tensors):
        raise ValueError(f"{OP_NAME}: got {len(bases)} base offsets for {len(tensors)} tensors")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP_NAME}: tensor {i} must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{OP_NAME}: tensor {i} is on {t.device} but tensor 0 is on {device}; "
                             "call once per device")
        if not t.is_contiguous():
            raise ValueError(f"{OP_NAME}: tensor {i} is not contiguous; update a contiguous copy and copy it "
                             "back (spu_kernels.MeZO does this for its parameters)")
    seed = check_seed(OP_NAME, seed)
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(v):
            raise ValueError(f"{OP_NAME}: {name} must be finite, got {v!r}")
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, device, backend)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            ZO_AXPBY[chosen](tensors, bases, seed, float(alpha), float(beta))
        else:
            _axpby(chosen, tensors, bases, seed, float(alpha), float(beta))


def _axpby(backend, tensors, bases, seed, alpha, beta):
    if backend == "torch":
        _torch_axpby_(tensors, bases, seed, alpha, beta)
    else:
        triton_kernels("zo_perturb").zo_axpby_multi(tensors, bases, seed, alpha, beta, ZO_STREAM)


IMPLEMENTED = ("torch", "triton")
# torch.ops.spu_kernels.zo_axpby_<backend>: the op as torch.compile sees it (ops/_library.py)
ZO_AXPBY = define_inplace_ops(OP_NAME, IMPLEMENTED, "(Tensor(a!)[] tensors, int[] bases, int seed, float alpha, "
                              "float beta) -> ()", _axpby, mutates=("tensors",))
