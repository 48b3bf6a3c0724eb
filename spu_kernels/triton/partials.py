"""Deterministic reductions over token splits: a kernel that reduces over tokens in ``S`` programs
writes each program's fp32 partial sums into one row of a workspace ``ws`` (S, L), and
``sum_partials`` adds the rows in order 0, 1, …, S-1 and writes the totals in the outputs' own
dtypes. So the same inputs give bitwise-identical grads, no memset is needed (every row is
written), and no cast kernel follows (an fp32 master gets fp32, a bf16 one bf16).

A row may carry two grads side by side, ``ws[s] = [grad_1 partial (L1) | grad_2 partial]``:
one launch then finishes both (KronA's grad_A and grad_B, (IA)³'s grad_l and grad_bias).
With S = 1 the reducing kernel writes the outputs itself and this launch is skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv
from ._launcher import launch


@triton.jit
def _sum_partials_kernel(ws_ptr, out1_ptr, out2_ptr, S, L, L1, TWO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(0, S):      # a fixed order: the sum does not depend on which program finished first
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += L              # pointer arithmetic is 64-bit: S·L may pass 2**31
    if TWO:
        tl.store(out1_ptr + offs, acc.to(out1_ptr.dtype.element_ty), mask=offs < L1)
        tl.store(out2_ptr + (offs - L1), acc.to(out2_ptr.dtype.element_ty), mask=mask & (offs >= L1))
    else:
        tl.store(out1_ptr + offs, acc.to(out1_ptr.dtype.element_ty), mask=mask)


def sum_partials(ws: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor | None = None) -> None:
    """out1 (and out2) = Σ_s ws[s], in row order. ws: contiguous fp32 (S, L) with
    L = out1.numel() (+ out2.numel(): out2's part follows out1's); outputs contiguous, any float dtype."""
    S, L = ws.shape
    l1 = out1.numel()
    if L != l1 + (out2.numel() if out2 is not None else 0):
        raise ValueError(f"sum_partials: rows of {L} do not hold outputs of {l1} and "
                         f"{out2.numel() if out2 is not None else 0} elements")
    block = 128 if INTERPRET else 512
    launch(_sum_partials_kernel)[(cdiv(L, block),)](
        ws, out1, out2, S, L, l1, TWO=out2 is not None, BLOCK=block, num_warps=4)
