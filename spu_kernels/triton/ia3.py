"""Triton kernels of (IA)³: learned per-feature scales on a linear layer's output or input, and on
an activation.

Output side (keys, values)      y = (x Wᵀ + b) ⊙ l            x (T, K), W (N, K), l (N,)
Input side (gated MLP's down)   y = (x ⊙ l) Wᵀ + b            l (K,)
Scaled activation (FFN)         y = act(h) ⊙ l                h (T, F), l (F,)

``gemm`` (triton/gemm.py, the package's GEMM core, with scales folded into the K loop and the
epilogue) serves four products:
    output side forward:  y  = (x @ Wᵀ + b) ⊙ l                   (column scale in the epilogue)
    output side dx:       dx = (dy diag(l)) @ W                    (l scales dy's columns in the K loop)
    input side forward:   y  = (x diag(l)) @ Wᵀ + b                (l scales x's columns in the K loop)
    input side dx:        g = dy @ W; dx = g ⊙ l; grad_l = Σ_t x ⊙ g   (epilogue, one pass)
``ia3_out_grads``: the output side's grad_l = Σ_t dy ⊙ z (z = x Wᵀ + b) from one pass over dy and
the saved output y (= z ⊙ l, the tensor the next layer holds anyway): Σ_t dy ⊙ y, divided by l
per column. A column block where some l is exactly 0 (y carries no z there) recomputes its z
tiles from x and W inside the kernel; the branch is taken on the device, no host sync.
``scaled_act_fwd`` / ``scaled_act_bwd``: one elementwise pass each; backward recomputes act(h)
and act'(h) from h (the only activation saved) and reduces grad_l over tokens.
Every token reduction is deterministic: one split writes the grads itself, in their own dtypes;
several (token splits, or the GEMM's row blocks) write fp32 partial rows that triton/partials.py
adds in order.
``linear_forward`` / ``linear_backward`` / ``act_forward`` / ``act_backward`` are what the ops
call: they allocate, and replay recorded launch plans.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, input_precision, mma, token_splits, upcast_dot
from ._launcher import PlanCache, aligned, launch, tensor_key
from .gemm import gemm, reduce_block_m
from .partials import sum_partials

# ---------------------------------------------------------------------------------------------
# output side backward: one pass over dy and y for grad_l and grad_bias
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ia3_out_grad_kernel(dy_ptr, y_ptr, l_ptr, x_ptr, w_ptr, b_ptr, gbias_ptr, gl_ptr, ws_ptr,
                         T, N, K, rows_per_split,
                         stride_dyt, stride_dyn, stride_yt, stride_yn, stride_xt, stride_xk, stride_wn, stride_wk,
                         HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, PARTIAL: tl.constexpr,
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
    # grad_b = l ⊙ Σ_t dy: both linear in the partial sums, so the splits' shares add up
    lf = lv.to(tl.float32)
    gl = tl.where(lf != 0, s1 / tl.where(lf != 0, lf, 1.0), s2)
    if PARTIAL:    # row pid_s of the workspace: [grad_l share (N) | grad_b share (N)] (triton/partials.py)
        row = ws_ptr + pid_s * (2 * N if NEED_DB else N)
        tl.store(row + offs_n, gl, mask=n_mask)
        if NEED_DB:
            tl.store(row + N + offs_n, sdy * lf, mask=n_mask)
    else:
        tl.store(gl_ptr + offs_n, gl.to(gl_ptr.dtype.element_ty), mask=n_mask)
        if NEED_DB:
            tl.store(gbias_ptr + offs_n, (sdy * lf).to(gbias_ptr.dtype.element_ty), mask=n_mask)


def out_grad_splits(T: int, N: int, dy: torch.Tensor) -> tuple[int, int]:
    """(token splits, tokens per split) of ``ia3_out_grads``: about two programs per SM, one
    workspace row per split when there is more than one."""
    block_t, block_n, _, _ = _out_grad_blocks()
    return token_splits(T, cdiv(N, block_n), dy, per_sm=2, block=block_t)


def _out_grad_blocks():
    return (16, 32, 32, 4) if INTERPRET else (32, 64, 64, 4)


def ia3_out_grads(dy, y, l, x, weight, bias, grad_l, grad_bias, ws) -> None:
    """For y = (x Wᵀ + b) ⊙ l: grad_l = Σ_t dy ⊙ (x Wᵀ + b) and grad_b = l ⊙ Σ_t dy (or None),
    written in their own dtypes. ws: None with one split (``out_grad_splits``), else an fp32
    (splits, N or 2N) workspace whose rows are reduced in order (deterministic, no memset).
    Reads dy and y once; x and W only in column blocks where some l[n] == 0."""
    T, N = dy.shape
    K = x.shape[1]
    block_t, block_n, block_k, warps = _out_grad_blocks()
    splits, rows_per_split = out_grad_splits(T, N, dy)
    if (splits > 1) != (ws is not None):
        raise ValueError(f"ia3_out_grads: {splits} token splits need {'a' if splits > 1 else 'no'} workspace")
    launch(_ia3_out_grad_kernel)[(cdiv(N, block_n), splits)](
        dy, y, l, x, weight, bias, grad_bias, grad_l, ws,
        T, N, K, rows_per_split,
        dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, NEED_DB=grad_bias is not None, PARTIAL=ws is not None,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=upcast_dot(x.dtype), INPUT_PRECISION=input_precision(x.dtype), num_warps=warps)
    if ws is not None:
        sum_partials(ws, grad_l, grad_bias)


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
def _scaled_act_bwd_kernel(dy_ptr, h_ptr, l_ptr, dh_ptr, gl_ptr, ws_ptr, T, F, rows_per_split,
                           stride_dyt, stride_dyf, stride_ht, stride_hf,
                           ACT: tl.constexpr, NEED_DH: tl.constexpr, NEED_GL: tl.constexpr, PARTIAL: tl.constexpr,
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
        if PARTIAL:    # row pid_s of the (splits, F) workspace (triton/partials.py)
            tl.store(ws_ptr + pid_s * F + offs_f, gl, mask=f_mask)
        else:
            tl.store(gl_ptr + offs_f, gl.to(gl_ptr.dtype.element_ty), mask=f_mask)


def _act_blocks():
    return (16, 32, 4) if INTERPRET else (32, 128, 4)


def scaled_act_fwd(h: torch.Tensor, l: torch.Tensor, act: str, y: torch.Tensor) -> None:
    """y = act(h) ⊙ l for h (T, F) (any strides); y contiguous (T, F) in h's dtype."""
    T, F = h.shape
    block_t, block_f, warps = _act_blocks()
    launch(_scaled_act_fwd_kernel)[(cdiv(T, block_t), cdiv(F, block_f))](
        h, l, y, T, F, h.stride(0), h.stride(1), ACT=ACTIVATIONS[act], BLOCK_T=block_t, BLOCK_F=block_f,
        num_warps=warps)


