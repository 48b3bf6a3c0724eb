"""(IA)³ (Liu et al. 2022): learned per-feature scales, two ops.

    ia3_linear(side="output"):  y = (x Wᵀ + b) ⊙ l        l (N,)   keys, values
    ia3_linear(side="input"):   y = (x ⊙ l) Wᵀ + b        l (K,)   a gated MLP's down projection
    ia3_scaled_act:             y = act(h) ⊙ l            l (F,)   FFN hidden; act in gelu, gelu_tanh, relu, silu

x (..., K) tokens; W (N, K) frozen; b (N,) optional; l initialised to ones by the modules, so the
wrapped layer computes what it did: at l = 1 the torch backend's ``ia3_scaled_act`` is torch's own
activation bit for bit (act(h) as F.gelu / F.silu / F.relu compute it, then one product with l);
the linears, and every triton kernel (its own erf / exp, GEMM tiling), agree to rounding.

Each op is an op pair (ops/_library.py: custom ops ``ia3_linear_{fwd,bwd}_<backend>`` and
``ia3_scaled_act_{fwd,bwd}_<backend>`` for torch.compile, an autograd.Function for eager calls).
What ``IA3_LINEAR`` saves for backward (no copy of anything, nothing T×N that is new):
  * output side: the output y itself (the next layer, e.g. attention, holds it anyway) plus x, W,
    b, l. grad_l[n] = Σ_t dy[t, n] z[t, n] with z = x Wᵀ + b = y / l, so it is Σ_t dy ⊙ y divided
    by l[n] once per column. Where l[n] == 0 exactly, y holds no z: those columns' z is
    recomputed from x and W (the triton kernel decides per column block on the device, no sync;
    the torch backend checks on the host). This is why x is kept (a reference to the caller's
    tensor; for keys and values it is the same hidden state). dx = dy (diag(l) W).
  * input side: x, W, l. One GEMM g = dy W gives dx = g ⊙ l and grad_l = Σ_t x ⊙ g.
``IA3_SCALED_ACT`` saves h (the pre-activation, which the activation's own backward would
keep) and l: dh = dy ⊙ l ⊙ act'(h), grad_l = Σ_t dy ⊙ act(h), both from one pass over dy and h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import resolve_backend, triton_kernels
from ._checks import (
    FLOAT_DTYPES,
    autocast_dtype,
    autocast_off,
    check_frozen_linear,
    frozen_linear_dtypes,
    tokens_2d,
)
from ._library import define_op_pair, grads_or_placeholders

OP_LINEAR = "ia3_linear"
OP_ACT = "ia3_scaled_act"
SIDES = ("output", "input")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def ia3_linear_reference(x, weight, bias, l, side="output"):
    """Ground truth: the formula with torch autograd."""
    if side == "input":
        return F.linear(x * l, weight, bias)
    return F.linear(x, weight, bias) * l


def activation_reference(h, activation):
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"{OP_ACT}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def ia3_scaled_act_reference(h, l, activation="gelu"):
    return activation_reference(h, activation) * l


def _act_and_grad(h32: torch.Tensor, activation: str):
    """(act(h), act'(h)) in fp32 (h32 is fp32): the same formulas as the triton kernel."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h32 * 0.7071067811865476))
        return h32 * cdf, cdf + h32 * 0.3989422804014327 * torch.exp(-0.5 * h32 * h32)
    if activation == "gelu_tanh":
        c = 0.7978845608028654
        th = torch.tanh(c * (h32 + 0.044715 * h32 ** 3))
        return 0.5 * h32 * (1 + th), 0.5 * (1 + th) + 0.5 * h32 * (1 - th * th) * c * (1 + 0.134145 * h32 * h32)
    if activation == "relu":
        return h32.clamp_min(0), (h32 > 0).to(h32.dtype)
    sig = torch.sigmoid(h32)
    return h32 * sig, sig * (1 + h32 * (1 - sig))


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

class _TorchImpl:
    """The torch backend: the same decomposition with cuBLAS / ATen calls."""

    @staticmethod
    def linear_forward(x, weight, bias, l, side):
        l = l.to(x.dtype)
        if side == "input":   # x diag(l) Wᵀ = x (W diag(l))ᵀ: scale W's columns (N×K), not x (T×K)
            wl = weight * l
            return torch.addmm(bias, x, wl.t()) if bias is not None else x @ wl.t()
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        return y.mul_(l)      # in place: no unscaled copy survives

    @staticmethod
    def linear_backward(dy, x, y, weight, bias, l, side, need_dx, need_dbias, need_dl):
        dx = dbias = dl = None
        l = l.to(dy.dtype)
        if side == "input":
            g = dy @ weight if (need_dx or need_dl) else None
            if need_dl:
                dl = (g.float() * x.float()).sum(0)
            if need_dx:
                dx = g.mul_(l)
            if need_dbias:
                dbias = dy.float().sum(0)
            return dx, dbias, dl
        if need_dx:
            dx = dy @ (weight * l[:, None])
        if need_dl:
            lf = l.float()
            s1 = (dy.float() * y.float()).sum(0)
            nz = lf != 0
            dl = s1 / torch.where(nz, lf, 1.0)
            # columns with l == 0: y has no z there, recompute it (meta tensors have no values: shapes only)
            if lf.device.type != "meta" and not bool(nz.all()):
                idx = (~nz).nonzero().squeeze(1)
                z = x.float() @ weight[idx].float().t()
                if bias is not None:
                    z += bias[idx].float()
                dl[idx] = (dy[:, idx].float() * z).sum(0)
        if need_dbias:
            dbias = dy.float().sum(0) * l.float()
        return dx, dbias, dl

    @staticmethod
    def act_forward(h, l, activation):
        # torch's own activation (in h's dtype), then one fp32 product: at l = 1 exactly act(h);
        # contiguous, as the op's fake says (a strided h gives a strided product)
        return (activation_reference(h, activation).float() * l.float()).to(h.dtype).contiguous()

    @staticmethod
    def act_backward(dy, h, l, activation, need_dh, need_dl):
        a, d = _act_and_grad(h.float(), activation)
        dyf = dy.float()
        dh = (dyf * l.float() * d).to(h.dtype) if need_dh else None
        dl = (dyf * a).sum(0) if need_dl else None
        return dh, dl


class _TritonImpl:
    """The triton backend (spu_kernels/triton/ia3.py: launch plans over its kernels)."""

    @staticmethod
    def linear_forward(x, weight, bias, l, side):
        return triton_kernels("ia3").linear_forward(x, weight, bias, l, side)

    @staticmethod
    def linear_backward(dy, x, y, weight, bias, l, side, need_dx, need_dbias, need_dl):
        return triton_kernels("ia3").linear_backward(dy, x, y, weight, bias, l, side, need_dx, need_dbias, need_dl)

    @staticmethod
    def act_forward(h, l, activation):
        return triton_kernels("ia3").act_forward(h, l, activation)

    @staticmethod
    def act_backward(dy, h, l, activation, need_dh, need_dl):
        return triton_kernels("ia3").act_backward(dy, h, l, activation, need_dh, need_dl)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pairs (spu_kernels/ops/_library.py): x / h (..., K), validated and cast. The leading dims
# are flattened inside the ops, so that no view node sits around them in the autograd graph (each
# costs host time in eager mode).
# ---------------------------------------------------------------------------------------------

def _linear_fwd(backend, x, weight, bias, l, side):
    y = _IMPLS["torch" if x.numel() == 0 else backend].linear_forward(tokens_2d(x), weight, bias, l, side)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _linear_fwd_fake(x, weight, bias, l, side):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_bwd(backend, dy, x, y, weight, bias, l, side, need_dx, need_dbias, need_dl):
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    dx, dbias, dl = impl.linear_backward(tokens_2d(dy), tokens_2d(x), tokens_2d(y), weight, bias, l, side,
                                         need_dx, need_dbias, need_dl)
    if dx is not None and dy.dim() != 2:
        dx = dx.view(*dy.shape[:-1], dx.shape[1])
    return grads_or_placeholders((dx, dbias, dl), (dy.dtype, dy.dtype, l.dtype), dy)


def _linear_bwd_fake(dy, x, y, weight, bias, l, side, need_dx, need_dbias, need_dl):
    k = weight.shape[1] if weight is not None else 0
    shapes = ((*dy.shape[:-1], k), (dy.shape[-1],), tuple(l.shape))
    return tuple(dy.new_empty(s if n else (0,), dtype=dt)
                 for s, n, dt in zip(shapes, (need_dx, need_dbias, need_dl), (dy.dtype, dy.dtype, l.dtype)))


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, l, side = inputs
    need_dx, _, need_db, need_dl = ctx.needs_input_grad[:4]
    keep_y = side == "output" and need_dl
    # output side: y (the returned tensor's storage, no copy) and x for the l == 0 columns;
    # input side: x. W only when a grad needs it.
    ctx.save_for_backward(x if need_dl else None, output if keep_y else None,
                          weight if (need_dx or need_dl) else None, bias if keep_y else None, l)
    ctx.cfg = (side, output.dtype)


def _linear_backward(ctx, bwd, dy):
    x, y, weight, bias, l = ctx.saved_tensors
    side, y_dtype = ctx.cfg
    need = ctx.needs_input_grad
    if dy.dtype != y_dtype:
        dy = dy.to(y_dtype)
    needs = (need[0], need[2], need[3])
    grads = bwd(dy, x, y, weight, bias, l, side, *needs)
    dx, dbias, dl = (t if n else None for t, n in zip(grads, needs))
    return dx, None, dbias, dl, None


IA3_LINEAR = define_op_pair(
    OP_LINEAR, IMPLEMENTED, fwd=_linear_fwd, bwd=_linear_bwd, fwd_fake=_linear_fwd_fake, bwd_fake=_linear_bwd_fake,
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor l, str side) -> Tensor",
    bwd_schema="(Tensor dy, Tensor? x, Tensor? y, Tensor? weight, Tensor? bias, Tensor l, str side, bool need_dx, "
               "bool need_dbias, bool need_dl) -> (Tensor, Tensor, Tensor)",
    setup_context=_linear_setup_context, backward=_linear_backward)
