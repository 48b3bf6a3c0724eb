"""Triton kernels of (IA)³: learned per-feature scales on a linear layer's output or input, and on
an activation.

Output side (keys, values)      y = (x Wᵀ + b) ⊙ l            x (T, K), W (N, K), l (N,)
Input side (gated MLP's down)   y = (x ⊙ l) Wᵀ + b            l (K,)
Scaled activation (FFN)         y = act(h) ⊙ l                h (T, F), l (F,)

``gemm_scaled`` is one GEMM with optional scales folded in: a per-reduction-index scale on the
B operand's rows inside the K loop, and in the epilogue bias, a per-column scale and a reduction
Σ_rows acc ⊙ Z (atomics into fp32). It serves four products:
    output side forward:  y  = (x @ Wᵀ + b) ⊙ l                   (column scale in the epilogue)
    output side dx:       dx = dy @ (diag(l) W)                    (l scales W's rows in the K loop)
    input side forward:   y  = x @ (diag(l) Wᵀ) + b                (l scales Wᵀ's rows in the K loop)
    input side dx:        g = dy @ W; dx = g ⊙ l; grad_l = Σ_t x ⊙ g   (epilogue, one pass)
``ia3_out_grads``: the output side's grad_l = Σ_t dy ⊙ z (z = x Wᵀ + b) from one pass over dy and
the saved output y (= z ⊙ l, the tensor the next layer holds anyway): Σ_t dy ⊙ y, divided by l
per column. A column block where some l is exactly 0 (y carries no z there) recomputes its z
tiles from x and W inside the kernel; the branch is taken on the device, no host sync.
``scaled_act_fwd`` / ``scaled_act_bwd``: one elementwise pass each; backward recomputes act(h)
and act'(h) from h (the only activation saved) and reduces grad_l over tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    cdiv,
    device_index,
    gemm_configs,
    grouped_tile,
    input_precision,
    mma,
    next_pow2,
    num_sms,
    upcast_dot,
)
from ._launcher import launch

# ---------------------------------------------------------------------------------------------
# the GEMM with scales
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "K_SCALE", "N_SCALE", "REDUCE_Z"],
                 reset_to_zero=["gl_ptr"])
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k64 = offs_k.to(tl.int64)   # int64 address products: K·stride may pass 2**31
        k_mask = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k64[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + k64[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if K_SCALE:   # diag(ks) B: the (BLOCK_K, BLOCK_N) tile's rows, in the operands' dtype
            ks = tl.load(ks_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * ks[:, None]).to(b_ptr.dtype.element_ty)
        acc = mma(a, b, acc, UPCAST, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tile_mask = m_mask[:, None] & n_mask[None, :]
    if REDUCE_Z:   # gl[n] += Σ_m acc[m, n] · z[m, n], before the column scale
        z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn, mask=tile_mask, other=0.0)
        tl.atomic_add(gl_ptr + offs_n, tl.sum(acc * z.to(tl.float32), axis=0), mask=n_mask)
    if N_SCALE:
        acc = acc * tl.load(ns_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_C:
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=tile_mask)


def gemm_scaled(a_op: torch.Tensor, b_op: torch.Tensor, bias: torch.Tensor | None = None,
                k_scale: torch.Tensor | None = None, n_scale: torch.Tensor | None = None,
                reduce_z: torch.Tensor | None = None, store_c: bool = True):
    """C = ((a_op (M, K) @ (diag(k_scale) b_op (K, N))) + bias) ⊙ n_scale, in a_op's dtype.

    With ``reduce_z`` (an (M, N) tensor) also returns gl = Σ_m (a_op @ diag(k_scale) b_op + bias) ⊙ z
    as fp32 (N,), taken before the column scale. Any strides. Returns (C or None, gl or None).
    """
    M, K = a_op.shape
    N = b_op.shape[1]
    c = torch.empty((M, N), device=a_op.device, dtype=a_op.dtype) if store_c else \
        torch.empty((1, 1), device=a_op.device, dtype=a_op.dtype)
    gl = torch.zeros(N, device=a_op.device, dtype=torch.float32) if reduce_z is not None else None
    z = reduce_z if reduce_z is not None else c
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    launch(_gemm_scaled_kernel)[grid](
        a_op, b_op, c, bias if bias is not None else c, k_scale if k_scale is not None else c,
        n_scale if n_scale is not None else c, z, gl if gl is not None else torch.empty(1, device=c.device),
        M, N, K, next_pow2(M),
        a_op.stride(0), a_op.stride(1), b_op.stride(0), b_op.stride(1), c.stride(0), c.stride(1),
        z.stride(0), z.stride(1),
        HAS_BIAS=bias is not None, K_SCALE=k_scale is not None, N_SCALE=n_scale is not None,
        REDUCE_Z=reduce_z is not None, STORE_C=store_c,
        UPCAST=upcast_dot(a_op.dtype), INPUT_PRECISION=input_precision(a_op.dtype))
    return (c if store_c else None), gl


# ---------------------------------------------------------------------------------------------
# output side backward: one pass over dy and y for grad_l and grad_bias
# ---------------------------------------------------------------------------------------------


def _splits(t_blocks: int, col_blocks: int, sms: int) -> int:
    """Token splits so that about two programs run per SM (each split's partial sums are atomic)."""
    return max(1, min(t_blocks, cdiv(2 * sms, col_blocks)))


@triton.jit
def _ia3_out_grad_kernel(dy_ptr, y_ptr, l_ptr, x_ptr, w_ptr, b_ptr, gbias_ptr, gl_ptr,
                         T, N, K, rows_per_split,
                         stride_dyt, stride_dyn, stride_yt, stride_yn, stride_xt, stride_xk, stride_wn, stride_wk,
                         HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, ATOMIC: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    n_mask = offs_n < N
    lv = tl.load(l_ptr + offs_n, mask=n_mask, other=1.0)
    has_zero = tl.sum((lv == 0).to(tl.int32), axis=0) > 0
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)     # Σ_t dy ⊙ y
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)     # Σ_t dy ⊙ z, only where this block has an l == 0
    sdy = tl.zeros((BLOCK_N,), dtype=tl.float32)    # Σ_t dy
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        mask = (offs_t < t_end)[:, None] & n_mask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn, mask=mask, other=0.0)
        s1 += tl.sum(dy * y.to(tl.float32), axis=0)
        if NEED_DB:
            sdy += tl.sum(dy, axis=0)
        if has_zero:   # rare: recompute this (BLOCK_T, BLOCK_N) tile of z = x Wᵀ + b
            z = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k64 = offs_k.to(tl.int64)   # int64 address products: K·stride may pass 2**31
                k_mask = offs_k < K
                xt = tl.load(x_ptr + rows[:, None] * stride_xt + k64[None, :] * stride_xk,
                             mask=(offs_t < t_end)[:, None] & k_mask[None, :], other=0.0)
                wt = tl.load(w_ptr + cols[None, :] * stride_wn + k64[:, None] * stride_wk,
                             mask=n_mask[None, :] & k_mask[:, None], other=0.0)        # Wᵀ tile (BLOCK_K, BLOCK_N)
                z = mma(xt, wt, z, UPCAST, INPUT_PRECISION)
            if HAS_BIAS:
                z += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            s2 += tl.sum(dy * z, axis=0)
    # this program's share of grad_l = Σ_t dy ⊙ z (= Σ_t dy ⊙ y / l where l != 0) and of
    # grad_b = l ⊙ Σ_t dy: both linear in the partial sums, so the shares add up atomically
    lf = lv.to(tl.float32)
    gl = tl.where(lf != 0, s1 / tl.where(lf != 0, lf, 1.0), s2)
    if ATOMIC:
        tl.atomic_add(gl_ptr + offs_n, gl, mask=n_mask)
        if NEED_DB:
            tl.atomic_add(gbias_ptr + offs_n, sdy * lf, mask=n_mask)
    else:
        tl.store(gl_ptr + offs_n, gl, mask=n_mask)
        if NEED_DB:
            tl.store(gbias_ptr + offs_n, sdy * lf, mask=n_mask)


