"""Triton kernels of the Kronecker adapter (KronA) term, by the vec trick, never forming A ⊗ B:

    y[t] += s · x[t] (A ⊗ B)ᵀ   ⇔   Y_t = s · A X_t Bᵀ      A (a1, a2), B (b1, b2)

where X_t is token t's row of x (K = a2·b2) read as an (a2, b2) matrix and Y_t its (a1, b1)
output block (N = a1·b1), both row-major views of the same memory: no reshape copies.

``kron_apply``   out_t += s · L In_t Rᵀ, accumulated in place into ``out`` (the base GEMM's
                 output, or dx), so no T×N temporary exists. Forward: In = x, L = A, R = B.
                 dx: In = dy, L = Aᵀ, R = Bᵀ (dX_t = Aᵀ dY_t B); Aᵀ and Bᵀ are stride views.
``kron_grad_a``  grad_A = s Σ_t dY_t (X_t Bᵀ)ᵀ                  (a1, a2), fp32
``kron_grad_b``  grad_B = s Σ_t dY_tᵀ (A X_t)                   (b1, b2), fp32
Each program owns a strip of tokens and a block of output columns; it holds L (or A) in registers
for its whole strip and loops the strip token by token (two small tensor-core dots per token).
Reductions over tokens (grad_A, grad_B) add each program's fp32 partial with atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, device_index, input_precision, mma, next_pow2, num_sms, upcast_dot
from ._launcher import PlanCache, aligned, launch, tensor_key

MAX_SIDE = 256   # sides of A that a program holds whole in registers (padded to a power of two)


def _pad(n: int) -> int:
    return max(16, next_pow2(n))


def check_factor_sides(a1: int, a2: int) -> None:
    if max(a1, a2) > MAX_SIDE:
        raise ValueError(f"kron_linear (triton): factor A is ({a1}, {a2}); the triton kernels hold A whole and "
                         f"need both of its sides <= {MAX_SIDE}. Choose a_shape with smaller sides (B takes the "
                         "rest), or use backend='torch'")


def _blocks():
    # (BLOCK_J, BLOCK_Q, warps): columns of the output block per program, reduction chunk
    return (16, 16, 4) if INTERPRET else (64, 64, 8)


def _token_splits(T: int, col_blocks: int, x: torch.Tensor, per_sm: int = 4) -> tuple[int, int]:
    splits = max(1, min(T, cdiv(per_sm * num_sms(device_index(x)), col_blocks)))
    rows = cdiv(T, splits)
    return cdiv(T, rows), rows


@triton.jit
def _kron_apply_kernel(in_ptr, l_ptr, r_ptr, out_ptr, T, M, P, Q, NN, rows_per_split, scale,
                       stride_it, stride_ik, stride_lm, stride_lp, stride_rj, stride_rq, stride_ot, stride_on,
                       M_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
                       UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_m = tl.arange(0, M_PAD)
    offs_p = tl.arange(0, P_PAD)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_mask = offs_m < M
    p_mask = offs_p < P
    j_mask = offs_j < NN
    lt = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_p[None, :] * stride_lp,
                 mask=m_mask[:, None] & p_mask[None, :], other=0.0).to(in_ptr.dtype.element_ty)  # L (M_PAD, P_PAD)
    # column of out for (i, j): i * NN + j; column of in for (p, q): p * Q + q
    out_cols = (offs_m[:, None] * NN + offs_j[None, :]).to(tl.int64)
    out_mask = m_mask[:, None] & j_mask[None, :]
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t in range(t_start, t_end):
        row = t_start.to(tl.int64) + (t - t_start)   # int64 row (the interpreter passes t as an int)
        pm = tl.zeros((P_PAD, BLOCK_J), dtype=tl.float32)                           # In_t Rᵀ, this j block
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_mask = offs_q < Q
            xin = tl.load(in_ptr + row * stride_it + (offs_p[:, None] * Q + offs_q[None, :]).to(tl.int64) * stride_ik,
                          mask=p_mask[:, None] & q_mask[None, :], other=0.0)        # (P_PAD, BLOCK_Q)
            rt = tl.load(r_ptr + offs_j[None, :] * stride_rj + offs_q[:, None] * stride_rq,
                         mask=j_mask[None, :] & q_mask[:, None], other=0.0).to(in_ptr.dtype.element_ty)  # Rᵀ
            pm = mma(xin, rt, pm, UPCAST, INPUT_PRECISION)
        yt = mma(lt, pm.to(lt.dtype), tl.zeros((M_PAD, BLOCK_J), dtype=tl.float32), UPCAST, INPUT_PRECISION)
        o_ptrs = out_ptr + row * stride_ot + out_cols * stride_on
        prev = tl.load(o_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, (prev + scale * yt).to(out_ptr.dtype.element_ty), mask=out_mask)


def kron_apply(inp: torch.Tensor, lmat: torch.Tensor, rmat: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out[t] += scale · vec(L · In_t · Rᵀ) in place, for inp (T, P·Q) read as In_t (P, Q), L (M, P),
    R (NN, Q), out (T, M·NN) (any strides: a column slice of a wider output works). L and R in any
    float dtype (the master factors): rounded to inp's dtype as they are read."""
    T = inp.shape[0]
    M, P = lmat.shape
    NN, Q = rmat.shape
    check_factor_sides(M, P)
    block_j, block_q, warps = _blocks()
    j_blocks = cdiv(NN, block_j)
    splits, rows = _token_splits(T, j_blocks, inp)
    launch(_kron_apply_kernel)[(splits, j_blocks)](
        inp, lmat, rmat, out, T, M, P, Q, NN, rows, scale,
        inp.stride(0), inp.stride(1), lmat.stride(0), lmat.stride(1), rmat.stride(0), rmat.stride(1),
        out.stride(0), out.stride(1),
        M_PAD=_pad(M), P_PAD=_pad(P), BLOCK_J=block_j, BLOCK_Q=block_q,
        UPCAST=upcast_dot(inp.dtype), INPUT_PRECISION=input_precision(inp.dtype), num_warps=warps)


