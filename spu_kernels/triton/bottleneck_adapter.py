"""Triton kernels of the bottleneck adapter, y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u (ops/bottleneck_adapter.py).

h (M, d) tokens, W_d (r, d), W_u (d, r), r the bottleneck width, zero-padded to R = rank_pad(r) (a power
of two >= 16) inside the kernels and held in registers: MAX_FUSED_RANK bounds it (the op runs its torch
decomposition beyond).

``_bottleneck_fwd_kernel``, one program per BLOCK_M rows of h: z = h W_dᵀ + b_d (BLOCK_M × R, fp32 accumulator,
K loop over d), stored rounded to h's dtype (the auxiliary kept for backward: the kernel continues
from the rounded z, as an nn.Linear then activation would); a = act(z) stays in registers; then per
output column block y = h + a W_uᵀ + b_u, the residual's h tile read in the epilogue (the same rows
the K loop just read: from L2 on a GPU). No (M × r) activation and no (M × d) intermediate is stored.

``_bottleneck_bwd_kernel``, one program per BLOCK_M rows: g = dy W_u (BLOCK_M × R, loop over d), dz = g ⊙ act'(z)
(act' recomputed from the saved z), then per column block dh = dy + dz W_d. It also writes dz and
act(z) (M × r each, h's dtype) for the weight grads grad_W_d = dzᵀ h and grad_W_u = dyᵀ act(z): those
are reductions over the tokens, left to cuBLAS GEMMs by the op (skinny (r × M)(M × d) products that
a fused token reduction here would not beat), as are the bias grads Σ_t dz and Σ_t dy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, input_precision, mma, rank_pad, upcast_dot
from ._launcher import PlanCache, aligned, launch, tensor_key

MAX_FUSED_RANK = 128
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3}


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(z), act'(z)) in fp32 for z fp32; act'(z) is 0 when NEED_GRAD is off."""
    d = tl.zeros_like(z)
    if ACT == 0:      # ReLU
        a = tl.maximum(z, 0.0)
        if NEED_GRAD:
            d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 1:    # exact GELU: z Φ(z)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        if NEED_GRAD:
            d = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:    # SiLU: z σ(z)
        sig = 1.0 / (1.0 + tl.exp(-z))
        a = z * sig
        if NEED_GRAD:
            d = sig * (1.0 + z * (1.0 - sig))
    else:             # tanh, overflow-safe: sign(z) (1 - e^{-2|z|}) / (1 + e^{-2|z|})
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        a = tl.where(z < 0, -t, t)
        if NEED_GRAD:
            d = 1.0 - a * a
    return a, d