def ia3_out_grads(dy, y, l, x, weight, bias, need_grad_bias: bool):
    """For y = (x Wᵀ + b) ⊙ l: grad_l = Σ_t dy ⊙ (x Wᵀ + b) and grad_b = l ⊙ Σ_t dy, as fp32 (N,).

    Reads dy and y once; x and W only in column blocks where some l[n] == 0."""
    T, N = dy.shape
    K = x.shape[1]
    if INTERPRET:
        block_t, block_n, block_k, warps = 16, 32, 32, 4
    else:
        block_t, block_n, block_k, warps = 32, 128, 64, 4
    n_blocks = cdiv(N, block_n)
    t_blocks = cdiv(T, block_t)
    splits = _splits(t_blocks, n_blocks, num_sms(device_index(dy)))
    rows_per_split = cdiv(t_blocks, splits) * block_t
    splits = cdiv(T, rows_per_split)
    atomic = splits > 1
    alloc = torch.zeros if atomic else torch.empty
    f32 = dict(device=dy.device, dtype=torch.float32)
    grad_l = alloc(N, **f32)
    grad_bias = alloc(N, **f32) if need_grad_bias else None
    launch(_ia3_out_grad_kernel)[(n_blocks, splits)](
        dy, y, l, x, weight, bias if bias is not None else l, grad_bias if need_grad_bias else grad_l, grad_l,
        T, N, K, rows_per_split,
        dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, NEED_DB=need_grad_bias, ATOMIC=atomic,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)
    return grad_l, grad_bias