IA3LinearFunction = IA3_LINEAR.function


def _act_fwd(backend, h, l, activation):
    y = _IMPLS["torch" if h.numel() == 0 else backend].act_forward(tokens_2d(h), l, activation)
    return y if h.dim() == 2 else y.view(h.shape)


def _act_fwd_fake(h, l, activation):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _act_bwd(backend, dy, h, l, activation, need_dh, need_dl):
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    dh, dl = impl.act_backward(tokens_2d(dy), tokens_2d(h), l, activation, need_dh, need_dl)
    if dh is not None and h.dim() != 2:
        dh = dh.view(h.shape)
    return grads_or_placeholders((dh, dl), (h.dtype, l.dtype), dy)


def _act_bwd_fake(dy, h, l, activation, need_dh, need_dl):
    return (h.new_empty(h.shape if need_dh else (0,)), h.new_empty(l.shape if need_dl else (0,), dtype=l.dtype))


def _act_setup_context(ctx, inputs, output):
    h, l, activation = inputs
    ctx.save_for_backward(h, l)   # h only: act(h) and act'(h) are recomputed from it
    ctx.activation = activation


def _act_backward(ctx, bwd, dy):
    h, l = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy.dtype != h.dtype:
        dy = dy.to(h.dtype)
    dh, dl = bwd(dy, h, l, ctx.activation, need[0], need[1])
    return (dh if need[0] else None), (dl if need[1] else None), None