def act_splits(T: int, F: int, h: torch.Tensor) -> tuple[int, int]:
    """(token splits, tokens per split) of ``scaled_act_bwd``: dh is elementwise, so tokens are
    split enough to fill the GPU; grad_l's shares then go through a workspace row each."""
    block_t, block_f, _ = _act_blocks()
    return token_splits(T, cdiv(F, block_f), h, per_sm=8, block=block_t)


def scaled_act_bwd(dy: torch.Tensor, h: torch.Tensor, l: torch.Tensor, act: str, dh: torch.Tensor | None,
                   gl: torch.Tensor | None, ws: torch.Tensor | None) -> None:
    """dh = dy ⊙ l ⊙ act'(h) (contiguous, h's dtype) and grad_l = Σ_t dy ⊙ act(h) (l's dtype),
    one pass over dy and h; a None output is not computed. ws: an fp32 (splits, F) workspace when
    grad_l is wanted and ``act_splits`` gives more than one split, else None."""
    T, F = h.shape
    block_t, block_f, warps = _act_blocks()
    splits, rows_per_split = act_splits(T, F, h)
    partial = gl is not None and splits > 1
    if partial != (ws is not None):
        raise ValueError(f"scaled_act_bwd: {splits} token splits need {'a' if partial else 'no'} workspace")
    launch(_scaled_act_bwd_kernel)[(cdiv(F, block_f), splits)](
        dy, h, l, dh, gl, ws,
        T, F, rows_per_split, dy.stride(0), dy.stride(1), h.stride(0), h.stride(1),
        ACT=ACTIVATIONS[act], NEED_DH=dh is not None, NEED_GL=gl is not None, PARTIAL=partial,
        BLOCK_T=block_t, BLOCK_F=block_f, num_warps=warps)
    if partial:
        sum_partials(ws, gl)


# ---------------------------------------------------------------------------------------------
# the ops' triton halves: the launches above, recorded once per launch signature and replayed
# (triton/_launcher.py PlanCache). Every output and workspace is allocated here, outside the
# recorded body, and named in env, so that a replay passes the new call's tensors.
# ---------------------------------------------------------------------------------------------