@triton.jit
def _bottleneck_fwd_kernel(h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, z_ptr, M, D, RANK,
                stride_hm, stride_hd, stride_wdr, stride_wdd, stride_wud, stride_wur,
                HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    offs_r = tl.arange(0, R)
    r_mask = offs_r < RANK
    z = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        cols = offs_d.to(tl.int64)
        d_mask = offs_d < D
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hd,
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        wdt = tl.load(wd_ptr + offs_r[None, :] * stride_wdr + cols[:, None] * stride_wdd,
                      mask=r_mask[None, :] & d_mask[:, None], other=0.0).to(ht.dtype)   # W_dᵀ tile (BLOCK_D, R)
        z = mma(ht, wdt, z, UPCAST, INPUT_PRECISION)
    if HAS_BD:
        z += tl.load(bd_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    zs = z.to(z_ptr.dtype.element_ty)                                                 # the saved z, rounded
    tl.store(z_ptr + rows[:, None] * RANK + offs_r[None, :], zs, mask=m_mask[:, None] & r_mask[None, :])
    a, _ = _act_and_grad(zs.to(tl.float32), ACT, False)                               # padded columns: act(0) = 0
    a = a.to(y_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        cols = offs_d.to(tl.int64)
        d_mask = offs_d < D
        wut = tl.load(wu_ptr + cols[None, :] * stride_wud + offs_r[:, None] * stride_wur,
                      mask=d_mask[None, :] & r_mask[:, None], other=0.0).to(a.dtype)    # W_uᵀ tile (R, BLOCK_D)
        acc = mma(a, wut, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, INPUT_PRECISION)
        if HAS_BU:
            acc += tl.load(bu_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & d_mask[None, :]
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hd, mask=mask, other=0.0)
        acc += ht.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bottleneck_bwd_kernel(dy_ptr, z_ptr, wd_ptr, wu_ptr, dh_ptr, dz_ptr, a_ptr, M, D, RANK,
                stride_dym, stride_dyd, stride_wdr, stride_wdd, stride_wud, stride_wur,
                ACT: tl.constexpr, NEED_DH: tl.constexpr, NEED_DZ: tl.constexpr, NEED_A: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    offs_r = tl.arange(0, R)
    r_mask = offs_r < RANK
    mr_mask = m_mask[:, None] & r_mask[None, :]
    zt = tl.load(z_ptr + rows[:, None] * RANK + offs_r[None, :], mask=mr_mask, other=0.0).to(tl.float32)
    a, d = _act_and_grad(zt, ACT, NEED_DH or NEED_DZ)
    if NEED_A:
        tl.store(a_ptr + rows[:, None] * RANK + offs_r[None, :], a.to(a_ptr.dtype.element_ty), mask=mr_mask)
    if NEED_DH or NEED_DZ:
        g = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            cols = offs_d.to(tl.int64)
            d_mask = offs_d < D
            dyt = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyd,
                          mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            wut = tl.load(wu_ptr + cols[:, None] * stride_wud + offs_r[None, :] * stride_wur,
                          mask=d_mask[:, None] & r_mask[None, :], other=0.0).to(dyt.dtype)  # W_u (BLOCK_D, R)
            g = mma(dyt, wut, g, UPCAST, INPUT_PRECISION)
        dz = (g * d).to(dy_ptr.dtype.element_ty)      # rounded to dy's dtype, as the GEMMs then read it
        if NEED_DZ:
            tl.store(dz_ptr + rows[:, None] * RANK + offs_r[None, :], dz, mask=mr_mask)
        if NEED_DH:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                cols = offs_d.to(tl.int64)
                d_mask = offs_d < D
                wdt = tl.load(wd_ptr + offs_r[:, None] * stride_wdr + cols[None, :] * stride_wdd,
                              mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(dz.dtype)  # W_d (R, BLOCK_D)
                acc = mma(dz, wdt, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), UPCAST, INPUT_PRECISION)
                mask = m_mask[:, None] & d_mask[None, :]
                dyt = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=mask, other=0.0)
                acc += dyt.to(tl.float32)
                tl.store(dh_ptr + rows[:, None] * D + cols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)


def _blocks(r_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, warps): the (BLOCK_M × R) bottleneck tile and a (BLOCK_D × R) weight tile
    live in registers, so wide bottlenecks take fewer rows."""
    if INTERPRET:
        return 16, 32, 4
    return (64 if r_pad <= 64 else 32), 64, 4


_PLANS = {name: PlanCache() for name in ("fwd", "bwd")}


def forward(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
            b_up: torch.Tensor | None, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, d) contiguous, z (M, r) contiguous), both in h's dtype; one launch."""
    M, D = h.shape
    rank = w_down.shape[0]
    y = torch.empty((M, D), device=h.device, dtype=h.dtype)
    z = torch.empty((M, rank), device=h.device, dtype=h.dtype)
    r_pad = rank_pad(rank)
    block_m, block_d, warps = _blocks(r_pad)
    env = (h, w_down, b_down, w_up, b_up, y, z)

    def key():
        return (tensor_key(h), tensor_key(w_down), tensor_key(b_down), tensor_key(w_up), tensor_key(b_up),
                aligned(y, z), activation, input_precision(h.dtype))

    def body():
        launch(_bottleneck_fwd_kernel)[(cdiv(M, block_m),)](
            h, w_down, b_down, w_up, b_up, y, z, M, D, rank,
            h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
            HAS_BD=b_down is not None, HAS_BU=b_up is not None, ACT=ACTIVATIONS[activation],
            BLOCK_M=block_m, BLOCK_D=block_d, R=r_pad,
            UPCAST=upcast_dot(h.dtype), INPUT_PRECISION=input_precision(h.dtype), num_warps=warps)
    _PLANS["fwd"].run(key, env, body)
    return y, z


def backward(dy: torch.Tensor, z: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str,
             need_dh: bool, need_dz: bool, need_a: bool):
    """(dh (M, d), dz (M, r), act(z) (M, r)), contiguous in dy's dtype, None where not asked for; one
    launch (none when nothing is asked for)."""
    M, D = dy.shape
    rank = w_down.shape[0]
    dev, dt = dy.device, dy.dtype
    dh = torch.empty((M, D), device=dev, dtype=dt) if need_dh else None
    dz = torch.empty((M, rank), device=dev, dtype=dt) if need_dz else None
    a = torch.empty((M, rank), device=dev, dtype=dt) if need_a else None
    if not (need_dh or need_dz or need_a):
        return dh, dz, a
    r_pad = rank_pad(rank)
    block_m, block_d, warps = _blocks(r_pad)
    env = (dy, z, w_down, w_up, dh, dz, a)

    def key():
        return (tensor_key(dy), tensor_key(z), tensor_key(w_down), tensor_key(w_up), aligned(dh, dz, a), activation,
                input_precision(dt))

    def body():
        launch(_bottleneck_bwd_kernel)[(cdiv(M, block_m),)](
            dy, z, w_down, w_up, dh, dz, a, M, D, rank,
            dy.stride(0), dy.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
            ACT=ACTIVATIONS[activation], NEED_DH=need_dh, NEED_DZ=need_dz, NEED_A=need_a,
            BLOCK_M=block_m, BLOCK_D=block_d, R=r_pad,
            UPCAST=upcast_dot(dt), INPUT_PRECISION=input_precision(dt), num_warps=warps)
    _PLANS["bwd"].run(key, env, body)
    return dh, dz, a
