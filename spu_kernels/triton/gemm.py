"""The package's one GEMM core: every frozen-linear product of the low-rank, (IA)³ and KronA ops.

    C = ((A diag(k_scale)) @ B + bias + keep ⊙ s ((L ⊙ g) @ Rm) / (1 - p)) ⊙ n_scale

    A (M, K), B (K, N) (stored either way round), C (M, N); bias, n_scale (N,); k_scale (K,);
    the rank-r term L (M, r), Rm (r, N), g (r,), in any float dtype (rounded to A's in registers)

One kernel, one K loop; what an op needs is switched on by constexpr hooks:
  * the K loop reads A and B through TMA tensor descriptors (``tl.make_tensor_descriptor``: bulk
    async copies into shared memory feeding wgmma on sm_90) where the operands allow it (last
    stride 1, 16-byte aligned base and rows; the host decides, ``tma_ok``), else through pointers.
    B stored as (N, K) (a weight read as Wᵀ) is described as such and its tile transposed.
    ``k_scale`` multiplies A's columns (A diag(ks) B = A (diag(ks) B)): A may feed wgmma from
    registers, B may not.
  * a persistent tile loop: min(#SMs, #tiles) programs walk the tiles in grouped order (GROUP_M
    row blocks share each column block of B while it is in L2).
  * the rank-r term (one small dot per tile; dropout's keep mask of an (M, N) input regenerated,
    ops/dropout_rng.py) starts the fp32 accumulator before the K loop, so no second tile of that
    size is live beside it. After the K loop, in this order: bias, the reduction ``Σ_m C ⊙ Z``
    (before the column scale: (IA)³'s grad_l) as one fp32 row per row block, the column scale,
    the store of C (TMA where C allows it).
  * grad_A = s (L ⊙ g)ᵀ drop(X) for X (M, N) (the low-rank dx GEMM: dx's tile covers exactly x's
    tile, one mask serves both) and grad_g = s Σ_m u ⊙ L. The tiles are then grouped in work units
    (column block, row split s) whose row blocks are s, s + S, …; a unit keeps its (r, BLOCK_N)
    share in registers and writes it once, into row s of an (S, L) fp32 workspace at an element
    offset (S = 1: the grads themselves), summed in order by triton/partials.py. No atomics, no
    memset: the same inputs give the same bits.
  * no dense product at all (K = 0): bias + the rank-r term (+ grads) alone, for cuBLAS to add
    A @ B into with beta = 1 (the per-shape choice of triton/choice.py).
Unused pointer arguments are passed as None (Triton specialises them away; fewer launcher arguments).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import driver

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
    upcast_dot,
)
from ._launcher import launch


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile ``tile`` in grouped ordering."""
    per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit(do_not_specialize=["threshold"])
