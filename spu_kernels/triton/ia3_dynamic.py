"""Triton kernels of data-dependent (IA)³ on a layer's output (keys, values):

    y = z ⊙ (1 + tanh(g Uᵀ)),  z = x Wᵀ + b,  g = x Dᵀ      x (T, K), W (N, K), D (r, K), U (N, r)

Forward, one launch:
  ``_ia3_dyn_fwd_kernel``  the GEMM's K loop over x also accumulates g = x Dᵀ (BLOCK_M, r) beside the
                   (BLOCK_M, BLOCK_N) tile of x Wᵀ (the low-rank op's pattern, triton/lowrank_linear.py);
                   the epilogue adds b, forms the logits g Uᵀ for the block's columns and stores
                   y = (acc + b) ⊙ (1 + tanh). The column-block-0 programs also store g (T, r) in fp32:
                   all that backward keeps besides y (no T×N tensor of its own).
Backward, up to five launches:
  ``_ia3_dyn_bwd_kernel``  one program per (row block, column split) walks dy and y over its columns,
                   t = tanh(g Uᵀ) recomputed from the saved g: dz = dy ⊙ (1 + t) (stored for dx), the
                   logit grads e = dy ⊙ z ⊙ (1 − t²) = dy ⊙ y ⊙ (1 − t) (no division by 1 + t, which may
                   round to 0), dg = e U (T, r, in x's dtype; with several column splits, fp32 shares
                   summed in order), and the row block's fp32 partials of grad_U = eᵀ g (N, r) and
                   grad_b = Σ_t dz in a workspace row ((T / 64) × N·(r + 1) fp32: 10 MB at T = 8192,
                   N = 4096, r = 4), summed in order (triton/partials.py): deterministic, no atomics.
  ``gemm``         dx = dz W + dg D (triton/gemm.py: the generator's path is the core's rank-r term).
  ``gemm``         grad_D = dgᵀ x (r, K), fp32, reading x once (the core with M = r).
The rank is zero-padded to R_PAD (a power of two >= 16) inside the kernels only; D and U are read
in their own (master) dtype, D rounded to x's dtype for the dot, U used in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, device_index, input_precision, mma, num_sms, rank_pad, upcast_dot
from ._launcher import PlanCache, aligned, launch, tensor_key
from .gemm import gemm
from .partials import sum_partials


@triton.jit
def _tanh(v):
    """tanh in fp32 through exp: exactly 0 at 0 (the generator's zero start); |v| clamped to 20, past
    which tanh rounds to ±1 in fp32 anyway (no inf from exp)."""
    return 2.0 / (1.0 + tl.exp(-2.0 * tl.minimum(tl.maximum(v, -20.0), 20.0))) - 1.0


@triton.jit
def _ia3_dyn_fwd_kernel(x_ptr, w_ptr, b_ptr, d_ptr, u_ptr, y_ptr, g_ptr,
                M, N, K, R,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk, stride_un, stride_ur,
                HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    rows = offs_m.to(tl.int64)     # int64 address products: M·stride may pass 2**31
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gacc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k64 = offs_k.to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * stride_xm + k64[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wn + k64[:, None] * stride_wk,
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0)           # Wᵀ tile (BLOCK_K, BLOCK_N)
        dt = tl.load(d_ptr + offs_r[None, :] * stride_dr + k64[:, None] * stride_dk,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0).to(dtype)  # Dᵀ tile (BLOCK_K, R_PAD)
        acc = mma(a, wt, acc, UPCAST, INPUT_PRECISION)
        gacc = mma(a, dt, gacc, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ut = tl.load(u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # Uᵀ tile (R_PAD, BLOCK_N)
    t = _tanh(tl.dot(gacc, ut, input_precision="ieee"))
    tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], (acc * (1.0 + t)).to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
    if pid_n == 0:
        tl.store(g_ptr + rows[:, None] * R + offs_r[None, :], gacc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _ia3_dyn_bwd_kernel(dy_ptr, y_ptr, g_ptr, u_ptr, dz_ptr, dg_ptr, dgp_ptr, ws_ptr,
                M, N, R, ws_width, db_at, cols_per_split,
                stride_dym, stride_dyn, stride_ym, stride_yn, stride_un, stride_ur,
                STORE_DZ: tl.constexpr, NEED_E: tl.constexpr, NEED_DG: tl.constexpr, NEED_DU: tl.constexpr,
                NEED_DB: tl.constexpr, SPLIT_DG: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)       # column split: columns [pid_s·cols_per_split, +cols_per_split)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    gt = tl.load(g_ptr + rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    dg_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = offs_n.to(tl.int64)
        n_mask = offs_n < n_end
        mask = m_mask[:, None] & n_mask[None, :]
        ut = tl.load(u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # (R_PAD, BLOCK_N)
        t = _tanh(tl.dot(gt, ut, input_precision="ieee"))
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        dz = dy * (1.0 + t)
        if STORE_DZ:
            tl.store(dz_ptr + rows[:, None] * N + offs_n[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_DB:
            # row pid_m of the workspace: [grad_U share (N·r) | grad_b share (N) at db_at]
            tl.store(ws_ptr + pid_m.to(tl.int64) * ws_width + db_at + offs_n, tl.sum(dz, axis=0), mask=n_mask)
        if NEED_E:
            y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0)
            e = dy * y.to(tl.float32) * (1.0 - t)     # = dy ⊙ z ⊙ (1 − t²), z = y / (1 + t)
            if NEED_DG:
                # U read again as (BLOCK_N, R_PAD) rather than tl.trans(ut): one value feeding two dots in two
                # layouts fails Triton 3.8's sm_90 pipeline (as in triton/gemm.py)
                un = tl.load(u_ptr + cols[:, None] * stride_un + offs_r[None, :] * stride_ur,
                             mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                dg_acc = tl.dot(e, un, dg_acc, input_precision="ieee")
            if NEED_DU:   # this row block's share of grad_U = eᵀ g: (BLOCK_N, R_PAD)
                gt2 = tl.load(g_ptr + rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                              other=0.0)
                du = tl.dot(tl.trans(e), gt2, input_precision="ieee")
                tl.store(ws_ptr + pid_m.to(tl.int64) * ws_width + cols[:, None] * R + offs_r[None, :], du,
                         mask=n_mask[:, None] & r_mask[None, :])
    if NEED_DG:
        if SPLIT_DG:   # this split's fp32 share of dg: row pid_s of the (splits, M·r) partials (triton/partials.py)
            tl.store(dgp_ptr + pid_s.to(tl.int64) * M * R + rows[:, None] * R + offs_r[None, :], dg_acc,
                     mask=m_mask[:, None] & r_mask[None, :])
        else:
            tl.store(dg_ptr + rows[:, None] * R + offs_r[None, :], dg_acc.to(dg_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & r_mask[None, :])


def _fwd_blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Untimed on a GPU (numbers pending); chosen so that
    sm_90 compiles them without spills (Triton 3.8, 2026-11-24: 64×128 on 4 warps spilled 664 B per
    thread, the fp32 logits dot of the epilogue beside the accumulator). fp32 (FMA dots): 64×64."""
    if INTERPRET:
        return 32, 32, 32, 4, 1
    return (64, 64, 32, 4, 3) if dtype == torch.float32 else (64, 128, 64, 8, 3)


def bwd_blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps) of the backward pass over dy; the workspace has one (N·(r + 1))
    fp32 row per row block."""
    if INTERPRET:
        return 32, 32, 4
    return 64, 64, 8        # 4 warps spilled 64 B (bf16) / 152 B (fp32) per thread on sm_90


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
            up: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
    """y (T, N) contiguous in x's dtype = (x Wᵀ + b) ⊙ (1 + tanh((x Dᵀ) Uᵀ)); g (T, r) contiguous fp32 = x Dᵀ."""
    M, K = x.shape
    N = weight.shape[0]
    R = down.shape[0]
    bm, bn, bk, warps, stages = _fwd_blocks(x.dtype)
    launch(_ia3_dyn_fwd_kernel)[(cdiv(M, bm), cdiv(N, bn))](
        x, weight, bias, down, up, y, g, M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), down.stride(0), down.stride(1),
        up.stride(0), up.stride(1),
        HAS_BIAS=bias is not None, R_PAD=rank_pad(R), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps, num_stages=stages)


