"""Bottleneck adapter (Houlsby et al. 2019): a residual down-projection, non-linearity, up-projection
on a hidden state,

    bottleneck_adapter(h, W_d, b_d, W_u, b_u, act):   y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u

h (..., d) tokens; W_d (r, d), b_d (r,) or None; W_u (d, r), b_u (d,) or None; act in relu, gelu (erf),
silu, tanh. r is the bottleneck width. The adapter modules start W_u and b_u at zero, so y == h bit for
bit at step 0 (h + 0 in any dtype).

The op pair (ops/_library.py: custom ops ``bottleneck_adapter_{fwd,bwd}_<backend>`` for torch.compile,
an autograd.Function for eager calls) returns y and, as an auxiliary kept for backward, the bottleneck
pre-activation z = h W_dᵀ + b_d ((tokens, r), h's dtype). Saved for backward:
  * z (tokens × r, small): act(z) (for grad_W_u) and act'(z) (for dz) are recomputed from it, so
    neither the activation nor its derivative is ever stored;
  * h only when grad_W_d is wanted (a reference to the caller's tensor, which the model keeps alive
    anyway: it is the wrapped projection's output, the next residual add's input);
  * W_d, W_u (the adapter's own small weights).
Backward: g = dy W_u (tokens × r), dz = g ⊙ act'(z), dh = dy + dz W_d, grad_W_u = dyᵀ act(z),
grad_b_u = Σ_t dy, grad_W_d = dzᵀ h, grad_b_d = Σ_t dz.

The weights are read in their own dtype (an fp32 master copy: no cast kernel) and cast to h's dtype
inside (under torch.autocast h is cast to autocast's first); every product runs in h's dtype, as
nn.Linear would, and each weight's grad comes in that weight's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import resolve_backend, triton_kernels
from ._checks import FLOAT_DTYPES, autocast_dtype, autocast_off, tokens_2d
from ._library import define_op_pair, grads_or_placeholders

OP_NAME = "bottleneck_adapter"
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def activation_reference(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"{OP_NAME}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def bottleneck_adapter_reference(h, w_down, b_down, w_up, b_up, activation="relu"):
    """Ground truth: the formula with torch autograd (tensors as given, one dtype)."""
    return h + F.linear(activation_reference(F.linear(h, w_down, b_down), activation), w_up, b_up)


def act_and_grad(z32: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)) in fp32 for an fp32 z: the same formulas as the triton kernels."""
    if activation == "relu":
        return z32.clamp_min(0), (z32 > 0).to(z32.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z32 * 0.7071067811865476))
        return z32 * cdf, cdf + z32 * 0.3989422804014327 * torch.exp(-0.5 * z32 * z32)
    if activation == "silu":
        sig = torch.sigmoid(z32)
        return z32 * sig, sig * (1 + z32 * (1 - sig))
    t = torch.tanh(z32)
    return t, 1 - t * t


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

class _TorchImpl:
    """The torch backend: ATen GEMMs and elementwise ops, the same decomposition."""

    @staticmethod
    def forward(h, w_down, b_down, w_up, b_up, activation):
        w_down, b_down, w_up, b_up = _cast(h.dtype, w_down, b_down, w_up, b_up)
        z = torch.addmm(b_down, h, w_down.t()) if b_down is not None else h @ w_down.t()
        a = activation_reference(z, activation)
        y = torch.addmm(b_up, a, w_up.t()) if b_up is not None else a @ w_up.t()
        return y.add_(h), z

    @staticmethod
    def backward(dy, h, z, w_down, w_up, activation, need_dh, need_dwd, need_dbd, need_dwu, need_dbu):
        w_down, w_up = _cast(dy.dtype, w_down, w_up)
        a, d = act_and_grad(z.float(), activation)
        dz = None
        if need_dh or need_dwd or need_dbd:
            dz = ((dy @ w_up).float() * d).to(dy.dtype)
        dh = torch.addmm(dy, dz, w_down) if need_dh else None
        return _weight_grads(dy, h, dz, a.to(dy.dtype), need_dwd, need_dbd, need_dwu, need_dbu, dh)


def _cast(dtype, *tensors):
    return tuple(t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors)


