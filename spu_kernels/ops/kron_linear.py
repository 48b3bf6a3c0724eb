"""The Kronecker adapter (KronA, Edalati et al. 2022), fused:

    y = x Wᵀ + b + s · x (A ⊗ B)ᵀ        A (a1, a2), B (b1, b2), a1·b1 = N, a2·b2 = K

computed by the vec trick, never forming A ⊗ B: token t's row x_t, read row-major as the (a2, b2)
matrix X_t, gives the (a1, b1) block Y_t = A X_t Bᵀ of its output row. Several adapters can sit
on column slices of one output (GPT-2's fused c_attn): A (S, a1, a2), B (S, b1, b2) and
``out_offsets`` (S first columns, each slice a1·b1 wide); columns outside every slice get no term.

``KRON_LINEAR`` (an op pair, ops/_library.py: custom ops ``kron_linear_{fwd,bwd}_<backend>`` for
torch.compile, an autograd.Function for eager calls) saves x (the caller's tensor, no copy; only
when A or B needs a grad), W (only for dx), A and B: nothing T-sized is created for backward:
    dx = dy W + s · vec(Aᵀ dY_t B)
    grad_A = s Σ_t dY_t (X_t Bᵀ)ᵀ,   grad_B = s Σ_t dY_tᵀ (A X_t)
The triton backend runs the base GEMMs in its own GEMM (small, launch-bound shapes) or on cuBLAS
(torch.addmm / mm) and adds the Kronecker term into their output in place
(spu_kernels/triton/kron_linear.py): no T×N temporary.
"""
from __future__ import annotations

import math

import torch

from ..backends import resolve_backend, triton_kernels
from ._checks import autocast_off, check_frozen_linear, frozen_linear_dtypes, tokens_2d
from ._library import define_op_pair, grads_or_placeholders

OP_NAME = "kron_linear"