def col_splits(M: int, N: int, dy: torch.Tensor) -> int:
    """Column splits of the backward pass: enough (row block, split) programs for about two per SM
    (a short T has few row blocks), at most one per column block."""
    bm, bn, _ = bwd_blocks(dy.dtype)
    return max(1, min(cdiv(N, bn), cdiv(2 * num_sms(device_index(dy)), cdiv(M, bm))))


def dy_pass(dy, y, g, up, dz, dg, dgp, ws, need_du: bool, need_db: bool) -> None:
    """The backward pass over dy (and y): dz (None: not stored), dg (None: not computed; with several
    column splits (``col_splits``) its fp32 shares go to dgp (splits, T·r), else dgp is None), and the
    row blocks' partials of grad_U / grad_b in ws (contiguous fp32 (row blocks, N·(r·need_du + need_db)))."""
    M, N = dy.shape
    R = g.shape[1]
    bm, bn, warps = bwd_blocks(dy.dtype)
    splits = col_splits(M, N, dy)
    if (dg is not None and splits > 1) != (dgp is not None):
        raise ValueError(f"dy_pass: {splits} column splits need {'a' if splits > 1 else 'no'} dg workspace")
    launch(_ia3_dyn_bwd_kernel)[(cdiv(M, bm), splits)](
        dy, y, g, up, dz, dg, dgp, ws, M, N, R, ws.stride(0) if ws is not None else 0, N * R if need_du else 0,
        cdiv(cdiv(N, bn), splits) * bn,
        dy.stride(0), dy.stride(1), *(y.stride() if y is not None else (0, 0)), up.stride(0), up.stride(1),
        STORE_DZ=dz is not None, NEED_E=dg is not None or need_du, NEED_DG=dg is not None, NEED_DU=need_du,
        NEED_DB=need_db, SPLIT_DG=dgp is not None, R_PAD=rank_pad(R), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)


