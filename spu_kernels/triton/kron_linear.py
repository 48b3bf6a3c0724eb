"""Triton kernels of the Kronecker adapter (KronA) term, by the vec trick, never forming A ⊗ B:

    y[t] += s · x[t] (A ⊗ B)ᵀ   ⇔   Y_t = s · A X_t Bᵀ      A (a1, a2), B (b1, b2)

where X_t is token t's row of x (K = a2·b2) read as an (a2, b2) matrix and Y_t its (a1, b1)
output block (N = a1·b1), both row-major views of the same memory: no reshape copies.

``kron_apply``         out_t += s · L In_t Rᵀ, accumulated in place into ``out`` (the base GEMM's
                       output, or dx), so no T×N temporary exists. Forward: In = x, L = A, R = B.
                       dx: In = dy, L = Aᵀ, R = Bᵀ (dX_t = Aᵀ dY_t B), transposed by strides.
``kron_factor_grads``  grad_A = s Σ_t dY_t (X_t Bᵀ)ᵀ (a1, a2) and grad_B = s Σ_t dY_tᵀ (A X_t)
                       (b1, b2) in one launch: per token split one program for grad_A and one per
                       block of grad_B.
Each program owns a strip of tokens; it holds L (or A) in registers for its whole strip and loops
the strip token by token (two small tensor-core dots per token). The reductions over tokens are
deterministic: one split writes the grads in the factors' own dtypes; several write fp32 partial
rows that triton/partials.py adds in order. Stacked factors' slices and output column slices are
reached by element offsets, not views.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, input_precision, mma, next_pow2, rank_pad, token_splits, upcast_dot
from ._launcher import PlanCache, aligned, launch, tensor_key
from .choice import ShapeChoice
from .gemm import gemm
from .partials import sum_partials

MAX_SIDE = 256   # sides of A that a program holds whole in registers (padded to a power of two)


def check_factor_sides(a1: int, a2: int) -> None:
    if max(a1, a2) > MAX_SIDE:
        raise ValueError(f"kron_linear (triton): factor A is ({a1}, {a2}); the triton kernels hold A whole and "
                         f"need both of its sides <= {MAX_SIDE}. Choose a_shape with smaller sides (B takes the "
                         "rest), or use backend='torch'")


def _blocks():
    # (BLOCK_J, BLOCK_Q, warps): columns of the output block per program, reduction chunk
    return (16, 16, 4) if INTERPRET else (64, 64, 8)


@triton.jit
def _kron_apply_kernel(in_ptr, l_ptr, r_ptr, out_ptr, T, M, P, Q, NN, rows_per_split, scale,
                       in_off, l_off, r_off, out_off,
                       stride_it, stride_ik, stride_lm, stride_lp, stride_rj, stride_rq, stride_ot, stride_on,
                       M_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_Q: tl.constexpr,
                       UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # the *_off are element offsets into the operands (a slice's columns, a stacked factor's slice)
    in_ptr += in_off
    l_ptr += l_off
    r_ptr += r_off
    out_ptr += out_off
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


def _factor(t: torch.Tensor, s: int, transpose: bool) -> tuple[int, int, int, int, int]:
    """Slice s of a stacked factor (S, m, p) as (rows, cols, element offset, row stride, col
    stride), transposed by its strides when asked: no view is made."""
    _, m, p = t.shape
    st = t.stride()
    if transpose:
        return p, m, s * st[0], st[2], st[1]
    return m, p, s * st[0], st[1], st[2]


def kron_apply(inp: torch.Tensor, in_col: int, lmat: torch.Tensor, rmat: torch.Tensor, s: int, transposed: bool,
               out: torch.Tensor, out_col: int, scale: float) -> None:
    """out[t, out_col : out_col + M·NN] += scale · vec(L · In_t · Rᵀ) in place, for In_t token t's
    columns [in_col, in_col + P·Q) of inp (T, ·) read as (P, Q), and L, R slice s of the stacked
    factors lmat (S, ·, ·), rmat (S, ·, ·), or their transposes (``transposed``: L = lmatᵀ,
    R = rmatᵀ). Any strides; L and R in any float dtype (the master factors): rounded to inp's
    dtype as they are read."""
    T = inp.shape[0]
    M, P, l_off, s_lm, s_lp = _factor(lmat, s, transposed)
    NN, Q, r_off, s_rj, s_rq = _factor(rmat, s, transposed)
    check_factor_sides(M, P)
    block_j, block_q, warps = _blocks()
    j_blocks = cdiv(NN, block_j)
    splits, rows = token_splits(T, j_blocks, inp, per_sm=4)
    launch(_kron_apply_kernel)[(splits, j_blocks)](
        inp, lmat, rmat, out, T, M, P, Q, NN, rows, scale,
        in_col * inp.stride(1), l_off, r_off, out_col * out.stride(1),
        inp.stride(0), inp.stride(1), s_lm, s_lp, s_rj, s_rq, out.stride(0), out.stride(1),
        M_PAD=rank_pad(M), P_PAD=rank_pad(P), BLOCK_J=block_j, BLOCK_Q=block_q,
        UPCAST=upcast_dot(inp.dtype), INPUT_PRECISION=input_precision(inp.dtype), num_warps=warps)


@triton.jit
def _kron_factor_grads_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr,
                              T, A1, A2, B1, B2, rows_per_split, scale, dy_off, a_off, b_off, ga_off, gb_off,
                              ws_row, q_blocks,
                              stride_xt, stride_xk, stride_dyt, stride_dyn, stride_ai, stride_ap,
                              stride_bj, stride_bq,
                              NEED_GA: tl.constexpr, NEED_GB: tl.constexpr, PARTIAL: tl.constexpr,
                              A1_PAD: tl.constexpr, A2_PAD: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Program (s, 0): grad_A's share of token split s (when NEED_GA); program (s, 1 + jq) (or
    (s, jq) without grad_A): grad_B's (BLOCK_J, BLOCK_Q) block jq of the same split. Shares go to
    the outputs (one split) or to row s of the workspace (PARTIAL: ga_ptr, gb_ptr point into it)."""
    dy_ptr += dy_off
    a_ptr += a_off
    b_ptr += b_off
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    if PARTIAL:
        ga_ptr += pid_s * ws_row
        gb_ptr += pid_s * ws_row
    ga_ptr += ga_off
    gb_ptr += gb_off
    offs_i = tl.arange(0, A1_PAD)
    offs_p = tl.arange(0, A2_PAD)
    i_mask = offs_i < A1
    p_mask = offs_p < A2
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    if NEED_GA and pid_b == 0:
        # grad_A = s Σ_t dY_t (X_t Bᵀ)ᵀ: per token and j block, P = X_t Bᵀ (A2, BLOCK_J), acc_a += dY_t P ᵀ
        acc_a = tl.zeros((A1_PAD, A2_PAD), dtype=tl.float32)
        for t in range(t_start, t_end):
            row = t_start.to(tl.int64) + (t - t_start)   # int64 row (the interpreter passes t as an int)
            for j0 in range(0, B1, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                j_mask = offs_j < B1
                pm = tl.zeros((A2_PAD, BLOCK_J), dtype=tl.float32)
                for q0 in range(0, B2, BLOCK_Q):
                    offs_q = q0 + tl.arange(0, BLOCK_Q)
                    q_mask = offs_q < B2
                    xt = tl.load(x_ptr + row * stride_xt
                                 + (offs_p[:, None] * B2 + offs_q[None, :]).to(tl.int64) * stride_xk,
                                 mask=p_mask[:, None] & q_mask[None, :], other=0.0)
                    bt = tl.load(b_ptr + offs_j[None, :] * stride_bj + offs_q[:, None] * stride_bq,
                                 mask=j_mask[None, :] & q_mask[:, None], other=0.0).to(x_ptr.dtype.element_ty)
                    pm = mma(xt, bt, pm, UPCAST, INPUT_PRECISION)
                dyt = tl.load(dy_ptr + row * stride_dyt + (offs_i[:, None] * B1 + offs_j[None, :]).to(tl.int64)
                              * stride_dyn, mask=i_mask[:, None] & j_mask[None, :], other=0.0)   # (A1_PAD, BLOCK_J)
                acc_a = mma(dyt, tl.trans(pm.to(dyt.dtype)), acc_a, UPCAST, INPUT_PRECISION)
        tl.store(ga_ptr + offs_i[:, None] * A2 + offs_p[None, :], (acc_a * scale).to(ga_ptr.dtype.element_ty),
                 mask=i_mask[:, None] & p_mask[None, :])
    elif NEED_GB:
        # grad_B = s Σ_t dY_tᵀ (A X_t), block (j, q): R = A X_t (A1, BLOCK_Q), acc_b += dY_tᵀ R.
        # (names differ from the branch above: Triton merges same-named values across branches)
        blk = pid_b - 1 if NEED_GA else pid_b
        offs_jb = (blk // q_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)
        offs_qb = (blk % q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        jb_mask = offs_jb < B1
        qb_mask = offs_qb < B2
        at = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_p[None, :] * stride_ap,
                     mask=i_mask[:, None] & p_mask[None, :], other=0.0).to(x_ptr.dtype.element_ty)  # A, held
        x_cols = (offs_p[:, None] * B2 + offs_qb[None, :]).to(tl.int64)
        dy_cols = (offs_i[:, None] * B1 + offs_jb[None, :]).to(tl.int64)
        acc_b = tl.zeros((BLOCK_J, BLOCK_Q), dtype=tl.float32)
        for t in range(t_start, t_end):
            row_b = t_start.to(tl.int64) + (t - t_start)
            xb = tl.load(x_ptr + row_b * stride_xt + x_cols * stride_xk, mask=p_mask[:, None] & qb_mask[None, :],
                         other=0.0)
            rt = mma(at, xb, tl.zeros((A1_PAD, BLOCK_Q), dtype=tl.float32), UPCAST, INPUT_PRECISION)   # A X_t
            dyb = tl.load(dy_ptr + row_b * stride_dyt + dy_cols * stride_dyn,
                          mask=i_mask[:, None] & jb_mask[None, :], other=0.0)           # dY_t (A1_PAD, BLOCK_J)
            acc_b = mma(tl.trans(dyb), rt.to(dyb.dtype), acc_b, UPCAST, INPUT_PRECISION)
        tl.store(gb_ptr + offs_jb[:, None] * B2 + offs_qb[None, :], (acc_b * scale).to(gb_ptr.dtype.element_ty),
                 mask=jb_mask[:, None] & qb_mask[None, :])


def grads_splits(T: int, b1: int, b2: int, need_da: bool, need_db: bool, x: torch.Tensor) -> tuple[int, int]:
    """(token splits, tokens per split) of ``kron_factor_grads``: one workspace row per split when
    there is more than one."""
    block_j, block_q, _ = _blocks()
    programs = int(need_da) + (cdiv(b1, block_j) * cdiv(b2, block_q) if need_db else 0)
    # a split below 16 tokens saves a program less time than its workspace row and the sum launch
    # cost (a guess, to be measured on a GPU); the interpreter's tests split anyway
    return token_splits(T, programs, x, per_sm=2, min_rows=1 if INTERPRET else 16)


def kron_factor_grads(x: torch.Tensor, dy: torch.Tensor, dy_col: int, a: torch.Tensor, b: torch.Tensor, s: int,
                      scale: float, da: torch.Tensor | None, db: torch.Tensor | None,
                      ws: torch.Tensor | None) -> None:
    """grad_A[s] = s Σ_t dY_t (X_t Bᵀ)ᵀ and grad_B[s] = s Σ_t dY_tᵀ (A X_t) for slice s of the
    stacked factors a (S, a1, a2), b (S, b1, b2), dY_t being token t's columns [dy_col, dy_col +
    a1·b1) of dy, one launch for both. da (S, a1, a2), db (S, b1, b2): contiguous outputs (None: not
    computed), written directly with one token split; with several, ws is the fp32 (splits,
    [da | db] elements) workspace whose rows triton/partials.py sums afterwards."""
    T = x.shape[0]
    _, a1, a2 = a.shape
    _, b1, b2 = b.shape
    check_factor_sides(a1, a2)
    block_j, block_q, warps = _blocks()
    q_blocks = cdiv(b2, block_q)
    splits, rows = grads_splits(T, b1, b2, da is not None, db is not None, x)
    programs = int(da is not None) + (cdiv(b1, block_j) * q_blocks if db is not None else 0)
    partial = ws is not None
    if partial != (splits > 1):
        raise ValueError(f"kron_factor_grads: {splits} token splits need {'a' if splits > 1 else 'no'} workspace")
    ga_off, gb_off = s * a1 * a2, s * b1 * b2
    if partial:                                  # row layout: [every slice's grad_A | every slice's grad_B]
        gb_off += da.numel() if da is not None else 0
    ga_t = ws if partial else (da if da is not None else db)     # the other output: a placeholder
    gb_t = ws if partial else (db if db is not None else da)
    launch(_kron_factor_grads_kernel)[(splits, programs)](
        x, dy, a, b, ga_t, gb_t,
        T, a1, a2, b1, b2, rows, scale, dy_col * dy.stride(1), s * a.stride(0), s * b.stride(0), ga_off, gb_off,
        ws.shape[1] if partial else 0, q_blocks,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), a.stride(1), a.stride(2), b.stride(1), b.stride(2),
        NEED_GA=da is not None, NEED_GB=db is not None, PARTIAL=partial,
        A1_PAD=rank_pad(a1), A2_PAD=rank_pad(a2), BLOCK_J=block_j, BLOCK_Q=block_q,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)


# ---------------------------------------------------------------------------------------------
# the op, per direction: the base GEMM and every slice's Kronecker terms, recorded once per launch
# signature and replayed (triton/_launcher.py PlanCache). Slices are reached by element offsets,
# never by views, so env names only the op's own tensors.
# ---------------------------------------------------------------------------------------------

# The base GEMM runs in the Triton GEMM core (triton/gemm.py), inside the op's plan, or on cuBLAS
# (torch.mm / addmm before the plan, the Kronecker terms then added into its output), chosen per shape
# by timing both on a GPU (triton/choice.py). Where nothing can be timed, base GEMMs of at most this
# many multiply-adds (M·N·K) take Triton: on an H100 such a GEMM takes a few µs, so the host decides
# the step time and a replayed launch costs less of it than an ATen call.
TRITON_GEMM_MAX_MACS = 2 ** 32

_FORWARD_PLANS = PlanCache()
_BACKWARD_PLANS = PlanCache()
_FORWARD_CHOICE = ShapeChoice("kron_linear forward", default=lambda key: _default_way(*key[:3]))
_DX_CHOICE = ShapeChoice("kron_linear dx", default=lambda key: _default_way(*key[:3]))


def _default_way(m: int, n: int, k: int) -> str:
    return "triton" if m * n * k <= TRITON_GEMM_MAX_MACS else "cublas"


def _dense(out: torch.Tensor, a_op: torch.Tensor, b_op: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = a_op @ b_op (+ bias) on cuBLAS."""
    if bias is not None:
        torch.addmm(bias, a_op, b_op, out=out)
    else:
        torch.mm(a_op, b_op, out=out)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
            scale: float, offsets) -> torch.Tensor:
    """y = x Wᵀ + b, then y[:, o_s : o_s + a1·b1] += s · x (A_s ⊗ B_s)ᵀ for each slice s of
    A (S, a1, a2), B (S, b1, b2): y (T, N) in x's dtype, the terms added in place."""
    T, K = x.shape
    N = weight.shape[0]
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    w_t = weight.t()

    def key():
        return (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(a), tensor_key(b), aligned(y),
                scale, tuple(offsets), input_precision(x.dtype))

    def run(way: str) -> None:
        fused = way == "triton"
        if not fused:
            _dense(y, x, w_t, bias)

        def body():
            if fused:
                gemm(x, w_t, y, bias=bias)
            for s, off in enumerate(offsets):
                kron_apply(x, 0, a, b, s, False, y, off, scale)
        _FORWARD_PLANS.run(lambda: key() + (way,), (x, w_t, bias, a, b, y), body)
    run(_FORWARD_CHOICE.choose((next_pow2(T), N, K, x.dtype, bias is not None), run))
    return y


def backward(dy: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             scale: float, offsets, need_dx: bool, need_dbias: bool, need_da: bool, need_db: bool):
    """(dx = dy W + s Σ_slices Aᵀ dY_t B in dy's dtype, grad_b, grad_A (S, a1, a2) and grad_B (S, b1, b2)
    in the factors' own dtypes), None where not asked for. Deterministic: token splits of the factor
    grads go through a workspace; written whole, no memset, no cast."""
    T, N = dy.shape
    _, a1, a2 = a.shape
    _, b1, b2 = b.shape
    K = a2 * b2
    dev = dy.device
    dx = torch.empty((T, K), device=dev, dtype=dy.dtype) if need_dx else None
    da = torch.empty(a.shape, device=dev, dtype=a.dtype) if need_da else None
    db = torch.empty(b.shape, device=dev, dtype=b.dtype) if need_db else None
    ws = None
    if need_da or need_db:
        splits, _ = grads_splits(T, b1, b2, need_da, need_db, dy)
        if splits > 1:
            ws = torch.empty((splits, a.numel() * need_da + b.numel() * need_db), device=dev, dtype=torch.float32)

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(weight), tensor_key(a), tensor_key(b),
                aligned(dx, da, db, ws), scale, tuple(offsets), input_precision(dy.dtype))

    def run(way: str) -> None:
        fused = way == "triton"
        if need_dx and not fused:
            _dense(dx, dy, weight, None)

        def body():
            if need_dx and fused:
                gemm(dy, weight, dx)
            for s, off in enumerate(offsets):
                if dx is not None:   # dX_t += s Aᵀ dY_t B: L = Aᵀ, R = Bᵀ (by strides)
                    kron_apply(dy, off, a, b, s, True, dx, 0, scale)
                if da is not None or db is not None:
                    kron_factor_grads(x, dy, off, a, b, s, scale, da, db, ws)
            if ws is not None:
                sum_partials(ws, *(t for t in (da, db) if t is not None))
        _BACKWARD_PLANS.run(lambda: key() + (way,), (dy, x, weight, a, b, dx, da, db, ws), body)
    if need_dx or need_da or need_db:
        run(_DX_CHOICE.choose((next_pow2(T), N, K, dy.dtype), run) if need_dx else "triton")
    return dx, (dy.float().sum(0).to(dy.dtype) if need_dbias else None), da, db
