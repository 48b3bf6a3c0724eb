"""The k-LST ladder cross-attention, K/V projections fused in:

    K_j = C_j W_kᵀ,  V_j = C_j W_vᵀ                      j = 1..k (the stacked ladder features)
    o_{t,h} = Σ_j softmax_j(scale · q_{t,h} · K_{j,t,h}) V_{j,t,h}

q (..., h, d_h) queries; C (k, ..., D) the k ladder features of the same tokens (D = h·d_h);
W_k, W_v (D, D). Attention is per token over the k layers (not over the sequence), multi-head.
Projection biases are left out on purpose: q·b_k is the same for every j (softmax ignores it) and
b_v passes unchanged to the output, where the caller's output projection bias absorbs it.

Three things live here:
  * ``ladder_cross_attention_reference``: the math in plain torch with autograd: the ground truth.
  * ``LADDER_CROSS_ATTENTION``: the op pair (ops/_library.py: custom ops
    ``ladder_cross_attention_{fwd,bwd}_<backend>`` for torch.compile, an autograd.Function for eager
    calls) over one implementation per backend. It saves q, C, W_k,
    W_v (its inputs: no new memory) and a per-head log-sum-exp (T×h fp32); never the projected
    keys / values (k×T×D each), the attention weights or the output: backward recomputes them.
    Backward takes delta = Σ_j p_j dP_j in fp32 from the recomputed p_j, dP_j rather than dO·o:
    adjacent layers' ladder features are alike, dP_j − delta cancels, and a bf16-rounded o would
    leave mostly rounding error in dq and dW_k.
  * the torch backend (``_TorchImpl``, the same saved-tensor contract with plain torch calls; it
    materialises K, V inside each call only) and the dispatch to the triton backend
    (spu_kernels/triton/ladder_cross_attention.py).
"""
from __future__ import annotations

import math

import torch

from ..backends import resolve_backend, triton_kernels
from ._checks import FLOAT_DTYPES, autocast_dtype, autocast_off
from ._library import define_op_pair, no_grad_placeholder

OP_NAME = "ladder_cross_attention"


def ladder_cross_attention_reference(q, c, w_k, w_v, scale=None):
    """Ground truth, differentiable by torch autograd. q (..., h, d_h), c (k, ..., D)."""
    h, dh = q.shape[-2:]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    kk = (c @ w_k.t()).unflatten(-1, (h, dh))            # (k, ..., h, d_h)
    vv = (c @ w_v.t()).unflatten(-1, (h, dh))
    s = (q.unsqueeze(0) * kk).sum(-1) * scale            # (k, ..., h)
    p = torch.softmax(s.float(), dim=0).to(q.dtype)
    return (p.unsqueeze(-1) * vv).sum(0)