def split_near_sqrt(n: int) -> tuple[int, int]:
    """(p, n // p) with p the largest divisor of n that is <= √n: the most square split."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"can only split a positive int, got {n!r}")
    for p in range(math.isqrt(n), 0, -1):
        if n % p == 0:
            return p, n // p
    raise AssertionError(n)


def kron_linear_reference(x, weight, bias, kron_a, kron_b, scale=1.0, out_offsets=None):
    """Ground truth: forms A ⊗ B (torch.kron) and multiplies, with torch autograd."""
    y = torch.nn.functional.linear(x, weight, bias)
    if kron_a.dim() == 2:
        return y + scale * (x @ torch.kron(kron_a, kron_b).t())
    offsets = out_offsets if out_offsets is not None else [0]
    parts, prev = [], 0
    for s, off in enumerate(offsets):
        term = scale * (x @ torch.kron(kron_a[s], kron_b[s]).t())
        parts += [y[..., prev:off], y[..., off:off + term.shape[-1]] + term]
        prev = off + term.shape[-1]
    parts.append(y[..., prev:])
    return torch.cat(parts, dim=-1)


class _TorchImpl:
    """The torch backend: batched matmuls over tokens (these do make (T, a1, b1) temporaries)."""

    @staticmethod
    def forward(x, weight, bias, a, b, scale, offsets):
        T = x.shape[0]
        a, b = a.to(x.dtype), b.to(x.dtype)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        X = x.reshape(T, a.shape[2], b.shape[2])
        for s, off in enumerate(offsets):
            n = a.shape[1] * b.shape[1]
            y[:, off:off + n] += scale * (a[s] @ X @ b[s].t()).reshape(T, n)
        return y

    @staticmethod
    def backward(dy, x, weight, a, b, scale, offsets, need_dx, need_dbias, need_da, need_db):
        T = dy.shape[0]
        a, b = a.to(dy.dtype), b.to(dy.dtype)
        S, a1, a2 = a.shape
        _, b1, b2 = b.shape
        n = a1 * b1
        dx = dy @ weight if need_dx else None
        X = x.reshape(T, a2, b2) if x is not None else None
        da = torch.zeros_like(a, dtype=torch.float32) if need_da else None
        db = torch.zeros_like(b, dtype=torch.float32) if need_db else None
        for s, off in enumerate(offsets):
            dY = dy[:, off:off + n].reshape(T, a1, b1)
            if need_dx:
                dx += scale * (a[s].t() @ dY @ b[s]).reshape(T, a2 * b2)
            if need_da:
                da[s] = scale * torch.einsum("tij,tpj->ip", dY.float(), (X @ b[s].t()).float())
            if need_db:
                db[s] = scale * torch.einsum("tij,tiq->jq", dY.float(), (a[s] @ X).float())
        dbias = dy.float().sum(0) if need_dbias else None
        return dx, dbias, da, db


class _TritonImpl:
    """The triton backend (spu_kernels/triton/kron_linear.py): the base GEMMs in the Triton GEMM (small,
    launch-bound shapes) or on cuBLAS, the Kronecker terms added into their outputs in place."""

    @staticmethod
    def forward(x, weight, bias, a, b, scale, offsets):
        return triton_kernels("kron_linear").forward(x, weight, bias, a, b, scale, offsets)

    @staticmethod
    def backward(dy, x, weight, a, b, scale, offsets, need_dx, need_dbias, need_da, need_db):
        return triton_kernels("kron_linear").backward(dy, x, weight, a, b, scale, offsets, need_dx, need_dbias,
                                                      need_da, need_db)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pair (spu_kernels/ops/_library.py): x (..., K), A (S, a1, a2), B (S, b1, b2), validated and
# cast. The leading dims are flattened inside the ops, so that no view node sits around them in
# the autograd graph (each costs host time in eager mode).
# ---------------------------------------------------------------------------------------------

def _fwd(backend, x, weight, bias, a, b, scale, offsets):
    y = _IMPLS["torch" if x.numel() == 0 else backend].forward(tokens_2d(x), weight, bias, a, b, scale, offsets)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _fwd_fake(x, weight, bias, a, b, scale, offsets):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _bwd(backend, dy, x, weight, a, b, scale, offsets, need_dx, need_dbias, need_da, need_db):
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    dx, dbias, da, db = impl.backward(tokens_2d(dy), tokens_2d(x), weight, a, b, scale, offsets, need_dx, need_dbias,
                                      need_da, need_db)
    if dx is not None and dy.dim() != 2:
        dx = dx.view(*dy.shape[:-1], dx.shape[1])
    return grads_or_placeholders((dx, dbias, da, db), (dy.dtype, dy.dtype, a.dtype, b.dtype), dy)


def _bwd_fake(dy, x, weight, a, b, scale, offsets, need_dx, need_dbias, need_da, need_db):
    k = a.shape[2] * b.shape[2]
    shapes = ((*dy.shape[:-1], k), (dy.shape[-1],), tuple(a.shape), tuple(b.shape))
    return tuple(dy.new_empty(s if n else (0,), dtype=dt) for s, n, dt in
                 zip(shapes, (need_dx, need_dbias, need_da, need_db), (dy.dtype, dy.dtype, a.dtype, b.dtype)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, scale, offsets = inputs
    need_dx, _, _, need_da, need_db = ctx.needs_input_grad[:5]
    ctx.save_for_backward(x if (need_da or need_db) else None, weight if need_dx else None, a, b)
    ctx.cfg = (scale, offsets, x.dtype)


def _backward(ctx, bwd, dy):
    x, weight, a, b = ctx.saved_tensors
    scale, offsets, x_dtype = ctx.cfg
    need = ctx.needs_input_grad
    if dy.dtype != x_dtype:
        dy = dy.to(x_dtype)
    needs = (need[0], need[2], need[3], need[4])
    grads = bwd(dy, x, weight, a, b, scale, offsets, *needs)
    dx, dbias, da, db = (t if n else None for t, n in zip(grads, needs))
    return dx, None, dbias, da, db, None, None


KRON_LINEAR = define_op_pair(
    OP_NAME, IMPLEMENTED, fwd=_fwd, bwd=_bwd, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float scale, int[] offsets) -> Tensor",
    bwd_schema="(Tensor dy, Tensor? x, Tensor? weight, Tensor a, Tensor b, float scale, int[] offsets, "
               "bool need_dx, bool need_dbias, bool need_da, bool need_db) -> (Tensor, Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward=_backward)
KronLinearFunction = KRON_LINEAR.function


def kron_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kron_a: torch.Tensor,
                kron_b: torch.Tensor, *, scale: float = 1.0, out_offsets=None, backend: str | None = None):
    """y = x Wᵀ + b + scale · x (A ⊗ B)ᵀ, fused (A ⊗ B is never formed).

    Args:
        x: (..., K) fp32 / fp16 / bf16; any leading dims and strides.
        weight: (N, K), frozen. bias: (N,) or None.
        kron_a: A, (a1, a2); kron_b: B, (b1, b2), with a1·b1 = N and a2·b2 = K. Or stacked
            (S, a1, a2) / (S, b1, b2) with ``out_offsets`` (S ints): slice s adds its term to
            output columns [out_offsets[s], out_offsets[s] + a1·b1). Any float dtype: read as
            they are (no cast kernel); their grads come in their own dtype (fp32 masters get fp32).
        scale: s. backend: "torch" or "triton"; default as in spu_kernels.backends.
    """
    a3, b3, offsets = _check(x, weight, bias, kron_a, kron_b, scale, out_offsets)
    x, weight, bias = frozen_linear_dtypes(OP_NAME, x, weight, bias)
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, x.device, backend)
    with autocast_off(x.device):
        return KRON_LINEAR(chosen, x, weight, bias, a3, b3, float(scale), list(offsets))


def _check(x, weight, bias, a, b, scale, out_offsets):
    """Shapes, dtypes, devices; returns (A 3-D, B 3-D, offsets tuple) with messages that say what to fix."""
    k, n = check_frozen_linear(OP_NAME, x, weight, bias)
    for name, t in (("kron_a", a), ("kron_b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            raise ValueError(f"{OP_NAME}: {name} must be a 2-D (or stacked 3-D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if a.dim() != b.dim() or (a.dim() == 3 and a.shape[0] != b.shape[0]):
        raise ValueError(f"{OP_NAME}: kron_a {tuple(a.shape)} and kron_b {tuple(b.shape)} must both be 2-D, "
                         "or both 3-D with the same number of slices")
    a3, b3 = (a, b) if a.dim() == 3 else (a.unsqueeze(0), b.unsqueeze(0))
    S, a1, a2 = a3.shape
    _, b1, b2 = b3.shape
    if a2 * b2 != k:
        raise ValueError(f"{OP_NAME}: A is (a1={a1}, a2={a2}) and B is (b1={b1}, b2={b2}), but a2·b2 = {a2 * b2} "
                         f"must equal K = {k} (x's last dim)")
    width = a1 * b1
    if out_offsets is None:
        if S != 1 or width != n:
            raise ValueError(f"{OP_NAME}: a1·b1 = {a1}·{b1} = {width} must equal N = {n} (weight rows)"
                             + ("" if S == 1 else f"; with {S} stacked slices pass out_offsets"))
        offsets = (0,)
    else:
        offsets = tuple(int(o) for o in out_offsets)
        if len(offsets) != S:
            raise ValueError(f"{OP_NAME}: out_offsets has {len(offsets)} entries for {S} slices")
        prev = 0
        for o in offsets:
            if o < prev or o + width > n:
                raise ValueError(f"{OP_NAME}: out_offsets {list(offsets)} must be increasing, non-overlapping "
                                 f"slices of width a1·b1 = {width} inside N = {n}")
            prev = o + width
    for name, t in (("weight", weight), ("bias", bias), ("kron_a", a), ("kron_b", b)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but x is on {x.device}; move them to one device")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{OP_NAME}: {name} must be a floating tensor, got {t.dtype}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{OP_NAME}: scale must be a finite number, got {scale!r}")
    return a3, b3, offsets
