"""Triton kernels of the fused low-rank linear

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ        x (T, K), W (N, K), A (r, K), B (N, r), g (r,)

Forward, two launches:
  1. ``_down_kernel``  u = drop(x) Aᵀ (T, r) in fp32: one pass over x; u is what backward keeps.
  2. ``gemm``          y = x Wᵀ + b + (s u ⊙ g) Bᵀ (triton/gemm.py): the rank-r product starts the
                       GEMM's accumulator tile, no T×N branch output.
Backward, two launches and up to two ordered sums (each only when a grad it makes is needed):
  3. ``_dy_kernel``    one pass over dy: v = dy B (T, r) (one fp32 partial per column block of dy,
                       summed in order when there are several), grad_B = s dyᵀ (u ⊙ g) (N, r) and
                       grad_b = Σ_t dy.
  4. ``gemm``          dx = dy W + keep ⊙ s ((v ⊙ g) A) / (1 - p), the mask regenerated, and in its
                       epilogue grad_A = s (v ⊙ g)ᵀ drop(x) over the x tile that dx's tile covers
                       (the same mask; x read once) and grad_g = s Σ_t u ⊙ v.
  5. ``_grad_a_kernel`` grad_A and / or grad_g when the dx GEMM does not make them (x frozen, or
                       dx on the cuBLAS way).
The dense products of 2 and 4 may instead run on cuBLAS, added with beta = 1 into what a K = 0
pass of the GEMM core wrote (the rank-r term, the bias): chosen per shape by timing both on a GPU
(triton/choice.py).
A, B and g come in their own (master, usually fp32) dtype and are rounded to x's dtype in
registers; grads are accumulated and returned in fp32: no cast kernel on either side.

Deterministic, without atomics or memsets: a grad reduced over tokens is written by one program
per token split into its split's row of a workspace laid out as the op's packed grads
(ops/lowrank_linear.py grad_layout), and triton/partials.py adds the rows in order. The rank is
zero-padded to R_PAD (a power of two >= 16) inside the kernels only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    cdiv,
    device_index,
    dropout_keep_tile,
    input_precision,
    mma,
    next_pow2,
    num_sms,
    rank_pad,
    split_rows,
    upcast_dot,
)
from ._launcher import PlanCache, aligned, launch, tensor_key
from .choice import ShapeChoice
from .gemm import gemm, row_splits
from .partials import sum_partials

# ---------------------------------------------------------------------------------------------
# 1. u = drop(x) Aᵀ
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold"])
def _down_kernel(x_ptr, a_ptr, u_ptr, T, K, R,
                 stride_xt, stride_xk, stride_ar, stride_ak,
                 seed_ptr, threshold, keep_scale,
                 HAS_DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = offs_t.to(tl.int64)
    t_mask = offs_t < T
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k64 = offs_k.to(tl.int64)   # int64 address products: K·stride may pass 2**31
        k_mask = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k64[None, :] * stride_xk,
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep_tile(seed, rows, k0, K, threshold, BLOCK_T, BLOCK_K), x, 0.0)
        # Aᵀ tile (BLOCK_K, R_PAD), A in its own (master) dtype, rounded to x's here: no cast kernel
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + k64[:, None] * stride_ak,
                      mask=r_mask[None, :] & k_mask[:, None], other=0.0).to(x_ptr.dtype.element_ty)
        acc = mma(x, a_t, acc, UPCAST, INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(u_ptr + rows[:, None] * R + offs_r[None, :], acc, mask=t_mask[:, None] & r_mask[None, :])


def lowrank_down(x: torch.Tensor, a: torch.Tensor, dropout_p: float, seed: torch.Tensor | None,
                 threshold: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """u = drop(x) Aᵀ for x (T, K), A (r, K) in any float dtype; returns u (T, r) in fp32 (``out``
    if given: a contiguous fp32 (T, r) tensor).
    ``seed``: the 0-dim int64 tensor on x's device the kernel reads (None without dropout).
    One program per row block, each over all of K: every u element has one writer (no zeroed
    buffer, no atomics, no cast kernel); r is small, so a program's K loop is short."""
    T, K = x.shape
    R = a.shape[0]
    if INTERPRET:
        block_t, block_k, warps = 32, 32, 4
    else:
        # enough row blocks to fill the GPU where T allows; never more rows than needed
        block_t = 64 if T >= 64 * num_sms(device_index(x)) else 32 if T >= 16 * num_sms(device_index(x)) else 16
        block_k, warps = 128, 4
    u = out if out is not None else torch.empty((T, R), device=x.device, dtype=torch.float32)
    launch(_down_kernel)[(cdiv(T, block_t),)](
        x, a, u, T, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        seed, threshold, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0, R_PAD=rank_pad(R), BLOCK_T=block_t, BLOCK_K=block_k,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)
    return u


