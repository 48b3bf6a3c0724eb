"""Triton kernel of the masked AdamW step (spec: ops/masked_adamw.py) over many tensors in one
launch: a device-side table gives each program its tensor (pointers of the parameter, its
gradient, its index list and its two state vectors; the index count) and the chunk of the index
list it sweeps. Each program gathers g and p at its indices, updates m and v in place and
scatters p back; nothing else is read or written."""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, TL_DTYPE, block_layout

# indices per program (a multiple of BLOCK): small under the interpreter, where programs are slow
BLOCK = 128 if INTERPRET else 1024
CHUNK = 2 * BLOCK if INTERPRET else 4 * BLOCK


@triton.jit
def _masked_adamw_kernel(table, counts, blk_tensor, blk_start, n_tensors, decay, beta1, beta2, eps, step_size,
                         bc2_sqrt, DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)                         # this program's first index of tensor t
    p = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g = tl.load(table + n_tensors + t).to(tl.pointer_type(DTYPE))
    ix = tl.load(table + 2 * n_tensors + t).to(tl.pointer_type(tl.int64))
    m = tl.load(table + 3 * n_tensors + t).to(tl.pointer_type(tl.float32))
    v = tl.load(table + 4 * n_tensors + t).to(tl.pointer_type(tl.float32))
    k = tl.load(counts + t)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK).to(tl.int64)
        msk = offs < k
        e = tl.load(ix + offs, mask=msk, other=0)
        gr = tl.load(g + e, mask=msk, other=0.0).to(tl.float32)
        x = tl.load(p + e, mask=msk, other=0.0).to(tl.float32) * decay
        ma = tl.load(m + offs, mask=msk, other=0.0)
        va = tl.load(v + offs, mask=msk, other=0.0)
        ma = ma + (1.0 - beta1) * (gr - ma)
        va = beta2 * va + (1.0 - beta2) * gr * gr
        x = x - step_size * ma / (tl.sqrt_rn(va) / bc2_sqrt + eps)
        tl.store(m + offs, ma, mask=msk)
        tl.store(v + offs, va, mask=msk)
        tl.store(p + e, x.to(DTYPE), mask=msk)


@functools.lru_cache(maxsize=16)
def _table(ptrs: tuple[tuple[int, ...], ...], counts: tuple[int, ...], device: torch.device):
    """(pointer table (5 x T int64: params, grads, indices, exp_avgs, exp_avg_sqs), counts,
    blk_tensor, blk_start) as device tensors for one dtype group; cached, since an optimiser
    sweeps the same tensors every step (the key holds every value it encodes)."""
    blk_tensor, blk_start, n_prog = block_layout(counts, CHUNK)
    host = [torch.tensor(ptrs, dtype=torch.int64).reshape(-1), torch.tensor(counts, dtype=torch.int64),
            blk_tensor, blk_start]
    return [h.to(device) for h in host], n_prog


def masked_adamw_multi(params, grads, indices, exp_avgs, exp_avg_sqs, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, step: int) -> None:
    """One launch per parameter dtype over every tensor with a non-empty index list."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, idx in enumerate(indices):
        if idx.numel() > 0:
            groups.setdefault(params[i].dtype, []).append(i)
    device = params[0].device
    step_size, bc2_sqrt = lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)
    for dtype, sel in groups.items():
        ptrs = tuple(tuple(ts[i].data_ptr() for i in sel) for ts in (params, grads, indices, exp_avgs, exp_avg_sqs))
        (table, counts, blk_tensor, blk_start), n_prog = _table(ptrs, tuple(indices[i].numel() for i in sel), device)
        _masked_adamw_kernel[(n_prog,)](table, counts, blk_tensor, blk_start, len(sel), 1.0 - lr * weight_decay,
                                        beta1, beta2, eps, step_size, bc2_sqrt, DTYPE=TL_DTYPE[dtype], CHUNK=CHUNK,
                                        BLOCK=BLOCK)
