"""The frozen-linear GEMM shared by the (IA)³ and KronA ops: C = (A @ (diag(k_scale) B) + bias) ⊙ n_scale
with an optional epilogue reduction Σ_rows (A @ diag(k_scale) B + bias) ⊙ Z, as per-row-block partials.

    A (M, K), B (K, N), any strides; bias, n_scale (N,); k_scale (K,); Z, C (M, N)

The per-reduction-index scale multiplies B's rows inside the K loop; bias, the column scale and the
reduction act on the fp32 accumulator in the epilogue (the reduction before the scale, one fp32
workspace row per row block, summed in order afterwards: deterministic, no memset). Plain
pointers, cp.async-fed wgmma on sm_90: the TMA persistent core of issue #14 replaces it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import cdiv, gemm_configs, gemm_tile, grouped_tile, input_precision, next_pow2, upcast_dot
from ._launcher import launch


@triton.jit
def _gemm_scaled_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, ks_ptr, ns_ptr, z_ptr, gl_ptr,
                        M, N, K, M_BUCKET,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_zm, stride_zn,
                        HAS_BIAS: tl.constexpr, K_SCALE: tl.constexpr, N_SCALE: tl.constexpr,
                        REDUCE_Z: tl.constexpr, STORE_C: tl.constexpr,
                        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = gemm_tile(a_ptr, b_ptr, ks_ptr, rows, cols, m_mask, n_mask, K, stride_am, stride_ak, stride_bk, stride_bn,
                    K_SCALE, UPCAST, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tile_mask = m_mask[:, None] & n_mask[None, :]
    if REDUCE_Z:   # row pid_m of the (row blocks, N) workspace: Σ_(m in this block) acc[m, n] · z[m, n], unscaled
        z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=tile_mask, other=0.0)
        tl.store(gl_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(acc * z.to(tl.float32), axis=0), mask=n_mask)
    if N_SCALE:
        acc = acc * tl.load(ns_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_C:
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=tile_mask)


@functools.cache
def _reduce_block_m(fp32: bool) -> int:
    heights = [cfg.kwargs["BLOCK_M"] for cfg in gemm_configs(fp32)]
    return max(set(heights), key=lambda h: (heights.count(h), h))     # the most common tile height


def reduce_block_m(dtype: torch.dtype) -> int:
    """BLOCK_M of every config the reducing variant (``reduce_z``) may pick (the most common tile
    height of the width's configs): its workspace has one row per row block, so their number
    must be known before the launch."""
    return _reduce_block_m(dtype == torch.float32)


def _configs(fp32: bool, reduce: bool) -> list:
    cfgs = gemm_configs(fp32)
    return [cfg for cfg in cfgs if cfg.kwargs["BLOCK_M"] == _reduce_block_m(fp32)] if reduce else cfgs


# one autotuner per (operand width, reduction): fp32 gets its own (smaller) tiles, the reducing
# variant only tiles of one height
_AUTOTUNED = {(fp32, reduce): triton.autotune(configs=_configs(fp32, reduce),
                                              key=["M_BUCKET", "N", "K", "HAS_BIAS", "K_SCALE", "N_SCALE"])(
    _gemm_scaled_kernel) for fp32 in (False, True) for reduce in (False, True)}


def gemm_scaled(a_op: torch.Tensor, b_op: torch.Tensor, bias: torch.Tensor | None = None,
                k_scale: torch.Tensor | None = None, n_scale: torch.Tensor | None = None,
                reduce_z: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                gl: torch.Tensor | None = None) -> None:
    """out = ((a_op (M, K) @ (diag(k_scale) b_op (K, N))) + bias) ⊙ n_scale (out: (M, N), any
    strides; None: not stored). With ``reduce_z`` (M, N) also the partial sums of
    Σ_m (a_op @ diag(k_scale) b_op + bias) ⊙ z (before the column scale) into ``gl``, a contiguous
    fp32 (cdiv(M, reduce_block_m(dtype)), N) workspace, one row per row block, every row written:
    sum them with triton/partials.py (in order: deterministic). Nothing is allocated here: every
    tensor the kernel gets is the caller's (a launch plan can name it)."""
    M, K = a_op.shape
    N = b_op.shape[1]
    if out is None and gl is None:
        raise ValueError("gemm_scaled: nothing to compute (no out, no reduction)")
    c = out if out is not None else gl       # a placeholder where nothing is stored (strides unused)
    z = reduce_z if reduce_z is not None else c
    c_strides = out.stride() if out is not None else (0, 0)
    z_strides = reduce_z.stride() if reduce_z is not None else (0, 0)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    if reduce_z is not None:
        row_blocks = cdiv(M, reduce_block_m(a_op.dtype))
        if tuple(gl.shape) != (row_blocks, N):
            raise ValueError(f"gemm_scaled: the workspace must be (row blocks {row_blocks}, N={N}), "
                             f"got {tuple(gl.shape)}")
    launch(_AUTOTUNED[(a_op.dtype == torch.float32, reduce_z is not None)])[grid](
        a_op, b_op, c, bias if bias is not None else c, k_scale if k_scale is not None else c,
        n_scale if n_scale is not None else c, z, gl if gl is not None else c,
        M, N, K, next_pow2(M),
        a_op.stride(0), a_op.stride(1), b_op.stride(0), b_op.stride(1),
        *c_strides, *z_strides,
        HAS_BIAS=bias is not None, K_SCALE=k_scale is not None, N_SCALE=n_scale is not None,
        REDUCE_Z=reduce_z is not None, STORE_C=out is not None,
        UPCAST=upcast_dot(a_op.dtype), INPUT_PRECISION=input_precision(a_op.dtype))