# ---------------------------------------------------------------------------------------------
# 3. one pass over dy: v = dy B (T, r), grad_B = s dyᵀ (u ⊙ g) (N, r), grad_b = Σ_t dy
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dy_kernel(dy_ptr, b_ptr, u_ptr, g_ptr, v_ptr, ws_ptr,
               T, N, R, rows_per_split, stride_split, gb_at, db_at,
               stride_dyt, stride_dyn, stride_bn, stride_br, stride_ut, stride_ur,
               scale,
               HAS_G: tl.constexpr, NEED_GB: tl.constexpr, NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    n_mask = offs_n < N
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    b_tile = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(dy_ptr.dtype.element_ty)  # (BLOCK_N, R_PAD)
    p_acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)      # P = dyᵀ u over this split's rows
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_block = v_ptr + pid_n.to(tl.int64) * T * R               # this column block's partial of v
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        t_mask = offs_t < t_end
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyn,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)             # (BLOCK_T, BLOCK_N)
        v_part = mma(dy, b_tile, tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32), UPCAST, INPUT_PRECISION)
        v_mask = t_mask[:, None] & r_mask[None, :]
        tl.store(v_block + rows[:, None] * R + offs_r[None, :], v_part, mask=v_mask)
        if NEED_GB:
            u = tl.load(u_ptr + rows[:, None] * stride_ut + offs_r[None, :] * stride_ur, mask=v_mask, other=0.0)
            p_acc = mma(tl.trans(dy), u.to(dy_ptr.dtype.element_ty), p_acc, UPCAST, INPUT_PRECISION)
        if NEED_DB:
            db_acc += tl.sum(dy.to(tl.float32), axis=0)
    split_row = pid_s.to(tl.int64) * stride_split      # every split writes its row, an empty one zeros
    if NEED_GB:   # grad_B = s P ⊙ g
        gs = tl.full((R_PAD,), scale, tl.float32)
        if HAS_G:
            gs = gs * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        tl.store(ws_ptr + split_row + gb_at + cols[:, None] * R + offs_r[None, :], p_acc * gs[None, :],
                 mask=n_mask[:, None] & r_mask[None, :])
    if NEED_DB:
        tl.store(ws_ptr + split_row + db_at + offs_n, db_acc, mask=n_mask)