# ---------------------------------------------------------------------------------------------
# scaled activation: y = act(h) ⊙ l
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@triton.jit
def _act_and_grad(h, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(h), act'(h)) in fp32 for h fp32; act'(h) is 0 when NEED_GRAD is off."""
    d = tl.zeros_like(h)
    if ACT == 0:      # exact GELU: h Φ(h)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        a = h * cdf
        if NEED_GRAD:
            d = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 1:    # tanh GELU: 0.5 h (1 + tanh(c (h + 0.044715 h³)))
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        th = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        a = 0.5 * h * (1.0 + th)
        if NEED_GRAD:
            d = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
    elif ACT == 2:    # ReLU
        a = tl.maximum(h, 0.0)
        if NEED_GRAD:
            d = tl.where(h > 0, 1.0, 0.0)
    else:             # SiLU: h σ(h)
        sig = 1.0 / (1.0 + tl.exp(-h))
        a = h * sig
        if NEED_GRAD:
            d = sig * (1.0 + h * (1.0 - sig))
    return a, d


@triton.jit
def _scaled_act_fwd_kernel(h_ptr, l_ptr, y_ptr, T, F, stride_ht, stride_hf,
                           ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rows = offs_t.to(tl.int64)
    cols = offs_f.to(tl.int64)     # int64 address products: F·stride_hf may pass 2**31 (a transposed h)
    f_mask = offs_f < F
    mask = (offs_t < T)[:, None] & f_mask[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_ht + cols[None, :] * stride_hf, mask=mask, other=0.0)
    a, _ = _act_and_grad(h.to(tl.float32), ACT, False)
    lv = tl.load(l_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * F + offs_f[None, :], (a * lv[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_act_bwd_kernel(dy_ptr, h_ptr, l_ptr, dh_ptr, gl_ptr, T, F, rows_per_split,
                           stride_dyt, stride_dyf, stride_ht, stride_hf,
                           ACT: tl.constexpr, NEED_DH: tl.constexpr, NEED_GL: tl.constexpr, ATOMIC: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    cols = offs_f.to(tl.int64)     # int64 address products: F·stride may pass 2**31 (a transposed h or dy)
    f_mask = offs_f < F
    lv = tl.load(l_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    gl = tl.zeros((BLOCK_F,), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = offs_t.to(tl.int64)
        mask = (offs_t < t_end)[:, None] & f_mask[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_ht + cols[None, :] * stride_hf, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dyt + cols[None, :] * stride_dyf, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        a, d = _act_and_grad(h.to(tl.float32), ACT, NEED_DH)
        if NEED_DH:
            tl.store(dh_ptr + rows[:, None] * F + offs_f[None, :], (dy * lv[None, :] * d).to(dh_ptr.dtype.element_ty),
                     mask=mask)
        if NEED_GL:
            gl += tl.sum(tl.where(mask, dy * a, 0.0), axis=0)
    if NEED_GL:
        if ATOMIC:
            tl.atomic_add(gl_ptr + offs_f, gl, mask=f_mask)
        else:
            tl.store(gl_ptr + offs_f, gl, mask=f_mask)


def _act_blocks():
    return (16, 32, 4) if INTERPRET else (32, 128, 4)


def scaled_act_fwd(h: torch.Tensor, l: torch.Tensor, act: str) -> torch.Tensor:
    """act(h) ⊙ l for h (T, F) (any strides); a new contiguous tensor in h's dtype."""
    T, F = h.shape
    y = torch.empty((T, F), device=h.device, dtype=h.dtype)
    block_t, block_f, warps = _act_blocks()
    launch(_scaled_act_fwd_kernel)[(cdiv(T, block_t), cdiv(F, block_f))](
        h, l, y, T, F, h.stride(0), h.stride(1), ACT=ACTIVATIONS[act], BLOCK_T=block_t, BLOCK_F=block_f,
        num_warps=warps)
    return y


def scaled_act_bwd(dy: torch.Tensor, h: torch.Tensor, l: torch.Tensor, act: str, need_dh: bool, need_gl: bool):
    """dh = dy ⊙ l ⊙ act'(h) (h's dtype) and grad_l = Σ_t dy ⊙ act(h) (fp32), one pass over dy and h."""
    T, F = h.shape
    block_t, block_f, warps = _act_blocks()
    f_blocks = cdiv(F, block_f)
    t_blocks = cdiv(T, block_t)
    # dh is elementwise: split tokens enough to fill the GPU; grad_l partials then go atomic
    splits = max(1, min(t_blocks, cdiv(8 * num_sms(device_index(h)), f_blocks)))
    rows_per_split = cdiv(t_blocks, splits) * block_t
    splits = cdiv(T, rows_per_split)
    atomic = splits > 1
    dh = torch.empty((T, F), device=h.device, dtype=h.dtype) if need_dh else None
    gl = (torch.zeros if atomic else torch.empty)(F, device=h.device, dtype=torch.float32) if need_gl else None
    launch(_scaled_act_bwd_kernel)[(f_blocks, splits)](
        dy, h, l, dh if dh is not None else h, gl if gl is not None else l, T, F, rows_per_split,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
        ACT=ACTIVATIONS[act], NEED_DH=need_dh, NEED_GL=need_gl, ATOMIC=atomic,
        BLOCK_T=block_t, BLOCK_F=block_f, num_warps=warps)
    return dh, gl
