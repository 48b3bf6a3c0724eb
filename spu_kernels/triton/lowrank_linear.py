"""Triton kernels of the fused low-rank linear

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ        x (T, K), W (N, K), A (r, K), B (N, r), g (r,)

Forward, two launches:
  1. ``_down_kernel``          u = drop(x) Aᵀ (T, r) in fp32: one pass over x; u is what backward keeps.
  2. ``_gemm_lowrank_kernel``  y = x Wᵀ + b + (s u ⊙ g) Bᵀ: the rank-r product is added to the
                               GEMM's accumulator tile in its epilogue, no T×N branch output.
Backward, a memset and two launches (each only when a grad it makes is needed):
  0. one zero-filled fp32 workspace for every reduced result (ops/lowrank_linear.py packs them)
  3. ``_dy_kernel``            one pass over dy gives v = dy B (T, r), grad_B = s dyᵀ (u ⊙ g)
                               (N, r), grad_b = Σ_t dy and grad_g = s Σ_n B ⊙ (dyᵀ u) = s Σ_t u ⊙ v.
  4. ``_gemm_lowrank_kernel``  dx = dy W + keep ⊙ s ((v ⊙ g) A) / (1 - p), the mask regenerated,
                               and in its epilogue grad_A += s (v ⊙ g)ᵀ drop(x) over the x tile
                               that dx's tile covers (the same mask; x read once, no extra launch).
  5. ``_grad_a_kernel``        grad_A alone, when dx is not needed (x frozen): one pass over x.
A, B and g come in their own (master, usually fp32) dtype and are rounded to x's dtype in
registers; grads are accumulated and returned in fp32: no cast kernel on either side.

Reductions that cross programs (N blocks for v, T splits for grad_B / grad_b, both for grad_g in
3, T splits in 5) add fp32 partials atomically into the zeroed workspace; a single program per
output stores directly. The rank is zero-padded to R_PAD (a power of two >= 16) inside the
kernels only.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    cdiv,
    device_index,
    dropout_keep_tile,
    gemm_configs,
    gemm_tile,
    grouped_tile,
    input_precision,
    mma,
    next_pow2,
    num_sms,
    rank_pad,
    token_splits,
    upcast_dot,
)
from ._launcher import PlanCache, aligned, launch, tensor_key

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
        seed if seed is not None else u, threshold, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0, R_PAD=rank_pad(R), BLOCK_T=block_t, BLOCK_K=block_k,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)
    return u


# ---------------------------------------------------------------------------------------------
# 2 and 4. C = A_op B_op (+ bias) + keep ⊙ s ((L ⊙ g) Rm) [/ (1 - p)]
#   forward: A_op = x, B_op = Wᵀ, L = u, Rm = Bᵀ
#   dx:      A_op = dy, B_op = W, L = v, Rm = A, with the dropout mask of x's elements
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold"])
def _gemm_lowrank_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, rm_ptr, g_ptr, x_ptr, ga_ptr,
                         M, N, K, R, M_BUCKET,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                         stride_lm, stride_lr, stride_rmr, stride_rmn, stride_xm, stride_xn,
                         scale, seed_ptr, threshold, keep_scale,
                         HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         GRAD_A: tl.constexpr,
                         R_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = gemm_tile(a_ptr, b_ptr, a_ptr, rows, cols, m_mask, n_mask, K, stride_am, stride_ak, stride_bk, stride_bn,
                    False, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    # epilogue: the rank-r term, (BLOCK_M, R_PAD) @ (R_PAD, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    low = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                  mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    if HAS_G:
        low = low * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    low = (low * scale).to(c_ptr.dtype.element_ty)
    rm = tl.load(rm_ptr + offs_r[:, None] * stride_rmr + cols[None, :] * stride_rmn,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(c_ptr.dtype.element_ty)
    lr = mma(low, rm, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, INPUT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_tile(tl.load(seed_ptr), rows, pid_n * BLOCK_N, N, threshold, BLOCK_M, BLOCK_N)
        lr = tl.where(keep, lr * keep_scale, 0.0)
    acc += lr
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
    if GRAD_A:
        # dx's tile is x's tile: its share of grad_A = s (v ⊙ g)ᵀ drop(x), (R_PAD, BLOCK_N), added
        # atomically across row blocks into the zeroed fp32 (r, N) buffer; the keep mask is the one
        # just used for dx (no second regeneration, no separate pass over x)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(c_ptr.dtype.element_ty)
        if HAS_DROPOUT:     # a 0/1 multiply: an i1 mask in the dot operand's layout cannot go through shared memory
            xt = xt * keep.to(xt.dtype)
        # (L ⊙ g)ᵀ s read again transposed rather than tl.trans(low): Triton 3.8's sm_90 pipeline
        # fails (TritonGPUReduceDataDuplication) on one value feeding two dots in two layouts
        low_t = tl.load(l_ptr + offs_r[:, None] * stride_lr + rows[None, :] * stride_lm,
                        mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
        if HAS_G:
            low_t = low_t * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[:, None]
        low_t = (low_t * scale).to(c_ptr.dtype.element_ty)
        ga = mma(low_t, xt, tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32), UPCAST, INPUT_PRECISION)
        if HAS_DROPOUT:
            ga = ga * keep_scale
        tl.atomic_add(ga_ptr + offs_r[:, None] * N + cols[None, :], ga, mask=r_mask[:, None] & n_mask[None, :])


# one autotuner per operand width, over the same kernel: fp32 gets its own (smaller) tiles
_GEMM_LOWRANK = {fp32: triton.autotune(configs=gemm_configs(fp32),
                                       key=["M_BUCKET", "N", "K", "HAS_DROPOUT", "HAS_BIAS", "GRAD_A"])(
    _gemm_lowrank_kernel) for fp32 in (False, True)}


def gemm_lowrank(a_op: torch.Tensor, b_op: torch.Tensor, bias: torch.Tensor | None,
                 low: torch.Tensor, right: torch.Tensor, g: torch.Tensor | None, scale: float,
                 dropout_p: float = 0.0, seed: torch.Tensor | None = None, threshold: int = 0,
                 out: torch.Tensor | None = None, x: torch.Tensor | None = None,
                 grad_a: torch.Tensor | None = None) -> torch.Tensor:
    """C = a_op (M, K) @ b_op (K, N) + bias + keep ⊙ scale ((low (M, r) ⊙ g) @ right (r, N)) / (1-p).

    Any strides; C is a new contiguous (M, N) tensor in a_op's dtype (``out`` if given: any strides).
    low, right and g may have any float dtype (fp32 u / v, master-dtype adapters): the epilogue
    rounds them itself. With dropout_p > 0 the keep mask is the one of element (m, n) of an (M, N)
    input (used for dx, whose shape is x's). With ``grad_a`` (a zeroed contiguous fp32 (r, N)
    buffer) and ``x`` (M, N), also adds s (low ⊙ g)ᵀ drop(x) into it (dx's grad_A).
    """
    M, K = a_op.shape
    N = b_op.shape[1]
    R = low.shape[1]
    c = out if out is not None else torch.empty((M, N), device=a_op.device, dtype=a_op.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    launch(_GEMM_LOWRANK[a_op.dtype == torch.float32])[grid](
        a_op, b_op, c, bias if bias is not None else c, low, right, g if g is not None else c,
        x if grad_a is not None else c, grad_a if grad_a is not None else c,
        M, N, K, R, next_pow2(M),
        a_op.stride(0), a_op.stride(1), b_op.stride(0), b_op.stride(1), c.stride(0), c.stride(1),
        low.stride(0), low.stride(1), right.stride(0), right.stride(1),
        x.stride(0) if grad_a is not None else 0, x.stride(1) if grad_a is not None else 0,
        scale, seed if seed is not None else c, threshold, 1.0 / (1.0 - dropout_p),
        HAS_BIAS=bias is not None, HAS_G=g is not None, HAS_DROPOUT=dropout_p > 0, GRAD_A=grad_a is not None,
        R_PAD=rank_pad(R),
        UPCAST=upcast_dot(a_op.dtype), INPUT_PRECISION=input_precision(a_op.dtype))
    return c


# ---------------------------------------------------------------------------------------------
# 3. one pass over dy: v = dy B, grad_B = s dyᵀ (u ⊙ g), grad_b = Σ_t dy, grad_g = s Σ_t u ⊙ v
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dy_kernel(dy_ptr, b_ptr, u_ptr, g_ptr, v_ptr, gb_ptr, db_ptr, dg_ptr,
               T, N, R, rows_per_split,
               stride_dyt, stride_dyn, stride_bn, stride_br, stride_ut, stride_ur,
               scale,
               HAS_G: tl.constexpr, NEED_GB: tl.constexpr, NEED_DB: tl.constexpr, NEED_DG: tl.constexpr,
               V_ATOMIC: tl.constexpr, GB_ATOMIC: tl.constexpr, DG_ATOMIC: tl.constexpr, R_PAD: tl.constexpr,
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
    gs = tl.full((R_PAD,), scale, tl.float32)
    if HAS_G:
        gs = gs * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    p_acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)      # P = dyᵀ u over this program's rows
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        t_mask = offs_t < t_end
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyn,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)             # (BLOCK_T, BLOCK_N)
        v_part = mma(dy, b_tile, tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32), UPCAST, INPUT_PRECISION)
        v_ptrs = v_ptr + rows[:, None] * R + offs_r[None, :]
        v_mask = t_mask[:, None] & r_mask[None, :]
        if V_ATOMIC:
            tl.atomic_add(v_ptrs, v_part, mask=v_mask)
        else:
            tl.store(v_ptrs, v_part, mask=v_mask)
        if NEED_GB or NEED_DG:
            u = tl.load(u_ptr + rows[:, None] * stride_ut + offs_r[None, :] * stride_ur, mask=v_mask, other=0.0)
            p_acc = mma(tl.trans(dy), u.to(dy_ptr.dtype.element_ty), p_acc, UPCAST, INPUT_PRECISION)
        if NEED_DB:
            db_acc += tl.sum(dy.to(tl.float32), axis=0)
    if NEED_GB:   # grad_B = s P ⊙ g
        gb_ptrs = gb_ptr + cols[:, None] * R + offs_r[None, :]
        gb_mask = n_mask[:, None] & r_mask[None, :]
        if GB_ATOMIC:
            tl.atomic_add(gb_ptrs, p_acc * gs[None, :], mask=gb_mask)
        else:
            tl.store(gb_ptrs, p_acc * gs[None, :], mask=gb_mask)
    if NEED_DG:   # grad_g = s Σ_t u ⊙ v = s Σ_n B ⊙ P (this program's share)
        dg_part = tl.sum(b_tile.to(tl.float32) * p_acc, axis=0) * scale
        if DG_ATOMIC:
            tl.atomic_add(dg_ptr + offs_r, dg_part, mask=r_mask)
        else:
            tl.store(dg_ptr + offs_r, dg_part, mask=r_mask)
    if NEED_DB:
        if GB_ATOMIC:
            tl.atomic_add(db_ptr + offs_n, db_acc, mask=n_mask)
        else:
            tl.store(db_ptr + offs_n, db_acc, mask=n_mask)


def lowrank_dy(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, g: torch.Tensor | None, scale: float,
               v: torch.Tensor, grad_b: torch.Tensor | None, grad_bias: torch.Tensor | None,
               grad_g: torch.Tensor | None) -> None:
    """Writes v = dy B (T, r), and grad_B = s dyᵀ (u ⊙ g) (N, r), grad_bias (N,), grad_g = s Σ_t u ⊙ v
    (r,) where given: fp32, contiguous, zero-filled (partial sums of programs are added atomically)."""
    T, N = dy.shape
    R = b.shape[1]
    if INTERPRET:
        block_t, block_n, warps = 32, 32, 4
    else:
        block_t, block_n, warps = 64, 128, 4
    n_blocks = cdiv(N, block_n)
    # split T so that about two programs run per SM; each split's grad_B partial is added atomically
    splits, rows_per_split = token_splits(T, n_blocks, dy, per_sm=2, block=block_t)
    launch(_dy_kernel)[(n_blocks, splits)](
        dy, b, u, g if g is not None else v, v, grad_b if grad_b is not None else v,
        grad_bias if grad_bias is not None else v, grad_g if grad_g is not None else v,
        T, N, R, rows_per_split,
        dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), u.stride(0), u.stride(1),
        scale,
        HAS_G=g is not None, NEED_GB=grad_b is not None, NEED_DB=grad_bias is not None, NEED_DG=grad_g is not None,
        V_ATOMIC=n_blocks > 1, GB_ATOMIC=splits > 1, DG_ATOMIC=n_blocks * splits > 1, R_PAD=rank_pad(R),
        BLOCK_T=block_t, BLOCK_N=block_n,
        UPCAST=upcast_dot(dy.dtype), INPUT_PRECISION=input_precision(dy.dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# 5. grad_A = s (v ⊙ g)ᵀ drop(x)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["threshold"])
def _grad_a_kernel(x_ptr, v_ptr, g_ptr, ga_ptr, T, K, R, rows_per_split,
                   stride_xt, stride_xk, scale, seed_ptr, threshold, keep_scale,
                   HAS_G: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
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
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        t_mask = offs_t < t_end
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k64[None, :] * stride_xk,
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep_tile(seed, rows, pid_k * BLOCK_K, K, threshold, BLOCK_T, BLOCK_K), x, 0.0)
        v = tl.load(v_ptr + rows[:, None] * R + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        vg = (v * gs[None, :]).to(x_ptr.dtype.element_ty)
        acc = mma(tl.trans(vg), x, acc, UPCAST, INPUT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    ga_ptrs = ga_ptr + offs_r[:, None] * K + offs_k[None, :]
    ga_mask = r_mask[:, None] & k_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ga_ptrs, acc, mask=ga_mask)
    else:
        tl.store(ga_ptrs, acc, mask=ga_mask)


def lowrank_grad_a(x: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, scale: float,
                   dropout_p: float, seed: torch.Tensor | None, threshold: int, ga: torch.Tensor) -> None:
    """Writes grad_A = s (v ⊙ g)ᵀ drop(x) into ``ga``, a zero-filled contiguous fp32 (r, K) buffer;
    v is the fp32 (T, r) from lowrank_dy."""
    T, K = x.shape
    R = v.shape[1]
    if INTERPRET:
        block_t, block_k, warps = 32, 32, 4
    else:
        block_t, block_k, warps = 64, 128, 4
    k_blocks = cdiv(K, block_k)
    splits, rows_per_split = token_splits(T, k_blocks, x, per_sm=2, block=block_t)
    atomic = splits > 1
    launch(_grad_a_kernel)[(k_blocks, splits)](
        x, v, g if g is not None else v, ga, T, K, R, rows_per_split,
        x.stride(0), x.stride(1), scale, seed if seed is not None else ga, threshold, 1.0 / (1.0 - dropout_p),
        HAS_G=g is not None, HAS_DROPOUT=dropout_p > 0, ATOMIC=atomic, R_PAD=rank_pad(R),
        BLOCK_T=block_t, BLOCK_K=block_k,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# the op's two directions: the launches above, recorded once per launch signature and replayed
# (triton/_launcher.py PlanCache): a call with a known key runs no launcher Python
# ---------------------------------------------------------------------------------------------

_FORWARD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
            g: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor | None,
            threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches 1 and 2: (y (T, N) in x's dtype, u (T, r) fp32) for x (T, K)."""
    T = x.shape[0]
    y = torch.empty((T, weight.shape[0]), device=x.device, dtype=x.dtype)
    u = torch.empty((T, a.shape[0]), device=x.device, dtype=torch.float32)
    w_t, b_t = weight.t(), b.t()
    env = (x, w_t, bias, a, b_t, g, seed, u, y)

    def key():
        return (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(a), tensor_key(b), tensor_key(g),
                aligned(seed, u, y), scale, dropout_p, threshold, input_precision(x.dtype))

    def body():
        lowrank_down(x, a, dropout_p, seed, threshold, out=u)
        gemm_lowrank(x, w_t, bias, u, b_t, g, scale, out=y)
    _FORWARD_PLANS.run(key, env, body)
    return y, u


def backward(dy: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, a: torch.Tensor,
             b: torch.Tensor, g: torch.Tensor | None, u: torch.Tensor, scale: float, dropout_p: float,
             seed: torch.Tensor | None, threshold: int, need_dx: bool, layout: dict,
             total: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Launches 0 and 3-5: (dx (T, K) in dy's dtype or None, the fp32 workspace whose first
    ``total`` elements hold the reduced grads at ``layout`` = {name: (offset, shape)} for the
    names a, b, bias, g asked for; v (T, r) follows them)."""
    T, R = u.shape
    ws = torch.zeros((total + T * R,), device=dy.device, dtype=torch.float32)
    views = {name: ws[off:off + math.prod(shape)].view(shape) for name, (off, shape) in layout.items()}
    v = ws[total:].view(T, R)
    dx = torch.empty((T, a.shape[1]), device=dy.device, dtype=dy.dtype) if need_dx else None
    ga, gb, gbias, gg = views.get("a"), views.get("b"), views.get("bias"), views.get("g")
    env = (dy, x, weight, a, b, g, u, seed, v, ga, gb, gbias, gg, dx)

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(weight), tensor_key(a), tensor_key(b), tensor_key(g),
                tensor_key(u), aligned(seed, ws, dx), tuple(layout.items()), scale, dropout_p, threshold,
                input_precision(dy.dtype))

    def body():
        lowrank_dy(dy, b, u, g, scale, v, gb, gbias, gg)
        if need_dx:     # grad_A in the dx GEMM's epilogue
            gemm_lowrank(dy, weight, None, v, a, g, scale, dropout_p, seed, threshold, out=dx, x=x, grad_a=ga)
        elif ga is not None:
            lowrank_grad_a(x, v, g, scale, dropout_p, seed, threshold, ga)
    _BACKWARD_PLANS.run(key, env, body)
    return dx, ws