def dy_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_N, warps) of the dy pass; v has one fp32 partial per column block. fp32
    tiles are half as wide: 64×128 spilled 4 KB per thread on sm_90 (Triton 3.8, 2026-11-24)."""
    if INTERPRET:
        return 32, 32, 4
    return (64, 64, 4) if dtype == torch.float32 else (64, 128, 4)


def lowrank_dy(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, g: torch.Tensor | None, scale: float,
               v: torch.Tensor, ws: torch.Tensor, b_at: int | None, bias_at: int | None, splits: int) -> None:
    """Writes v = dy B, and the ``splits`` token splits' partial sums of grad_B = s dyᵀ (u ⊙ g)
    (N·r each, at element ``b_at`` of each row of the contiguous fp32 (splits, L) workspace ``ws``)
    and grad_bias (N each, at ``bias_at``), where those are not None. v: fp32 (column blocks, T, r)
    partials, one per column block of dy (with one block: v itself), every element written."""
    T, N = dy.shape
    R = b.shape[1]
    block_t, block_n, warps = dy_blocks(dy.dtype)
    rows_per_split = split_rows(T, splits, block_t)
    launch(_dy_kernel)[(cdiv(N, block_n), splits)](
        dy, b, u, g, v, ws, T, N, R, rows_per_split, ws.stride(0), b_at or 0, bias_at or 0,
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1),
        scale,
        HAS_G=g is not None, NEED_GB=b_at is not None, NEED_DB=bias_at is not None, R_PAD=rank_pad(R),
        BLOCK_T=block_t, BLOCK_N=block_n,
        UPCAST=upcast_dot(dy.dtype), INPUT_PRECISION=input_precision(dy.dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# 5. grad_A = s (v ⊙ g)ᵀ drop(x) and grad_g = s Σ_t u ⊙ v without the dx GEMM
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold"])
def _grad_a_kernel(x_ptr, v_ptr, g_ptr, u_ptr, ws_ptr, T, K, R, rows_per_split, stride_split, ga_at, gg_at,
                   stride_xt, stride_xk, scale, seed_ptr, threshold, keep_scale,
                   HAS_G: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_GA: tl.constexpr, NEED_GG: tl.constexpr,
                   R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k64 = offs_k.to(tl.int64)   # int64 address products: K·stride may pass 2**31
    k_mask = offs_k < K
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    gs = tl.full((R_PAD,), scale, tl.float32)
    if HAS_G:
        gs = gs * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    gg_acc = tl.zeros((R_PAD,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        t_mask = offs_t < t_end
        v = tl.load(v_ptr + rows[:, None] * R + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        if NEED_GA:
            x = tl.load(x_ptr + rows[:, None] * stride_xt + k64[None, :] * stride_xk,
                        mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(dropout_keep_tile(seed, rows, pid_k * BLOCK_K, K, threshold, BLOCK_T, BLOCK_K), x, 0.0)
            vg = (v * gs[None, :]).to(x_ptr.dtype.element_ty)
            acc = mma(tl.trans(vg), x, acc, UPCAST, INPUT_PRECISION)
        if NEED_GG:
            if pid_k == 0:
                u = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :],
                            other=0.0)
                gg_acc += tl.sum(u * v, axis=0)
    split_row = pid_s.to(tl.int64) * stride_split      # every split writes its row, an empty one zeros
    if NEED_GA:
        if HAS_DROPOUT:
            acc = acc * keep_scale
        tl.store(ws_ptr + split_row + ga_at + offs_r[:, None] * K + offs_k[None, :], acc,
                 mask=r_mask[:, None] & k_mask[None, :])
    if NEED_GG:
        if pid_k == 0:
            tl.store(ws_ptr + split_row + gg_at + offs_r, gg_acc * scale, mask=r_mask)


def lowrank_grad_a(x: torch.Tensor | None, v: torch.Tensor, g: torch.Tensor | None, u: torch.Tensor, scale: float,
                   dropout_p: float, seed: torch.Tensor | None, threshold: int, ws: torch.Tensor,
                   a_at: int | None, g_at: int | None, K: int, splits: int) -> None:
    """The ``splits`` token splits' partial sums of grad_A = s (v ⊙ g)ᵀ drop(x) (r·K each, at
    element ``a_at`` of each row of the contiguous fp32 (splits, L) workspace ``ws``) and
    grad_g = s Σ_t u ⊙ v (r each, at ``g_at``), where those are not None. v, u: the fp32 (T, r)
    of the dy pass and the forward."""
    T, R = v.shape
    if INTERPRET:
        block_t, block_k, warps = 32, 32, 4
    else:
        block_t, block_k, warps = 64, 128, 4
    rows_per_split = split_rows(T, splits, block_t)
    dtype = x.dtype if a_at is not None else v.dtype
    launch(_grad_a_kernel)[(cdiv(K, block_k) if a_at is not None else 1, splits)](
        x if a_at is not None else None, v, g, u, ws, T, K, R, rows_per_split, ws.stride(0), a_at or 0, g_at or 0,
        x.stride(0) if a_at is not None else 0, x.stride(1) if a_at is not None else 0, scale,
        seed, threshold, 1.0 / (1.0 - dropout_p),
        HAS_G=g is not None, HAS_DROPOUT=dropout_p > 0, NEED_GA=a_at is not None, NEED_GG=g_at is not None,
        R_PAD=rank_pad(R), BLOCK_T=block_t, BLOCK_K=block_k,
        UPCAST=upcast_dot(dtype), INPUT_PRECISION=input_precision(dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# the op's two directions: the launches above, recorded once per launch signature and replayed
# (triton/_launcher.py PlanCache): a call with a known key runs no launcher Python
# ---------------------------------------------------------------------------------------------

_FORWARD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()
# the dense product of y and of dx: the fused GEMM core, or cuBLAS adding it (beta = 1) into the
# rank-r term a K = 0 pass of the core wrote first (triton/choice.py: timed per shape on a GPU)
_FORWARD_CHOICE = ShapeChoice("lowrank_linear forward", default=lambda key: "triton")
_DX_CHOICE = ShapeChoice("lowrank_linear dx", default=lambda key: "triton")


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
            g: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor | None,
            threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches 1 and 2: (y (T, N) in x's dtype, u (T, r) fp32) for x (T, K)."""
    T, K = x.shape
    N, R = weight.shape[0], a.shape[0]
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    u = torch.empty((T, R), device=x.device, dtype=torch.float32)
    w_t, b_t = weight.t(), b.t()
    env = (x, w_t, bias, a, b_t, g, seed, u, y)

    def key():
        return (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(a), tensor_key(b), tensor_key(g),
                aligned(seed, u, y), scale, dropout_p, threshold, input_precision(x.dtype))

    def run(way: str) -> None:
        def body():
            lowrank_down(x, a, dropout_p, seed, threshold, out=u)
            dense = way == "triton"
            gemm(x if dense else None, w_t if dense else None, y, bias=bias, low=u, right=b_t, g=g, scale=scale)
        _FORWARD_PLANS.run(lambda: key() + (way,), env, body)
        if way == "cublas":     # outside the plan: a plan replays Triton launches only
            y.addmm_(x, w_t)
    run(_FORWARD_CHOICE.choose((next_pow2(T), N, K, R, x.dtype, bias is not None), run))
    return y, u