_PLANS = {name: PlanCache() for name in ("linear_fwd", "linear_bwd", "act_fwd", "act_bwd")}


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor,
                   side: str) -> torch.Tensor:
    """y (T, N) in x's dtype: (x Wᵀ + b) ⊙ l (side "output") or (x ⊙ l) Wᵀ + b ("input")."""
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    w_t = weight.t()
    env = (x, w_t, bias, l, y)

    def key():
        return (tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(l), aligned(y), side,
                input_precision(x.dtype))

    def body():
        if side == "input":
            gemm(x, w_t, y, bias=bias, k_scale=l)
        else:
            gemm(x, w_t, y, bias=bias, n_scale=l)
    _PLANS["linear_fwd"].run(key, env, body)
    return y


def linear_backward(dy, x, y, weight, bias, l, side: str, need_dx: bool, need_dbias: bool, need_dl: bool):
    """(dx, grad_b in dy's dtype (the bias has x's), grad_l in l's dtype), None where not asked for.
    x, y, bias as the op saved them: output side y, x and bias only when grad_l is wanted; input
    side x only then, never the bias."""
    T = dy.shape[0]
    dev = dy.device
    dx = torch.empty((T, weight.shape[1]), device=dev, dtype=dy.dtype) if need_dx else None
    dl = dbias = ws = None
    if side == "input":
        if need_dl:   # the GEMM's epilogue writes one fp32 row per row block, summed in order into dl
            dl = torch.empty(l.shape, device=dev, dtype=l.dtype)
            ws = torch.empty((cdiv(T, reduce_block_m(dy.dtype)), l.shape[0]), device=dev, dtype=torch.float32)
    elif need_dl:
        dl = torch.empty(l.shape, device=dev, dtype=l.dtype)
        dbias = torch.empty(dy.shape[1], device=dev, dtype=dy.dtype) if need_dbias else None
        splits, _ = out_grad_splits(T, dy.shape[1], dy)
        if splits > 1:
            ws = torch.empty((splits, dy.shape[1] * (2 if need_dbias else 1)), device=dev, dtype=torch.float32)
    env = (dy, x, y, weight, bias, l, dx, dl, dbias, ws)

    def key():
        return (tensor_key(dy), tensor_key(x), tensor_key(y), tensor_key(weight), tensor_key(bias), tensor_key(l),
                aligned(dx, dl, dbias, ws), side, need_dbias, input_precision(dy.dtype))

    def body():
        if side == "input":
            if need_dx or need_dl:   # g = dy W: dx = g ⊙ l, grad_l = Σ_t x ⊙ g
                gemm(dy, weight, dx, n_scale=l, reduce_z=x if need_dl else None, zp=ws)
                if need_dl:
                    sum_partials(ws, dl)
        else:
            if need_dx:              # dx = dy (diag(l) W)
                gemm(dy, weight, dx, k_scale=l)
            if need_dl:
                ia3_out_grads(dy, y, l, x, weight, bias, dl, dbias, ws)
    if need_dx or need_dl:
        _PLANS["linear_bwd"].run(key, env, body)
    if side == "input":
        dbias = dy.float().sum(0).to(dy.dtype) if need_dbias else None
    elif need_dbias and not need_dl:   # bias only: y and x were not saved
        dbias = (dy.float().sum(0) * l.float()).to(dy.dtype)
    return dx, dbias, dl


def act_forward(h: torch.Tensor, l: torch.Tensor, act: str) -> torch.Tensor:
    """act(h) ⊙ l, a new contiguous (T, F) tensor in h's dtype."""
    y = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    _PLANS["act_fwd"].run(lambda: (tensor_key(h), tensor_key(l), aligned(y), act), (h, l, y),
                          lambda: scaled_act_fwd(h, l, act, y))
    return y


def act_backward(dy: torch.Tensor, h: torch.Tensor, l: torch.Tensor, act: str, need_dh: bool, need_dl: bool):
    """(dh in h's dtype, grad_l in l's dtype), None where not asked for."""
    T, F = h.shape
    dh = torch.empty((T, F), device=h.device, dtype=h.dtype) if need_dh else None
    dl = torch.empty(l.shape, device=h.device, dtype=l.dtype) if need_dl else None
    splits, _ = act_splits(T, F, h)
    ws = torch.empty((splits, F), device=h.device, dtype=torch.float32) if need_dl and splits > 1 else None
    if need_dh or need_dl:
        _PLANS["act_bwd"].run(lambda: (tensor_key(dy), tensor_key(h), tensor_key(l), aligned(dh, dl, ws), act),
                              (dy, h, l, dh, dl, ws), lambda: scaled_act_bwd(dy, h, l, act, dh, dl, ws))
    return dh, dl