# ---------------------------------------------------------------------------------------------
# the op's triton halves: every output and workspace allocated here, outside the recorded body
# (triton/_launcher.py PlanCache), and named in env
# ---------------------------------------------------------------------------------------------

_PLANS = {name: PlanCache() for name in ("fwd", "bwd")}


def linear_forward(x, weight, bias, down, up) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (T, N) in x's dtype, g = x Dᵀ (T, r) fp32)."""
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    g = torch.empty((x.shape[0], down.shape[0]), device=x.device, dtype=torch.float32)
    env = (x, weight, bias, down, up, y, g)

    def key():
        return (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(down), tensor_key(up),
                aligned(y, g), input_precision(x.dtype))
    _PLANS["fwd"].run(key, env, lambda: forward(x, weight, bias, down, up, y, g))
    return y, g


def linear_backward(dy, x, y, weight, down, up, g, need_dx: bool, need_dbias: bool, need_ddown: bool,
                    need_dup: bool):
    """(dx in dy's dtype, grad_b in dy's dtype, grad_D in D's dtype, grad_U in U's dtype), None where
    not asked for. x only with need_ddown, y with any of need_dx / need_ddown / need_dup, W with need_dx."""
    T, N = dy.shape
    R, K = down.shape
    dev = dy.device
    need_dg = need_dx or need_ddown
    dx = torch.empty((T, K), device=dev, dtype=dy.dtype) if need_dx else None
    dz = torch.empty((T, N), device=dev, dtype=dy.dtype) if need_dx else None
    dg = torch.empty((T, R), device=dev, dtype=dy.dtype) if need_dg else None
    dbias = torch.empty(N, device=dev, dtype=dy.dtype) if need_dbias else None
    dup = torch.empty((N, R), device=dev, dtype=up.dtype) if need_dup else None
    width = N * (R * need_dup + need_dbias)
    ws = torch.empty((cdiv(T, bwd_blocks(dy.dtype)[0]), width), device=dev, dtype=torch.float32) if width else None
    dd32 = torch.empty((R, K), device=dev, dtype=torch.float32) if need_ddown else None
    splits = col_splits(T, N, dy)
    dgp = torch.empty((splits, T * R), device=dev, dtype=torch.float32) if need_dg and splits > 1 else None
    env = (dy, x, y, weight, down, up, g, dx, dz, dg, dgp, dbias, dup, ws, dd32)

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(y), tensor_key(weight), tensor_key(down), tensor_key(up),
                tensor_key(g), aligned(dx, dz, dg, dgp, dbias, dup, ws, dd32), input_precision(dy.dtype))

    def body():
        dy_pass(dy, y, g, up, dz, dg, dgp, ws, need_dup, need_dbias)
        if dgp is not None:
            sum_partials(dgp, dg)
        if ws is not None:
            if dup is not None and dbias is not None:
                sum_partials(ws, dup, dbias)
            else:
                sum_partials(ws, dup if dup is not None else dbias)
        if need_dx:      # dx = dz W + dg D: the generator's path as the GEMM core's rank-r term
            gemm(dz, weight, dx, low=dg, right=down)
        if need_ddown:   # grad_D = dgᵀ x (r, K), fp32: the core with M = r reads x once
            gemm(dg.t(), x, dd32)
    _PLANS["bwd"].run(key, env, body)
    dd = None
    if need_ddown:
        dd = dd32 if down.dtype == torch.float32 else dd32.to(down.dtype)
    return dx, dbias, dd, dup
