"""Triton kernels of the k-LST ladder cross-attention with the K/V projections fused in:

    K_j = C_j W_kᵀ,  V_j = C_j W_vᵀ                        C (k, T, D), W_k, W_v (D, D), D = h·d_h
    p_{t,h,j} = softmax_j( scale · q_{t,h} · K_{j,t,h} )     per token t and head h, over the k layers
    o_{t,h}   = Σ_j p_{t,h,j} V_{j,t,h}

The projected keys / values (k×T×D each) never reach memory: every program projects its token
block's C_j tile on the fly, forward and backward.

Programs: one per (block of BLOCK_T tokens, group of G whole heads); a group spans columns
[g·G·d_h, (g+1)·G·d_h) of D, padded to BLOCK_N (a power of two). Per-head sums over the d_h
columns of a head (q·K) and the broadcast of a per-head value back over its columns are dots
with a 0/1 matrix E (BLOCK_N, H_PAD), E[n, hh] = [n // d_h == hh], so any d_h works.
The projections reduce over D in chunks of BLOCK_C, so tiles stay bounded for any D.

Forward, one launch (``_fwd_kernel``): online softmax over j; writes o (T, D) and the per-head
log-sum-exp lse (T, h) in fp32: all that backward needs besides its inputs.
Backward, two launches:
  ``_bwd_kernel``  per token block and head group, pass 1 recomputes K_j, V_j and p_j (from lse)
                   and gives dq and delta = Σ_j p_j dP_j in fp32; pass 2 (no projections) gives
                   dS_j = p_j (dP_j − delta) and dC_j = dK_j W_k + dV_j W_v (dK_j = scale·dS_j⊗q,
                   dV_j = p_j⊗dO). p_j and dS_j go to (k, T, h) fp32 buffers for the next launch:
                   h numbers per token and layer instead of D (dK_j, dV_j are never stored).
  ``_dw_kernel``   dW_k = Σ_{j,t} dK_{j,t}ᵀ (C_{j,t} − C_{0,t}) (= Σ dKᵀ C, since Σ_j dK_j = 0; the
                   difference keeps the shared part of alike ladders out of the bf16 dots) and
                   dW_v = Σ_{j,t} dV_{j,t}ᵀ C_{j,t}: GEMMs reducing over tokens (and j inside), dK / dV
                   rebuilt from (dS, q) / (p, dO) on load; token splits write fp32 partials.
With several head groups (dC) or token splits (dW), the partials are summed in order by
triton/partials.py: no atomics, no memset, the same bits every call.
Biases of the K / V projections are not needed: q·b_k is constant over j (softmax ignores it) and
b_v passes straight to the output (the caller's output projection's bias absorbs it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, device_index, input_precision, mma, next_pow2, num_sms, split_rows, upcast_dot
from ._launcher import launch
from .partials import sum_partials


@triton.jit
def _head_matrix(DH, G, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr):
    """E (BLOCK_N, H_PAD) fp32: 1 where column n belongs to local head hh (n < G·d_h)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, H_PAD)
    e = ((offs_n[:, None] // DH) == offs_h[None, :]) & (offs_n[:, None] < G * DH)
    return e.to(tl.float32)


@triton.jit
def _project(c_ptr, w_ptr, j, rows, t_mask, col0, n_mask, offs_n, D,
             stride_ck, stride_ct, stride_cd, stride_w0, stride_w1,
             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
             UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """C_j[rows] @ W[col0 + offs_n, :]ᵀ -> (BLOCK_T, BLOCK_N) fp32, reducing over D in chunks (j: an
    int64 scalar, so that j·stride_ck cannot wrap)."""
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    cols = (col0 + offs_n).to(tl.int64)
    for c0 in range(0, D, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < D
        c = tl.load(c_ptr + j * stride_ck + rows[:, None] * stride_ct + offs_c[None, :] * stride_cd,
                    mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_w0 + offs_c[:, None] * stride_w1,
                      mask=n_mask[None, :] & c_mask[:, None], other=0.0).to(c_ptr.dtype.element_ty)  # Wᵀ tile
        acc = mma(c, w_t, acc, UPCAST, INPUT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(q_ptr, c_ptr, wk_ptr, wv_ptr, o_ptr, lse_ptr,
                T, D, H, NK, DH, G, scale,
                stride_qt, stride_qd, stride_ck, stride_ct, stride_cd,
                stride_wk0, stride_wk1, stride_wv0, stride_wv1, stride_ot, stride_od,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, H_PAD: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = offs_t.to(tl.int64)
    t_mask = offs_t < T
    col0 = pid_g * G * DH
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = (offs_n < G * DH) & (col0 + offs_n < D)
    tn_mask = t_mask[:, None] & n_mask[None, :]
    E = _head_matrix(DH, G, BLOCK_N, H_PAD)
    Et = tl.trans(E)

    q = tl.load(q_ptr + rows[:, None] * stride_qt + (col0 + offs_n)[None, :] * stride_qd,
                mask=tn_mask, other=0.0).to(tl.float32)
    m = tl.full((BLOCK_T, H_PAD), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_T, H_PAD), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, NK):
        j64 = j + tl.full([], 0, tl.int64)     # int64: j·stride_ck and j·T·D may pass 2**31
        kj = _project(c_ptr, wk_ptr, j64, rows, t_mask, col0, n_mask, offs_n, D, stride_ck, stride_ct, stride_cd,
                      stride_wk0, stride_wk1, BLOCK_T, BLOCK_N, BLOCK_C, UPCAST, INPUT_PRECISION)
        s = tl.dot(q * kj, E, input_precision="ieee") * scale                   # (BLOCK_T, H_PAD)
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + p
        m = m_new
        vj = _project(c_ptr, wv_ptr, j64, rows, t_mask, col0, n_mask, offs_n, D, stride_ck, stride_ct, stride_cd,
                      stride_wv0, stride_wv1, BLOCK_T, BLOCK_N, BLOCK_C, UPCAST, INPUT_PRECISION)
        acc = acc * tl.dot(alpha, Et, input_precision="ieee") + tl.dot(p, Et, input_precision="ieee") * vj
    denom = tl.dot(l, Et, input_precision="ieee")
    acc = acc / tl.where(denom > 0, denom, 1.0)                                # padded columns: 0, not 0/0
    tl.store(o_ptr + rows[:, None] * stride_ot + (col0 + offs_n)[None, :] * stride_od,
             acc.to(o_ptr.dtype.element_ty), mask=tn_mask)
    offs_h = tl.arange(0, H_PAD)
    heads = pid_g * G + offs_h
    h_mask = t_mask[:, None] & ((offs_h < G) & (heads < H))[None, :]
    tl.store(lse_ptr + rows[:, None] * H + heads[None, :], m + tl.log(l), mask=h_mask)


@triton.jit
def _bwd_kernel(q_ptr, c_ptr, wk_ptr, wv_ptr, do_ptr, lse_ptr,
                dq_ptr, dc_ptr, p_ptr, ds_ptr,
                T, D, H, NK, DH, G, scale,
                stride_qt, stride_qd, stride_ck, stride_ct, stride_cd,
                stride_wk0, stride_wk1, stride_wv0, stride_wv1, stride_dot, stride_dod,
                DC_PARTIAL: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, H_PAD: tl.constexpr,
                UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = offs_t.to(tl.int64)
    t_mask = offs_t < T
    col0 = pid_g * G * DH
    offs_n = tl.arange(0, BLOCK_N)
    cols = (col0 + offs_n).to(tl.int64)
    n_mask = (offs_n < G * DH) & (col0 + offs_n < D)
    tn_mask = t_mask[:, None] & n_mask[None, :]
    E = _head_matrix(DH, G, BLOCK_N, H_PAD)
    Et = tl.trans(E)
    offs_h = tl.arange(0, H_PAD)
    heads = pid_g * G + offs_h
    h_mask = t_mask[:, None] & ((offs_h < G) & (heads < H))[None, :]

    q = tl.load(q_ptr + rows[:, None] * stride_qt + cols[None, :] * stride_qd, mask=tn_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * stride_dot + cols[None, :] * stride_dod, mask=tn_mask,
                 other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows[:, None] * H + heads[None, :], mask=h_mask, other=0.0)
    # pass 1 (projections): p_j, dP_j = dO·V_j per head -> P, DS buffers; delta = Σ_j p_j dP_j in fp32
    # (not dO·o from the rounded output: with similar ladder features dP_j − delta cancels, and a
    # bf16 o would leave only rounding); dq = scale (Σ_j p_j dP_j K_j − delta Σ_j p_j K_j).
    delta = tl.zeros((BLOCK_T, H_PAD), dtype=tl.float32)
    a = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    bk = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, NK):
        j64 = j + tl.full([], 0, tl.int64)     # int64: j·stride_ck and j·T·D may pass 2**31
        kj = _project(c_ptr, wk_ptr, j64, rows, t_mask, col0, n_mask, offs_n, D, stride_ck, stride_ct, stride_cd,
                      stride_wk0, stride_wk1, BLOCK_T, BLOCK_N, BLOCK_C, UPCAST, INPUT_PRECISION)
        vj = _project(c_ptr, wv_ptr, j64, rows, t_mask, col0, n_mask, offs_n, D, stride_ck, stride_ct, stride_cd,
                      stride_wv0, stride_wv1, BLOCK_T, BLOCK_N, BLOCK_C, UPCAST, INPUT_PRECISION)
        s = tl.dot(q * kj, E, input_precision="ieee") * scale
        p = tl.where(h_mask, tl.exp(s - lse), 0.0)
        dp = tl.dot(do * vj, E, input_precision="ieee")
        hp = rows[:, None] * H + heads[None, :] + j64 * T * H
        tl.store(p_ptr + hp, p, mask=h_mask)
        tl.store(ds_ptr + hp, dp, mask=h_mask)
        delta += p * dp
        a += tl.dot(p * dp, Et, input_precision="ieee") * kj
        bk += tl.dot(p, Et, input_precision="ieee") * kj
    dq = (a - tl.dot(delta, Et, input_precision="ieee") * bk) * scale
    tl.debug_barrier()
    # pass 2 (no projections): dS_j = p_j (dP_j − delta) -> DS; dC_j = dK_j W_k + dV_j W_v
    for j in range(0, NK):
        j64 = j + tl.full([], 0, tl.int64)     # int64: j·stride_ck and j·T·D may pass 2**31
        hp = rows[:, None] * H + heads[None, :] + j64 * T * H
        p = tl.load(p_ptr + hp, mask=h_mask, other=0.0)
        ds = p * (tl.load(ds_ptr + hp, mask=h_mask, other=0.0) - delta)
        tl.store(ds_ptr + hp, ds, mask=h_mask)
        dk = (tl.dot(ds, Et, input_precision="ieee") * scale * q).to(c_ptr.dtype.element_ty)    # (BLOCK_T, BLOCK_N)
        dv = (tl.dot(p, Et, input_precision="ieee") * do).to(c_ptr.dtype.element_ty)
        # dC_j[:, chunk] = dK_j W_k[cols, chunk] + dV_j W_v[cols, chunk]
        for c0 in range(0, D, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < D
            wk = tl.load(wk_ptr + cols[:, None] * stride_wk0 + offs_c[None, :] * stride_wk1,
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(c_ptr.dtype.element_ty)
            wv = tl.load(wv_ptr + cols[:, None] * stride_wv0 + offs_c[None, :] * stride_wv1,
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(c_ptr.dtype.element_ty)
            part = mma(dk, wk, tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32), UPCAST, INPUT_PRECISION)
            part = mma(dv, wv, part, UPCAST, INPUT_PRECISION)
            dc_ptrs = dc_ptr + j64 * T * D + rows[:, None] * D + offs_c[None, :]
            if DC_PARTIAL:   # this head group's fp32 partial of dC: its own (k, T, D) block
                dc_ptrs += pid_g.to(tl.int64) * NK * T * D
            tl.store(dc_ptrs, part.to(dc_ptr.dtype.element_ty), mask=t_mask[:, None] & c_mask[None, :])
    tl.store(dq_ptr + rows[:, None] * D + cols[None, :], dq.to(dq_ptr.dtype.element_ty), mask=tn_mask)


@triton.jit
def _dw_kernel(q_ptr, c_ptr, do_ptr, p_ptr, ds_ptr, dwk_ptr, dwv_ptr,
               T, D, H, NK, DH, scale, rows_per_split,
               stride_qt, stride_qd, stride_ck, stride_ct, stride_cd, stride_dot, stride_dod,
               PARTIAL: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
               UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    o_mask = offs_o < D
    i_mask = offs_i < D
    head_o = offs_o // DH
    acc_k = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_R):
        t = (t0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_mask = t < t_end
        ri_mask = r_mask[:, None] & i_mask[None, :]
        ro_mask = r_mask[:, None] & o_mask[None, :]
        q = tl.load(q_ptr + t[:, None] * stride_qt + offs_o[None, :] * stride_qd, mask=ro_mask, other=0.0)
        do = tl.load(do_ptr + t[:, None] * stride_dot + offs_o[None, :] * stride_dod, mask=ro_mask, other=0.0)
        q = q.to(tl.float32) * scale
        do = do.to(tl.float32)
        c_rows = c_ptr + t[:, None] * stride_ct + offs_i[None, :] * stride_cd
        c0 = tl.load(c_rows, mask=ri_mask, other=0.0)
        c0f = c0.to(tl.float32)
        for j in range(0, NK):
            j64 = j + tl.full([], 0, tl.int64)     # int64: j·stride_ck and j·T·D may pass 2**31
            c = tl.load(c_rows + j64 * stride_ck, mask=ri_mask, other=0.0)
            hp = (t[:, None] + j64 * T) * H + head_o[None, :]
            p = tl.load(p_ptr + hp, mask=ro_mask, other=0.0)
            dv = (p * do).to(c_ptr.dtype.element_ty)                               # (BLOCK_R, BLOCK_O)
            acc_v = mma(tl.trans(dv), c, acc_v, UPCAST, INPUT_PRECISION)
            if j > 0:
                # Σ_j dK_j = 0 per token, so dW_k = Σ_j dK_jᵀ (C_j − C_0): the part of C the k layers
                # share cancels exactly instead of in low-precision dots
                ds = tl.load(ds_ptr + hp, mask=ro_mask, other=0.0)
                dk = (ds * q).to(c_ptr.dtype.element_ty)
                cd = (c.to(tl.float32) - c0f).to(c_ptr.dtype.element_ty)
                acc_k = mma(tl.trans(dk), cd, acc_k, UPCAST, INPUT_PRECISION)
    w_offs = offs_o[:, None].to(tl.int64) * D + offs_i[None, :]
    w_mask = o_mask[:, None] & i_mask[None, :]
    if PARTIAL:     # this token split's row of the (splits, 2·D·D) workspace: [dW_k | dW_v]
        row = dwk_ptr + pid_s.to(tl.int64) * 2 * D * D
        tl.store(row + w_offs, acc_k, mask=w_mask)
        tl.store(row + D * D + w_offs, acc_v, mask=w_mask)
    else:
        tl.store(dwk_ptr + w_offs, acc_k.to(dwk_ptr.dtype.element_ty), mask=w_mask)
        tl.store(dwv_ptr + w_offs, acc_v.to(dwv_ptr.dtype.element_ty), mask=w_mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _tiles(D: int, H: int):
    """Heads per program G, its padded width BLOCK_N, H_PAD, BLOCK_C, BLOCK_T and warps."""
    dh = D // H
    cap = 16 if INTERPRET else 128          # small groups under the interpreter: exercises the dC partials
    g = max(1, min(H, cap // dh))
    block_n = max(16, next_pow2(g * dh))
    h_pad = max(16, next_pow2(g))
    if INTERPRET:
        return g, block_n, h_pad, 16, 16, 4
    block_c = min(64, max(16, next_pow2(D)))
    block_t = 64 if block_n <= 64 else 32
    warps = 4 if block_n <= 64 else 8
    return g, block_n, h_pad, block_c, block_t, warps


def forward(q: torch.Tensor, c: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, num_heads: int, scale: float):
    """q (T, D), c (k, T, D) any strides, wk / wv (D, D). Returns o (T, D) in q's dtype, lse (T, h) fp32."""
    NK, T, D = c.shape
    H = num_heads
    g, block_n, h_pad, block_c, block_t, warps = _tiles(D, H)
    o = torch.empty((T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((T, H), device=q.device, dtype=torch.float32)
    grid = (cdiv(T, block_t), cdiv(H, g))
    launch(_fwd_kernel)[grid](q, c, wk, wv, o, lse, T, D, H, NK, D // H, g, scale,
                      q.stride(0), q.stride(1), c.stride(0), c.stride(1), c.stride(2),
                      wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1), o.stride(0), o.stride(1),
                      BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_C=block_c, H_PAD=h_pad,
                      UPCAST=upcast_dot(c.dtype), INPUT_PRECISION=input_precision(c.dtype), num_warps=warps)
    return o, lse


def backward(do, q, c, wk, wv, lse, num_heads: int, scale: float, need_dw: bool):
    """Returns dq (T, D), dc (k, T, D) in q's dtype and dW_k, dW_v (D, D) fp32 (None unless need_dw)."""
    NK, T, D = c.shape
    H = num_heads
    g, block_n, h_pad, block_c, block_t, warps = _tiles(D, H)
    groups = cdiv(H, g)
    dc_partial = groups > 1          # head groups each write their part of dC_j, summed in order
    dq = torch.empty((T, D), device=q.device, dtype=q.dtype)
    dc = torch.empty((NK, T, D), device=q.device, dtype=c.dtype)
    dc_parts = torch.empty((groups, NK, T, D), device=q.device, dtype=torch.float32) if dc_partial else None
    p = torch.empty((NK, T, H), device=q.device, dtype=torch.float32)
    ds = torch.empty((NK, T, H), device=q.device, dtype=torch.float32)
    launch(_bwd_kernel)[(cdiv(T, block_t), groups)](
        q, c, wk, wv, do, lse, dq, dc_parts if dc_partial else dc, p, ds, T, D, H, NK, D // H, g, scale,
        q.stride(0), q.stride(1), c.stride(0), c.stride(1), c.stride(2),
        wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1),
        do.stride(0), do.stride(1), DC_PARTIAL=dc_partial,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_C=block_c, H_PAD=h_pad,
        UPCAST=upcast_dot(c.dtype), INPUT_PRECISION=input_precision(c.dtype), num_warps=warps)
    if dc_partial:
        sum_partials(dc_parts.view(groups, -1), dc)
    dwk = dwv = None
    if need_dw:
        if INTERPRET:
            block_o = block_i = block_r = 16
            warps = 4
        else:
            block_o = block_i = min(64, max(16, next_pow2(D)))
            block_r, warps = 64, 4
        tiles = cdiv(D, block_o) * cdiv(D, block_i)
        r_blocks = cdiv(T, block_r)
        # split the tokens so that about two programs run per SM; each split writes fp32 partials,
        # summed in order (triton/partials.py)
        splits = max(1, min(r_blocks, (2 * num_sms(device_index(c))) // tiles))
        rows_per_split = split_rows(T, splits, block_r)
        splits = cdiv(T, rows_per_split)
        dwk = torch.empty((D, D), device=q.device, dtype=torch.float32)
        dwv = torch.empty((D, D), device=q.device, dtype=torch.float32)
        ws = torch.empty((splits, 2 * D * D), device=q.device, dtype=torch.float32) if splits > 1 else None
        launch(_dw_kernel)[(cdiv(D, block_o), cdiv(D, block_i), splits)](
            q, c, do, p, ds, ws if ws is not None else dwk, dwv, T, D, H, NK, D // H, scale, rows_per_split,
            q.stride(0), q.stride(1), c.stride(0), c.stride(1), c.stride(2), do.stride(0), do.stride(1),
            PARTIAL=ws is not None, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_R=block_r,
            UPCAST=upcast_dot(c.dtype), INPUT_PRECISION=input_precision(c.dtype), num_warps=warps)
        if ws is not None:
            sum_partials(ws, dwk, dwv)
    return dq, dc, dwk, dwv