def _weight_grads(dy, h, dz, a, need_dwd, need_dbd, need_dwu, need_dbu, dh):
    """(dh, grad_W_d, grad_b_d, grad_W_u, grad_b_u): the weight grads are token reductions, plain
    GEMMs on the (tokens × r) dz and act(z) (cuBLAS on a GPU, for both backends)."""
    dwd = dz.t() @ h if need_dwd else None
    dbd = dz.sum(0, dtype=torch.float32) if need_dbd else None
    dwu = dy.t() @ a if need_dwu else None
    dbu = dy.sum(0, dtype=torch.float32) if need_dbu else None
    return dh, dwd, dbd, dwu, dbu


class _TritonImpl:
    """The triton backend (spu_kernels/triton/bottleneck_adapter.py): the forward in one kernel; backward
    dh and dz in one kernel, the weight grads as GEMMs on its (tokens × r) outputs. A bottleneck wider
    than the kernels hold in registers (r > MAX_FUSED_RANK), and float64, run the torch backend's
    decomposition."""

    @staticmethod
    def forward(h, w_down, b_down, w_up, b_up, activation):
        k = triton_kernels("bottleneck_adapter")
        if w_down.shape[0] > k.MAX_FUSED_RANK or h.dtype == torch.float64:
            return _TorchImpl.forward(h, w_down, b_down, w_up, b_up, activation)
        return k.forward(h, w_down, b_down, w_up, b_up, activation)

    @staticmethod
    def backward(dy, h, z, w_down, w_up, activation, need_dh, need_dwd, need_dbd, need_dwu, need_dbu):
        k = triton_kernels("bottleneck_adapter")
        if w_down.shape[0] > k.MAX_FUSED_RANK or dy.dtype == torch.float64:
            return _TorchImpl.backward(dy, h, z, w_down, w_up, activation, need_dh, need_dwd, need_dbd, need_dwu,
                                       need_dbu)
        need_dz = need_dh or need_dwd or need_dbd
        dh, dz, a = k.backward(dy, z, w_down, w_up, activation, need_dh, need_dz, need_dwu)
        return _weight_grads(dy, h, dz, a, need_dwd, need_dbd, need_dwu, need_dbu, dh)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pair (spu_kernels/ops/_library.py): h (..., d), validated and cast; the leading dims are
# flattened inside the ops (no view node around them in the autograd graph)
# ---------------------------------------------------------------------------------------------

def _fwd(backend, h, w_down, b_down, w_up, b_up, activation):
    y, z = _IMPLS["torch" if h.numel() == 0 else backend].forward(tokens_2d(h), w_down, b_down, w_up, b_up,
                                                                   activation)
    return (y if h.dim() == 2 else y.view(h.shape)), z


def _fwd_fake(h, w_down, b_down, w_up, b_up, activation):
    tokens = math.prod(h.shape[:-1])
    return torch.empty_like(h, memory_format=torch.contiguous_format), h.new_empty((tokens, w_down.shape[0]))


def _bwd(backend, dy, h, z, w_down, w_up, activation, need_dh, need_dwd, need_dbd, need_dwu, need_dbu):
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    grads = impl.backward(tokens_2d(dy), tokens_2d(h), z, w_down, w_up, activation, need_dh, need_dwd, need_dbd,
                          need_dwu, need_dbu)
    dh = grads[0]
    if dh is not None and dy.dim() != 2:
        dh = dh.view(dy.shape)
    # the biases' grads in their weights' dtypes (the op's backward casts where a bias has another)
    return grads_or_placeholders((dh, *grads[1:]), (dy.dtype, w_down.dtype, w_down.dtype, w_up.dtype, w_up.dtype), dy)