IA3_SCALED_ACT = define_op_pair(
    OP_ACT, IMPLEMENTED, fwd=_act_fwd, bwd=_act_bwd, fwd_fake=_act_fwd_fake, bwd_fake=_act_bwd_fake,
    fwd_schema="(Tensor h, Tensor l, str activation) -> Tensor",
    bwd_schema="(Tensor dy, Tensor h, Tensor l, str activation, bool need_dh, bool need_dl) -> (Tensor, Tensor)",
    setup_context=_act_setup_context, backward=_act_backward)
IA3ScaledActFunction = IA3_SCALED_ACT.function


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------

def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, l: torch.Tensor, *,
               side: str = "output", backend: str | None = None) -> torch.Tensor:
    """(IA)³ on a linear layer, fused: y = (x Wᵀ + b) ⊙ l (side="output", l (N,)) or
    y = (x ⊙ l) Wᵀ + b (side="input", l (K,)).

    Args:
        x: (..., K) in fp32, fp16 or bf16; any leading dims, any strides.
        weight: (N, K), frozen (requires_grad=False). bias: (N,) or None (gets a grad if it wants one).
        l: the scale vector, any float dtype: read as it is (no cast kernel); its grad comes in its
            dtype (an fp32 master copy gets fp32 grads).
        side: "output" or "input". backend: "torch" or "triton"; default as in spu_kernels.backends.
    """
    _check_linear(x, weight, bias, l, side)
    x, weight, bias = frozen_linear_dtypes(OP_LINEAR, x, weight, bias)
    chosen = resolve_backend(OP_LINEAR, IMPLEMENTED, x.device, backend)
    with autocast_off(x.device):
        return IA3_LINEAR(chosen, x, weight, bias, l, side)


def ia3_scaled_act(h: torch.Tensor, l: torch.Tensor, activation: str = "gelu", *,
                   backend: str | None = None) -> torch.Tensor:
    """y = act(h) ⊙ l, fused (one elementwise pass forward, one backward).

    h: (..., F) fp32 / fp16 / bf16; l: (F,); activation: gelu (erf), gelu_tanh, relu or silu."""
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"{OP_ACT}: h must be a tensor of shape (..., F), got {type(h).__name__}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP_ACT}: h must be float32, float16 or bfloat16, got {h.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP_ACT}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    _check_vec(OP_ACT, l, h.shape[-1], "F", h)
    dt = autocast_dtype(h.device)
    h = h.to(dt) if dt is not None else h
    chosen = resolve_backend(OP_ACT, IMPLEMENTED, h.device, backend)
    with autocast_off(h.device):
        return IA3_SCALED_ACT(chosen, h, l, activation)


def _check_vec(op, l, size, dim_name, x):
    if not isinstance(l, torch.Tensor) or tuple(l.shape) != (size,):
        got = tuple(l.shape) if isinstance(l, torch.Tensor) else type(l).__name__
        raise ValueError(f"{op}: the scale l must be ({dim_name}={size},), got {got}")
    if not l.is_floating_point():
        raise TypeError(f"{op}: l must be a floating tensor, got {l.dtype}")
    if l.device != x.device:
        raise ValueError(f"{op}: l is on {l.device} but the input is on {x.device}; move them to one device")


def _check_linear(x, weight, bias, l, side):
    if side not in SIDES:
        raise ValueError(f"{OP_LINEAR}: side must be 'output' (scale y) or 'input' (scale x), got {side!r}")
    k, n = check_frozen_linear(OP_LINEAR, x, weight, bias)
    if side == "output":
        _check_vec(OP_LINEAR, l, n, "N", x)
    else:
        _check_vec(OP_LINEAR, l, k, "K", x)