@triton.jit
def _kron_grad_a_kernel(x_ptr, b_ptr, dy_ptr, ga_ptr, T, A1, A2, B1, B2, rows_per_split, scale,
                        stride_xt, stride_xk, stride_bj, stride_bq, stride_dyt, stride_dyn,
                        A1_PAD: tl.constexpr, A2_PAD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
                        ATOMIC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = tl.arange(0, A1_PAD)
    offs_p = tl.arange(0, A2_PAD)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = offs_i < A1
    p_mask = offs_p < A2
    j_mask = offs_j < B1
    dy_cols = (offs_i[:, None] * B1 + offs_j[None, :]).to(tl.int64)
    acc = tl.zeros((A1_PAD, A2_PAD), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t in range(t_start, t_end):
        row = t_start.to(tl.int64) + (t - t_start)   # int64 row (the interpreter passes t as an int)
        pm = tl.zeros((A2_PAD, BLOCK_J), dtype=tl.float32)                          # X_t Bᵀ, this j block
        for q0 in range(0, B2, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_mask = offs_q < B2
            xt = tl.load(x_ptr + row * stride_xt + (offs_p[:, None] * B2 + offs_q[None, :]).to(tl.int64) * stride_xk,
                         mask=p_mask[:, None] & q_mask[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_j[None, :] * stride_bj + offs_q[:, None] * stride_bq,
                         mask=j_mask[None, :] & q_mask[:, None], other=0.0).to(x_ptr.dtype.element_ty)
            pm = mma(xt, bt, pm, UPCAST, INPUT_PRECISION)
        dyt = tl.load(dy_ptr + row * stride_dyt + dy_cols * stride_dyn,
                      mask=i_mask[:, None] & j_mask[None, :], other=0.0)           # dY_t (A1_PAD, BLOCK_J)
        acc = mma(dyt, tl.trans(pm.to(dyt.dtype)), acc, UPCAST, INPUT_PRECISION)
    ga_ptrs = ga_ptr + offs_i[:, None] * A2 + offs_p[None, :]
    ga_mask = i_mask[:, None] & p_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ga_ptrs, acc * scale, mask=ga_mask)
    else:
        tl.store(ga_ptrs, acc * scale, mask=ga_mask)


def kron_grad_a(x: torch.Tensor, a_shape: tuple[int, int], b: torch.Tensor, dy: torch.Tensor, scale: float,
                ga: torch.Tensor) -> None:
    """Writes grad_A = s Σ_t dY_t (X_t Bᵀ)ᵀ into ``ga``, a zero-filled contiguous fp32 (a1, a2);
    x (T, a2·b2), b (b1, b2) any float dtype, dy (T, a1·b1)."""
    T = x.shape[0]
    a1, a2 = a_shape
    b1, b2 = b.shape
    check_factor_sides(a1, a2)
    block_j, block_q, warps = _blocks()
    j_blocks = cdiv(b1, block_j)
    splits, rows = _token_splits(T, j_blocks, x, per_sm=2)
    atomic = splits * j_blocks > 1
    launch(_kron_grad_a_kernel)[(splits, j_blocks)](
        x, b, dy, ga, T, a1, a2, b1, b2, rows, scale,
        x.stride(0), x.stride(1), b.stride(0), b.stride(1), dy.stride(0), dy.stride(1),
        A1_PAD=_pad(a1), A2_PAD=_pad(a2), BLOCK_J=block_j, BLOCK_Q=block_q, ATOMIC=atomic,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)


@triton.jit
def _kron_grad_b_kernel(x_ptr, a_ptr, dy_ptr, gb_ptr, T, A1, A2, B1, B2, rows_per_split, scale,
                        stride_xt, stride_xk, stride_ai, stride_ap, stride_dyt, stride_dyn,
                        A1_PAD: tl.constexpr, A2_PAD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
                        ATOMIC: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_q = tl.program_id(2)
    offs_i = tl.arange(0, A1_PAD)
    offs_p = tl.arange(0, A2_PAD)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    i_mask = offs_i < A1
    p_mask = offs_p < A2
    j_mask = offs_j < B1
    q_mask = offs_q < B2
    at = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_p[None, :] * stride_ap,
                 mask=i_mask[:, None] & p_mask[None, :], other=0.0).to(x_ptr.dtype.element_ty)  # A, held
    x_cols = (offs_p[:, None] * B2 + offs_q[None, :]).to(tl.int64)
    dy_cols = (offs_i[:, None] * B1 + offs_j[None, :]).to(tl.int64)
    acc = tl.zeros((BLOCK_J, BLOCK_Q), dtype=tl.float32)
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t in range(t_start, t_end):
        row = t_start.to(tl.int64) + (t - t_start)   # int64 row (the interpreter passes t as an int)
        xt = tl.load(x_ptr + row * stride_xt + x_cols * stride_xk, mask=p_mask[:, None] & q_mask[None, :], other=0.0)
        rt = mma(at, xt, tl.zeros((A1_PAD, BLOCK_Q), dtype=tl.float32), UPCAST, INPUT_PRECISION)   # A X_t
        dyt = tl.load(dy_ptr + row * stride_dyt + dy_cols * stride_dyn,
                      mask=i_mask[:, None] & j_mask[None, :], other=0.0)           # dY_t (A1_PAD, BLOCK_J)
        acc = mma(tl.trans(dyt), rt.to(dyt.dtype), acc, UPCAST, INPUT_PRECISION)
    gb_ptrs = gb_ptr + offs_j[:, None] * B2 + offs_q[None, :]
    gb_mask = j_mask[:, None] & q_mask[None, :]
    if ATOMIC:
        tl.atomic_add(gb_ptrs, acc * scale, mask=gb_mask)
    else:
        tl.store(gb_ptrs, acc * scale, mask=gb_mask)


def kron_grad_b(x: torch.Tensor, a: torch.Tensor, b_shape: tuple[int, int], dy: torch.Tensor, scale: float,
                gb: torch.Tensor) -> None:
    """Writes grad_B = s Σ_t dY_tᵀ (A X_t) into ``gb``, a zero-filled contiguous fp32 (b1, b2);
    x (T, a2·b2), a (a1, a2) any float dtype, dy (T, a1·b1)."""
    T = x.shape[0]
    a1, a2 = a.shape
    b1, b2 = b_shape
    check_factor_sides(a1, a2)
    block_j, block_q, warps = _blocks()
    j_blocks, q_blocks = cdiv(b1, block_j), cdiv(b2, block_q)
    splits, rows = _token_splits(T, j_blocks * q_blocks, x, per_sm=2)
    atomic = splits > 1
    launch(_kron_grad_b_kernel)[(splits, j_blocks, q_blocks)](
        x, a, dy, gb, T, a1, a2, b1, b2, rows, scale,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), dy.stride(0), dy.stride(1),
        A1_PAD=_pad(a1), A2_PAD=_pad(a2), BLOCK_J=block_j, BLOCK_Q=block_q, ATOMIC=atomic,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# the op's Kronecker terms per direction, every slice: the launches above, recorded once per
# launch signature and replayed (triton/_launcher.py PlanCache). The base GEMMs are cuBLAS's
# (ops/kron_linear.py); per-slice views are named in env, so a replay passes the new call's.
# ---------------------------------------------------------------------------------------------

_FORWARD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()


def add_terms(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, scale: float,
              offsets) -> None:
    """y[:, o_s : o_s + a1·b1] += s · x (A_s ⊗ B_s)ᵀ for each slice s of A (S, a1, a2), B (S, b1, b2)."""
    n = a.shape[1] * b.shape[1]
    views = [(a[s], b[s], y[:, off:off + n]) for s, off in enumerate(offsets)]
    env = (x, *[t for v in views for t in v])

    def key():
        return (tensor_key(x), tensor_key(a), tensor_key(b), tensor_key(y), scale, tuple(offsets),
                input_precision(x.dtype))

    def body():
        for a_s, b_s, y_s in views:
            kron_apply(x, a_s, b_s, y_s, scale)
    _FORWARD_PLANS.run(key, env, body)


def term_grads(dy: torch.Tensor, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float, offsets,
               dx: torch.Tensor | None, da: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """The Kronecker terms' share of backward, per slice: dx += s Aᵀ dY_t B (dx holds dy Wᵀ already),
    da[s] and db[s] (zeroed fp32) += their grads; a None output is not computed."""
    _, a1, a2 = a.shape
    _, b1, b2 = b.shape
    n = a1 * b1
    views = [(dy[:, off:off + n], a[s], b[s], da[s] if da is not None else None, db[s] if db is not None else None)
             for s, off in enumerate(offsets)]
    transposed = [(a_s.t(), b_s.t()) for _, a_s, b_s, _, _ in views] if dx is not None else []
    env = (dy, x, dx, *[t for v in views for t in v], *[t for v in transposed for t in v])

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(a), tensor_key(b), aligned(dx, da, db), scale,
                tuple(offsets), input_precision(dy.dtype))

    def body():
        for s, (dys, a_s, b_s, da_s, db_s) in enumerate(views):
            if dx is not None:   # dX_t = Aᵀ dY_t B: L = Aᵀ, R = Bᵀ (views)
                kron_apply(dys, *transposed[s], dx, scale)
            if da_s is not None:
                kron_grad_a(x, (a1, a2), b_s, dys, scale, da_s)
            if db_s is not None:
                kron_grad_b(x, a_s, (b1, b2), dys, scale, db_s)
    _BACKWARD_PLANS.run(key, env, body)