def backward(dy: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, a: torch.Tensor,
             b: torch.Tensor, g: torch.Tensor | None, u: torch.Tensor, scale: float, dropout_p: float,
             seed: torch.Tensor | None, threshold: int, need_dx: bool, layout: dict,
             total: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Launches 3-5 and the ordered sums: (dx (T, K) in dy's dtype or None, an fp32 vector of
    ``total`` elements holding the reduced grads at ``layout`` = {name: (offset, shape)} for the
    names a, b, bias, g asked for).

    Token splits: the dy pass, and the dx GEMM (or launch 5) split T into the same number S of
    splits; each writes its splits' partial sums into row s of one (S, total) workspace laid out
    as the grads, and one ordered sum finishes them all (S = 1: the kernels write the grads
    themselves). v's partials over dy's column blocks are summed first (one block: none)."""
    T, R = u.shape
    N, K = dy.shape[1], a.shape[1]
    dev = dy.device
    at = {name: off for name, (off, _) in layout.items()}     # where each grad sits in a row
    splits = row_splits(T, K, dy.dtype, dy)
    out = torch.empty((total,), device=dev, dtype=torch.float32)
    part = out.view(1, total) if splits == 1 else torch.empty((splits, total), device=dev, dtype=torch.float32)
    v = torch.empty((T, R), device=dev, dtype=torch.float32)
    n_blocks = cdiv(N, dy_blocks(dy.dtype)[1])
    vp = torch.empty((n_blocks, T, R), device=dev, dtype=torch.float32) if n_blocks > 1 else None
    dx = torch.empty((T, K), device=dev, dtype=dy.dtype) if need_dx else None
    env = (dy, x, weight, a, b, g, u, seed, v, vp, out, part, dx)

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(weight), tensor_key(a), tensor_key(b), tensor_key(g),
                tensor_key(u), aligned(seed, out, part, vp, dx), tuple(layout.items()), scale, dropout_p, threshold,
                input_precision(dy.dtype))

    def run(way: str) -> None:
        # grad_A (and grad_g) in the fused dx GEMM's epilogue; on the cuBLAS way (and with x frozen)
        # from launch 5 (in the K = 0 pass, the mask's two evaluations merge and spill 0.3-0.5 KB)
        gemm_ga = need_dx and "a" in at and way == "triton"
        kernel_ga = "a" in at and not gemm_ga
        kernel_gg = "g" in at and not gemm_ga

        def body():
            lowrank_dy(dy, b, u, g, scale, vp if vp is not None else v, part, at.get("b"), at.get("bias"), splits)
            if vp is not None:
                sum_partials(vp.view(n_blocks, T * R), v)
            if need_dx:
                dense = way == "triton"
                gemm(dy if dense else None, weight if dense else None, dx, low=v, right=a, g=g, scale=scale,
                     dropout_p=dropout_p, seed=seed, threshold=threshold, x=x if gemm_ga else None,
                     grads=part if gemm_ga else None, grad_a_at=at.get("a", 0),
                     u=u if gemm_ga and "g" in at else None, grad_g_at=at.get("g", 0), splits=splits)
            if kernel_ga or kernel_gg:
                lowrank_grad_a(x, v, g, u, scale, dropout_p, seed, threshold, part,
                               at.get("a") if kernel_ga else None, at.get("g") if kernel_gg else None, K, splits)
            if splits > 1 and total:
                sum_partials(part, out)
        _BACKWARD_PLANS.run(lambda: key() + (way,), env, body)
        if way == "cublas":     # outside the plan: a plan replays Triton launches only
            dx.addmm_(dy, weight)
    run(_DX_CHOICE.choose((next_pow2(T), N, K, R, dy.dtype, dropout_p > 0, "a" in at), run) if need_dx
        else "triton")
    return dx, out