def _bwd_fake(dy, h, z, w_down, w_up, activation, need_dh, need_dwd, need_dbd, need_dwu, need_dbu):
    r, d = w_down.shape
    shapes = (tuple(dy.shape), (r, d), (r,), (d, r), (d,))
    dtypes = (dy.dtype, w_down.dtype, w_down.dtype, w_up.dtype, w_up.dtype)
    needs = (need_dh, need_dwd, need_dbd, need_dwu, need_dbu)
    return tuple(dy.new_empty(s if n else (0,), dtype=dt) for s, n, dt in zip(shapes, needs, dtypes))


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, activation = inputs
    need_dwd = ctx.needs_input_grad[1]
    # z (tokens × r) for act(z) and act'(z); h only for grad_W_d (the caller's tensor, no copy)
    ctx.save_for_backward(h if need_dwd else None, output[1], w_down, w_up)
    ctx.cfg = (activation, h.dtype, b_down.dtype if b_down is not None else None,
               b_up.dtype if b_up is not None else None)


def _backward(ctx, bwd, dy):
    h, z, w_down, w_up = ctx.saved_tensors
    activation, h_dtype, bd_dtype, bu_dtype = ctx.cfg
    need = ctx.needs_input_grad
    if dy is None:      # y unused (the auxiliary z never gets a grad): nothing flows back
        return (None,) * 6
    if dy.dtype != h_dtype:
        dy = dy.to(h_dtype)
    needs = (need[0], need[1], need[2] and bd_dtype is not None, need[3], need[4] and bu_dtype is not None)
    dh, dwd, dbd, dwu, dbu = (t if n else None for t, n in zip(bwd(dy, h, z, w_down, w_up, activation, *needs), needs))
    dbd = dbd.to(bd_dtype) if dbd is not None and dbd.dtype != bd_dtype else dbd
    dbu = dbu.to(bu_dtype) if dbu is not None and dbu.dtype != bu_dtype else dbu
    return dh, dwd, dbd, dwu, dbu, None


BOTTLENECK_ADAPTER = define_op_pair(
    OP_NAME, IMPLEMENTED, fwd=_fwd, bwd=_bwd, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    fwd_schema="(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, str activation) "
               "-> (Tensor, Tensor)",
    bwd_schema="(Tensor dy, Tensor? h, Tensor z, Tensor w_down, Tensor w_up, str activation, bool need_dh, "
               "bool need_dwd, bool need_dbd, bool need_dwu, bool need_dbu) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward=_backward)
BottleneckAdapterFunction = BOTTLENECK_ADAPTER.function


# ---------------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------------

def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                       b_up: torch.Tensor | None, activation: str = "relu", *,
                       backend: str | None = None) -> torch.Tensor:
    """y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u, fused (see the module docstring).

    Args:
        h: (..., d) fp32 / fp16 / bf16 (or fp64: the torch decomposition on every backend), any leading
            dims and strides.
        w_down: (r, d); b_down: (r,) or None; w_up: (d, r); b_up: (d,) or None: any float dtype,
            read as they are (cast to h's inside the kernels; grads come in their own dtypes). Each
            gets a grad if it wants one, and so does h.
        activation: relu, gelu (erf), silu or tanh. backend: "torch" or "triton"; default as in
            spu_kernels.backends.
    """
    _check(h, w_down, b_down, w_up, b_up, activation)
    dt = autocast_dtype(h.device)
    if dt is not None:
        h = h.to(dt)
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, h.device, backend)
    with autocast_off(h.device):
        return BOTTLENECK_ADAPTER(chosen, h, w_down, b_down, w_up, b_up, activation)[0]


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check(h, w_down, b_down, w_up, b_up, activation) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"{OP_NAME}: h must be a tensor of shape (..., d), got {_shape(h)}")
    if h.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{OP_NAME}: h must be float32, float16, bfloat16 or float64, got {h.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP_NAME}: unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    d = h.shape[-1]
    if not isinstance(w_down, torch.Tensor) or w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"{OP_NAME}: w_down must be (r, d={d}) with r >= 1 for h of shape {tuple(h.shape)}, "
                         f"got {_shape(w_down)}")
    r = w_down.shape[0]
    expected = {"b_down": (r,), "w_up": (d, r), "b_up": (d,)}
    for name, t in (("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if t is None and name != "w_up":
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
            raise ValueError(f"{OP_NAME}: {name} must be {expected[name]} (r={r}, d={d}), got {_shape(t)}")
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{OP_NAME}: {name} must be a floating tensor, got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but h is on {h.device}; move them to one device")