def _gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, ks_ptr, ns_ptr, l_ptr, rm_ptr, g_ptr, z_ptr, zp_ptr, x_ptr, ws_ptr,
                 u_ptr, seed_ptr,
                 M, N, K, R, M_BUCKET, ROW_SPLITS, stride_split, ga_at, gg_at,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                 stride_lm, stride_lr, stride_rmr, stride_rmn, stride_zm, stride_zn, stride_xm, stride_xn,
                 scale, threshold, keep_scale,
                 A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, C_TMA: tl.constexpr,
                 HAS_BIAS: tl.constexpr, K_SCALE: tl.constexpr, N_SCALE: tl.constexpr, LOWRANK: tl.constexpr,
                 HAS_G: tl.constexpr, HAS_DROPOUT: tl.constexpr, REDUCE_Z: tl.constexpr, STORE_C: tl.constexpr,
                 GRAD_A: tl.constexpr, GRAD_G: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    dtype = a_ptr.dtype.element_ty
    if A_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_TMA:
        if B_KMAJOR:     # B (K, N) is the transpose of a row-major (N, K) tensor
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
    if C_TMA:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    if LOWRANK:
        gs = tl.full((R_PAD,), scale, tl.float32)   # s g, the rank term's per-rank factor
        if HAS_G:
            gs = gs * tl.load(g_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    if GRAD_A:   # work units (column block c, row split s), unit = c·S + s: units pid, pid + NUM_SMS, ...
        unit_first = pid
        unit_last = num_pid_n * ROW_SPLITS
        unit_step = NUM_SMS
    else:        # one unit: this program's tiles
        unit_first = 0
        unit_last = 1
        unit_step = 1

    for unit in range(unit_first, unit_last, unit_step):
        if GRAD_A:   # the unit's tiles: column block c, row blocks s, s + S, ...
            tile_first = unit % ROW_SPLITS
            tile_last = num_pid_m
            tile_step = ROW_SPLITS
            ga_acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
            if GRAD_G:
                gg_acc = tl.zeros((R_PAD,), dtype=tl.float32)
        else:        # persistent: tiles pid, pid + NUM_SMS, ... in grouped order
            tile_first = pid
            tile_last = num_pid_m * num_pid_n
            tile_step = NUM_SMS
        for tile in tl.range(tile_first, tile_last, tile_step, flatten=FLATTEN):   # FLATTEN: pipeline across tiles
            if GRAD_A:
                pid_m = tile
                pid_n = unit // ROW_SPLITS
            else:
                pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
            m0 = pid_m * BLOCK_M
            n0 = pid_n * BLOCK_N
            offs_m = m0 + tl.arange(0, BLOCK_M)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows = offs_m.to(tl.int64)      # int64 address products: M·stride may pass 2**31
            cols = offs_n.to(tl.int64)
            m_mask = offs_m < M
            n_mask = offs_n < N

            # the rank-r term first, s ((L ⊙ g) Rm) (BLOCK_M, R_PAD) @ (R_PAD, BLOCK_N): it starts the
            # accumulator (dropout: its kept elements), so no second (BLOCK_M, BLOCK_N) tile is live
            # beside the K loop's or the epilogue's
            if LOWRANK:
                low = tl.load(l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                              mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
                if GRAD_G:   # grad_g = s Σ_t u ⊙ v (L = v): column block 0's units, one row split each
                    if pid_n == 0:
                        u = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :],
                                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                        gg_acc += tl.sum(u * low, axis=0)
                low = (low * gs[None, :]).to(dtype)
                rm = tl.load(rm_ptr + offs_r[:, None] * stride_rmr + cols[None, :] * stride_rmn,
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(dtype)
                acc = mma(low, rm, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, INPUT_PRECISION)
                if HAS_DROPOUT:
                    keep = dropout_keep_tile(seed, rows, n0, N, threshold, BLOCK_M, BLOCK_N)
                    acc = tl.where(keep, acc * keep_scale, 0.0)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k64 = offs_k.to(tl.int64)
                k_mask = offs_k < K
                if A_TMA:    # rows and columns past the edges read as zeros
                    a = a_desc.load([m0, k0])
                else:
                    a = tl.load(a_ptr + rows[:, None] * stride_am + k64[None, :] * stride_ak,
                                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if K_SCALE:
                    ks = tl.load(ks_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                    a = (a.to(tl.float32) * ks[None, :]).to(dtype)
                if B_TMA:
                    if B_KMAJOR:
                        b = b_desc.load([n0, k0]).T
                    else:
                        b = b_desc.load([k0, n0])
                else:
                    b = tl.load(b_ptr + k64[:, None] * stride_bk + cols[None, :] * stride_bn,
                                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)

            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if REDUCE_Z:     # row pid_m of the (row blocks, N) workspace: Σ_(m in this block) acc ⊙ z, unscaled
                z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                            mask=m_mask[:, None] & n_mask[None, :], other=0.0)
                tl.store(zp_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(acc * z.to(tl.float32), axis=0),
                         mask=n_mask)
            if N_SCALE:
                acc = acc * tl.load(ns_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if STORE_C:
                if C_TMA:    # the descriptor clips the tile at C's edges
                    c_desc.store([m0, n0], acc.to(c_ptr.dtype.element_ty))
                else:
                    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
            if GRAD_A:       # this tile's share of s (L ⊙ g)ᵀ drop(X): (R_PAD, BLOCK_M) @ (BLOCK_M, BLOCK_N)
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn,
                             mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(dtype)
                if HAS_DROPOUT:  # the mask regenerated (cheaper than keeping it live through the K loop);
                    # a 0/1 multiply: an i1 mask in the dot operand's layout cannot go through smem
                    xt = xt * dropout_keep_tile(seed, rows, n0, N, threshold, BLOCK_M, BLOCK_N).to(dtype)
                # (L ⊙ g)ᵀ read again transposed rather than tl.trans(low): Triton 3.8's sm_90 pipeline
                # fails (TritonGPUReduceDataDuplication) on one value feeding two dots in two layouts
                low_t = tl.load(l_ptr + offs_r[:, None] * stride_lr + rows[None, :] * stride_lm,
                                mask=r_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
                low_t = (low_t * gs[:, None]).to(dtype)
                ga_acc = mma(low_t, xt, ga_acc, UPCAST, INPUT_PRECISION)

        if GRAD_A:   # the unit's share, written once to its split's row (a unit without tiles writes zeros)
            if HAS_DROPOUT:
                ga_acc = ga_acc * keep_scale
            c = unit // ROW_SPLITS
            split_row = (unit % ROW_SPLITS).to(tl.int64) * stride_split
            offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(ws_ptr + split_row + ga_at + offs_r[:, None] * N + offs_n[None, :], ga_acc,
                     mask=r_mask[:, None] & (offs_n < N)[None, :])
            if GRAD_G:
                if c == 0:
                    tl.store(ws_ptr + split_row + gg_at + offs_r, gg_acc * scale, mask=r_mask)


# ---------------------------------------------------------------------------------------------
# autotune configs: few, each compiled for sm_90 by tests/triton_gpu_compile.py within its spill budget
# ---------------------------------------------------------------------------------------------

def _tiles(fp32: bool) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). 16-bit operands: the persistent TMA tiles of
    Triton's Hopper matmul (128×128 / 128×256, 8 warps for the wide one) and two smaller tiles for
    short token counts (128×128 on 4 warps spilled up to 968 B per thread in the epilogue-heavy
    variants). fp32 operands (ieee dots on FMA, no tensor cores): at most 64×128; on
    sm_90 their 128-row tiles spill 1-23 KB of registers per thread (ptxas of Triton 3.8, 2026-11-24)."""
    if INTERPRET:
        return [(32, 32, 32, 4, 1)]
    if fp32:
        return [(64, 128, 32, 4, 3), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4)]
    return [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4)]


def _most_common(values: list[int]) -> int:
    return max(set(values), key=lambda v: (values.count(v), v))      # ties: the larger


@functools.cache
def _reduce_block_m(fp32: bool) -> int:
    return _most_common([t[0] for t in _tiles(fp32)])


def reduce_block_m(dtype: torch.dtype) -> int:
    """BLOCK_M of every config the reducing variant (``reduce_z``) may pick (the most common tile
    height of the width's configs): its workspace has one row per row block, so their number
    must be known before the launch."""
    return _reduce_block_m(dtype == torch.float32)


@functools.cache
def _grad_a_tile(fp32: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) the grad_A variant's row splits are chosen for: the most common tile
    width and the tallest tile of that width."""
    bn = _most_common([t[1] for t in _tiles(fp32)])
    return max(t[0] for t in _tiles(fp32) if t[1] == bn), bn


def _configs(fp32: bool, variant: str) -> list:
    """``reduce``: tiles of one height (its workspace has a row per row block), at most 128 wide
    (128×256 with Z's tile needs 240 KB of shared memory on sm_90, past the 227 KB a block may
    have); ``grad_a``: tiles of one width (its row splits are chosen for that many column blocks);
    ``out32``: fp32 output from 16-bit operands (e.g. grad_D of ia3_dynamic): at most 128 wide (128×256
    stages a 128 KB fp32 output tile beside its operand stages: 245,784 B on sm_90, past 227 KB)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                          num_stages=stages)
            for bm, bn, bk, warps, stages in _tiles(fp32)
            if (variant != "reduce" or (bm == _reduce_block_m(fp32) and bn <= 128))
            and (variant != "out32" or bn <= 128)
            and (variant != "grad_a" or bn == _grad_a_tile(fp32)[1])]


_KEY = ["M_BUCKET", "N", "K", "A_TMA", "B_TMA", "B_KMAJOR", "HAS_BIAS", "K_SCALE", "N_SCALE", "LOWRANK",
        "HAS_DROPOUT", "REDUCE_Z", "GRAD_A", "GRAD_G"]
# one autotuner per (operand width, variant): fp32 gets its own tiles
_AUTOTUNED = {(fp32, variant): triton.autotune(configs=_configs(fp32, variant), key=_KEY)(_gemm_kernel)
              for fp32 in (False, True) for variant in ("plain", "reduce", "grad_a", "out32")}


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

@functools.cache
def _has_tma(device_index_: int) -> bool:
    """Tensor-memory accelerator: sm_90 and later, by the target Triton compiles for (a stand-in
    driver's too: tests/triton_gpu_compile.py); the interpreter runs descriptors everywhere."""
    if INTERPRET:
        return True
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(device_index_)[0] >= 9
    target = driver.active.get_current_target()
    return target.backend == "cuda" and target.arch >= 90


def tma_ok(t: torch.Tensor, k_major: bool = False) -> bool:
    """Whether a 2-D operand can be read or written through a TMA descriptor: unit stride along
    its last dimension (the first with ``k_major``: the transpose of a row-major tensor), the other
    stride and the base 16-byte aligned (TMA's rules)."""
    inner, outer = (0, 1) if k_major else (1, 0)
    size = t.element_size()
    return (t.stride(inner) == 1 or t.shape[inner] == 1) and (t.stride(outer) * size) % 16 == 0 \
        and t.stride(outer) > 0 and _base_aligned(t)


def _base_aligned(t: torch.Tensor) -> bool:
    """16-byte aligned data pointer. A traced tensor (fake or functional: a triton_op traced for
    Inductor) has none: its storage offset decides, as Inductor's own alignment checks do (storages
    start aligned)."""
    try:
        return not t.data_ptr() % 16
    except RuntimeError:
        return (t.storage_offset() * t.element_size()) % 16 == 0


def row_splits(M: int, N: int, dtype: torch.dtype, like: torch.Tensor) -> int:
    """Row splits S of the grad_A variant for an (M, N) output: its work units (column block,
    split) go to min(#SMs, units) persistent programs; S minimises the busiest program's tiles,
    ceil(units / #SMs) · ceil(row blocks / S) (ties: the fewest splits, the smallest workspace).
    Its fp32 workspace holds S rows of grad_A's r·N partial sums."""
    return _row_splits(M, N, dtype == torch.float32, num_sms(device_index(like)))


@functools.lru_cache(maxsize=4096)
def _row_splits(M: int, N: int, fp32: bool, sms: int) -> int:
    bm, bn = _grad_a_tile(fp32)
    col_blocks, row_blocks = cdiv(N, bn), cdiv(M, bm)
    return min(range(1, min(row_blocks, 16) + 1),
               key=lambda s: (cdiv(col_blocks * s, sms) * cdiv(row_blocks, s), s))


def gemm(a_op: torch.Tensor | None, b_op: torch.Tensor | None, out: torch.Tensor | None = None, *,
         bias: torch.Tensor | None = None, k_scale: torch.Tensor | None = None, n_scale: torch.Tensor | None = None,
         low: torch.Tensor | None = None, right: torch.Tensor | None = None, g: torch.Tensor | None = None,
         scale: float = 1.0, dropout_p: float = 0.0, seed: torch.Tensor | None = None, threshold: int = 0,
         reduce_z: torch.Tensor | None = None, zp: torch.Tensor | None = None,
         x: torch.Tensor | None = None, grads: torch.Tensor | None = None, grad_a_at: int = 0,
         u: torch.Tensor | None = None, grad_g_at: int = 0, splits: int = 1) -> None:
    """out = ((a_op (M, K) diag(k_scale)) @ b_op (K, N) + bias + keep ⊙ scale ((low ⊙ g) @ right) / (1-p))
    ⊙ n_scale, ``out`` (M, N) any strides (None: not stored). Every tensor the kernel gets is the
    caller's: nothing is allocated here (a launch plan can name it).

    - ``low`` (M, r), ``right`` (r, N), ``g`` (r,): the rank-r term; with dropout_p > 0 the keep
      mask is the one of element (m, n) of an (M, N) input (``seed``: the 0-dim int64 device tensor).
    - ``reduce_z`` (M, N) with ``zp``: Σ_m (the sum before the column scale) ⊙ z as partial sums
      in ``zp``, contiguous fp32 (cdiv(M, reduce_block_m(dtype)), N), every row written: sum them
      with triton/partials.py (in order: deterministic).
    - ``x`` (M, N) with ``grads``, a contiguous fp32 (splits, L) workspace (splits =
      row_splits(M, N, …)): s (low ⊙ g)ᵀ drop(x) as one partial sum per row, an (r, N) block at
      element ``grad_a_at`` of the row. With ``u`` (M, r) also s Σ_m u ⊙ low (SiVA's grad_g,
      low = v), r elements at ``grad_g_at``.
    - ``a_op`` = ``b_op`` = None: no dense product (K = 0): ``out`` gets bias + the rank-r term
      alone, for cuBLAS to add a_op @ b_op into afterwards with beta = 1 (``out.addmm_``)."""
    if a_op is None:
        if out is None or low is None:
            raise ValueError("gemm: without a dense product, out and the rank-r term are needed")
        a_op = b_op = out               # placeholders: K = 0, never read; their dtype is out's
        M, K, N = out.shape[0], 0, out.shape[1]
    else:
        M, K = a_op.shape
        N = b_op.shape[1]
    if out is None and zp is None and grads is None:
        raise ValueError("gemm: nothing to compute (no out, no reduction, no grad_A)")
    if grads is not None and (low is None or x is None):
        raise ValueError("gemm: grad_A needs the rank-r term (low, right) and x")
    if u is not None and grads is None:
        raise ValueError("gemm: grad_g rides on the grad_A variant (pass x and grads)")
    R = low.shape[1] if low is not None else 0
    if zp is not None and tuple(zp.shape) != ((row_blocks := cdiv(M, reduce_block_m(a_op.dtype))), N):
        raise ValueError(f"gemm: the reduction workspace must be (row blocks {row_blocks}, N={N}), "
                         f"got {tuple(zp.shape)}")
    # fp32 operands go to FMA (no tensor cores): plain loads, no flattened tile loop (with either,
    # ptxas of Triton 3.8 spilled 4-6 KB per thread on sm_90)
    tma = _has_tma(device_index(a_op)) and a_op.dtype != torch.float32
    b_kmajor = b_op.stride(0) == 1 and b_op.stride(1) != 1
    a_tma = tma and K > 0 and tma_ok(a_op)
    b_tma = tma and K > 0 and tma_ok(b_op, k_major=b_kmajor)
    c_tma = tma and out is not None and tma_ok(out)
    sms = num_sms(device_index(a_op))
    if grads is not None:
        grid = lambda meta: (min(sms, cdiv(N, meta["BLOCK_N"]) * splits),)
        variant = "grad_a"
    else:
        grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
        variant = ("reduce" if zp is not None
                   else "out32" if out.dtype == torch.float32 and a_op.dtype != torch.float32 else "plain")
    launch(_AUTOTUNED[(a_op.dtype == torch.float32, variant)])[grid](
        a_op, b_op, out, bias, k_scale, n_scale, low, right, g, reduce_z, zp, x if grads is not None else None,
        grads, u, seed,
        M, N, K, R, next_pow2(M), splits, grads.stride(0) if grads is not None else 0, grad_a_at, grad_g_at,
        a_op.stride(0), a_op.stride(1), b_op.stride(0), b_op.stride(1),
        *(out.stride() if out is not None else (0, 0)), *(low.stride() if low is not None else (0, 0)),
        *(right.stride() if right is not None else (0, 0)), *(reduce_z.stride() if reduce_z is not None else (0, 0)),
        *(x.stride() if grads is not None else (0, 0)),
        scale, threshold, 1.0 / (1.0 - dropout_p),
        A_TMA=a_tma, B_TMA=b_tma, B_KMAJOR=b_kmajor, C_TMA=c_tma,
        HAS_BIAS=bias is not None, K_SCALE=k_scale is not None, N_SCALE=n_scale is not None,
        LOWRANK=low is not None, HAS_G=g is not None, HAS_DROPOUT=dropout_p > 0, REDUCE_Z=zp is not None,
        STORE_C=out is not None, GRAD_A=grads is not None, GRAD_G=u is not None, R_PAD=rank_pad(R) if R else 16,
        UPCAST=upcast_dot(a_op.dtype), INPUT_PRECISION=input_precision(a_op.dtype), NUM_SMS=sms,
        FLATTEN=a_op.dtype != torch.float32 and K > 0)