class _TorchImpl:
    """The torch backend: q (T, D), c (k, T, D); fp32 softmax statistics like the kernels."""

    @staticmethod
    def _kv(c, wk, wv, h):
        nk, t, d = c.shape
        wk, wv = wk.to(c.dtype), wv.to(c.dtype)
        return (c @ wk.t()).view(nk, t, h, d // h), (c @ wv.t()).view(nk, t, h, d // h)

    @staticmethod
    def forward(q, c, wk, wv, h, scale):
        nk, t, d = c.shape
        kk, vv = _TorchImpl._kv(c, wk, wv, h)
        s = (q.view(1, t, h, d // h).float() * kk.float()).sum(-1) * scale       # (k, T, h)
        lse = torch.logsumexp(s, dim=0)
        p = torch.exp(s - lse)
        o = (p.unsqueeze(-1) * vv.float()).sum(0).reshape(t, d)
        return o.to(q.dtype), lse

    @staticmethod
    def backward(do, q, c, wk, wv, lse, h, scale, need_dw):
        nk, t, d = c.shape
        dh = d // h
        wk, wv = wk.to(c.dtype), wv.to(c.dtype)
        kk, vv = _TorchImpl._kv(c, wk, wv, h)
        q4, do4 = q.view(1, t, h, dh).float(), do.view(1, t, h, dh).float()
        p = torch.exp((q4 * kk.float()).sum(-1) * scale - lse)                    # (k, T, h)
        dp = (do4 * vv.float()).sum(-1)
        delta = (p * dp).sum(0)                                                   # fp32, not dO·o
        ds = p * (dp - delta) * scale
        # Σ_j dS_j = 0: dq = Σ_j dS_j (K_j − K_0), with K_j − K_0 = (C_j − C_0) W_kᵀ: alike ladders' shared
        # part cancels before the low-precision matmul (the kernel gets this from fp32 projections)
        kd = ((c[1:] - c[:1]) @ wk.t()).view(nk - 1, t, h, dh).float()
        dq = (ds[1:].unsqueeze(-1) * kd).sum(0).reshape(t, d).to(q.dtype)
        dk = (ds.unsqueeze(-1) * q4).reshape(nk, t, d).to(c.dtype)               # dK_j, dV_j: this call only
        dv = (p.unsqueeze(-1) * do4).reshape(nk, t, d).to(c.dtype)
        dc = dk @ wk + dv @ wv
        dwk = dwv = None
        if need_dw:
            # Σ_j dK_j = 0 per token: dW_k = Σ_j dK_jᵀ (C_j − C_0) keeps alike ladders' shared part
            # out of the low-precision product (it cancels exactly)
            dwk = dk[1:].reshape(-1, d).t() @ (c[1:] - c[:1]).reshape(-1, d) if nk > 1 else wk.new_zeros(d, d)
            dwv = dv.reshape(nk * t, d).t() @ c.reshape(nk * t, d)
        return dq, dc, dwk, dwv


class _TritonImpl:
    """The triton backend (kernels in spu_kernels/triton/ladder_cross_attention.py)."""

    @staticmethod
    def forward(q, c, wk, wv, h, scale):
        return triton_kernels("ladder_cross_attention").forward(q, c, wk, wv, h, scale)

    @staticmethod
    def backward(do, q, c, wk, wv, lse, h, scale, need_dw):
        return triton_kernels("ladder_cross_attention").backward(do, q, c, wk, wv, lse, h, scale, need_dw)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pair (spu_kernels/ops/_library.py): q (T, D), c (k, T, D), validated and cast
# ---------------------------------------------------------------------------------------------

def _fwd(backend, q, c, wk, wv, heads, scale):
    return _IMPLS["torch" if q.shape[0] == 0 else backend].forward(q, c, wk, wv, heads, scale)


def _fwd_fake(q, c, wk, wv, heads, scale):
    return torch.empty_like(q), q.new_empty((q.shape[0], heads), dtype=torch.float32)


def _bwd(backend, do, q, c, wk, wv, lse, heads, scale, need_dw):
    impl = _IMPLS["torch" if do.shape[0] == 0 else backend]
    dq, dc, dwk, dwv = impl.backward(do, q, c, wk, wv, lse, heads, scale, need_dw)
    if not need_dw:
        return dq, dc, no_grad_placeholder(wk), no_grad_placeholder(wv)
    return dq, dc, dwk.to(wk.dtype), dwv.to(wv.dtype)


def _bwd_fake(do, q, c, wk, wv, lse, heads, scale, need_dw):
    def w():
        return torch.empty_like(wk) if need_dw else wk.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(c), w(), w()


def _setup_context(ctx, inputs, output):
    q, c, wk, wv, heads, scale = inputs
    # the inputs (no new memory) and lse (T×h fp32): nothing k×T×D, not even the output
    ctx.save_for_backward(q, c, wk, wv, output[1])
    ctx.cfg = (heads, scale)


def _backward(ctx, bwd, do):
    q, c, wk, wv, lse = ctx.saved_tensors
    heads, scale = ctx.cfg
    need = ctx.needs_input_grad
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    dq, dc, dwk, dwv = bwd(do, q, c, wk, wv, lse, heads, scale, need[2] or need[3])
    return (dq if need[0] else None, dc if need[1] else None, dwk if need[2] else None,
            dwv if need[3] else None, None, None)


LADDER_CROSS_ATTENTION = define_op_pair(
    OP_NAME, IMPLEMENTED, fwd=_fwd, bwd=_bwd, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    fwd_schema="(Tensor q, Tensor c, Tensor wk, Tensor wv, int heads, float scale) -> (Tensor, Tensor)",
    bwd_schema="(Tensor do, Tensor q, Tensor c, Tensor wk, Tensor wv, Tensor lse, int heads, float scale, "
               "bool need_dw) -> (Tensor, Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward=_backward)
LadderCrossAttentionFunction = LADDER_CROSS_ATTENTION.function


def ladder_cross_attention(q: torch.Tensor, c: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, *,
                           scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Per-token multi-head attention of q over the k stacked ladder features C, fused with the
    key / value projections: returns o (..., h, d_h) in q's dtype.

    Args:
        q: (..., h, d_h) queries (already projected), fp32, fp16 or bf16.
        c: (k, ..., D) with D = h·d_h, k >= 1; same leading dims as q; any strides (a slice of a
            (L+1, ..., D) tensor of all ladder features is used without a copy).
        w_k, w_v: (D, D) key / value projections (``nn.Linear`` weights, out × in), any float
            dtype: rounded to q's dtype as the kernels read them (no cast kernel); their grads come
            in their own dtype (fp32 masters get fp32 grads).
        scale: the score scale, default 1/sqrt(d_h).
        backend: "torch" or "triton"; default as in spu_kernels.backends. (No cuda backend yet.)
    Under torch.autocast every input is cast to the autocast dtype first.
    """
    _check(q, c, w_k, w_v)
    dt = autocast_dtype(q.device)
    if dt is not None:
        q, c = q.to(dt), c.to(dt)
    elif c.dtype != q.dtype:
        raise TypeError(f"{OP_NAME}: q is {q.dtype} but c is {c.dtype}; cast them to one dtype or run under "
                        "torch.autocast")
    wk, wv = w_k, w_v     # in their own dtype: the backends round them to q's as they read them
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{OP_NAME}: scale must be finite, got {scale!r}")
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, q.device, backend)
    heads, dh = q.shape[-2:]
    nk = c.shape[0]
    with autocast_off(q.device):
        # c3 is a view when the stack is a slice of one ladder tensor
        o, _ = LADDER_CROSS_ATTENTION(chosen, q.reshape(-1, heads * dh), c.reshape(nk, -1, heads * dh), wk, wv,
                                      heads, scale)
    return o.view(q.shape)


def _check(q, c, wk, wv) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() < 2:
        raise ValueError(f"{OP_NAME}: q must be a tensor of shape (..., h, d_h)")
    if not isinstance(c, torch.Tensor) or c.dim() != q.dim():
        raise ValueError(f"{OP_NAME}: c must be (k, ..., D) with the leading dims of q {tuple(q.shape[:-2])}, "
                         f"got {tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
    for name, t in (("q", q), ("c", c), ("w_k", wk), ("w_v", wv)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP_NAME}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but q is on {q.device}")
    h, dh = q.shape[-2:]
    d = h * dh
    if c.shape[0] < 1 or tuple(c.shape[1:]) != (*q.shape[:-2], d):
        raise ValueError(f"{OP_NAME}: c must be (k >= 1, {', '.join(map(str, q.shape[:-2]))}, D={d}) for q of "
                         f"shape {tuple(q.shape)}, got {tuple(c.shape)}")
    for name, w in (("w_k", wk), ("w_v", wv)):
        if tuple(w.shape) != (d, d):
            raise ValueError(f"{OP_NAME}: {name} must be (D, D) = ({d}, {d}), got {tuple(w.shape)}")
