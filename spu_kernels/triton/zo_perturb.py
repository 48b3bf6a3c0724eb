"""Triton kernel of the seeded MeZO perturbation t ← α·t + β·z (spec: ops/zo_perturb.py), for many
tensors in one launch: a device-side table gives each program its tensor (pointer, numel, global
base offset) and the chunk of that tensor it sweeps. z is generated in registers, never stored."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TL_DTYPE, block_layout

# elements per program (a multiple of BLOCK): small under the interpreter, where programs are slow
BLOCK = 256 if INTERPRET else 1024
CHUNK = 4 * BLOCK if INTERPRET else 16 * BLOCK


@triton.jit(do_not_specialize=["seed"])
def _zo_axpby_kernel(ptrs, numels, bases, blk_tensor, blk_start, seed, alpha, beta,
                     STREAM: tl.constexpr, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)                         # this program's first element in tensor t
    p = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    n = tl.load(numels + t)
    base = tl.load(bases + t)                                # tensor t's global element offset
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < n
        e = base + offs
        c0 = (e & 0xFFFFFFFF).to(tl.uint32)
        c1 = (e >> 32).to(tl.uint32)
        w0, w1, _, _ = tl.philox(seed, c0, c1, tl.full(c0.shape, STREAM, tl.uint32), tl.zeros_like(c0))
        u1 = (w0.to(tl.float32) + 0.5) * 2.3283064365386963e-10      # 2**-32
        u2 = w1.to(tl.float32) * 2.3283064365386963e-10
        z = tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        x = tl.load(p + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(p + offs, (x * alpha + z * beta).to(DTYPE), mask=m)


@functools.lru_cache(maxsize=16)
def _table(ptrs: tuple[int, ...], numels: tuple[int, ...], bases: tuple[int, ...], device: torch.device):
    """(ptrs, numels, bases, blk_tensor, blk_start) as device tensors for one dtype group; cached,
    since an optimiser sweeps the same tensors every step (the key holds every value it encodes)."""
    blk_tensor, blk_start, n_prog = block_layout(numels, CHUNK)
    host = [torch.tensor(ptrs, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64),
            torch.tensor(bases, dtype=torch.int64), blk_tensor, blk_start]
    return [h.to(device) for h in host], n_prog


def zo_axpby_multi(tensors, bases, seed: int, alpha: float, beta: float, stream: int) -> None:
    """One launch per dtype: every tensor t ← α t + β z (tensors contiguous, on one device); z from
    Philox stream ``stream`` (the spec's, ops/zo_perturb.py)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() > 0:
            groups.setdefault(t.dtype, []).append(i)
    device = tensors[0].device
    for dtype, idx in groups.items():
        (ptrs, numels, bases_t, blk_tensor, blk_start), n_prog = _table(
            tuple(tensors[i].data_ptr() for i in idx), tuple(tensors[i].numel() for i in idx),
            tuple(bases[i] for i in idx), device)
        _zo_axpby_kernel[(n_prog,)](ptrs, numels, bases_t, blk_tensor, blk_start, seed, alpha, beta,
                                    STREAM=stream, DTYPE=TL_DTYPE[dtype], CHUNK=CHUNK, BLOCK=BLOCK)
