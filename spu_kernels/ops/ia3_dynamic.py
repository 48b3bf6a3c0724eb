"""Data-dependent (IA)³: per-token scales l(x) = 1 + tanh(g Uᵀ), g = x Dᵀ, two ops.

    ia3_dynamic_linear(x, W, b, D, U):  y = (x Wᵀ + b) ⊙ (1 + tanh((x Dᵀ) Uᵀ))     keys, values
        x (..., K), W (N, K) frozen, b (N,) or None, D (r, K), U (N, r); y (..., N) in x's dtype
    dynamic_scale(z, g):                y = z ⊙ (1 + tanh(g))                        the FFN's input side
        z (..., S) activations, g (..., S) generator logits (adapter dtype); y in z's dtype

At U = 0 (the modules' start) the scale is exactly 1: the torch backend returns x Wᵀ + b as
``torch.addmm`` computes it (nn.Linear's own result, bit for bit), the triton kernel the same to
rounding (its GEMM tiling).

``IA3_DYNAMIC_LINEAR`` is an op pair (ops/_library.py; custom ops ``ia3_dynamic_linear_{fwd,bwd}_<backend>``).
Triton forward is one kernel: the GEMM's K loop over x also accumulates g = x Dᵀ and its epilogue
scales the output tile (spu_kernels/triton/ia3_dynamic.py). Saved for backward, nothing T×N of its own:
  * g = x Dᵀ (T, r) fp32, an auxiliary output: tiny; t = tanh(g Uᵀ) is recomputed from it tile by tile;
  * y, the output (the next layer, attention, holds it anyway): the logit grads are
    e = dy ⊙ z ⊙ (1 − t²) = dy ⊙ y ⊙ (1 − t), no division by 1 + t (which may round to 0) and no z;
  * x (a reference to the caller's tensor) for grad_D = (e U)ᵀ x; W for dx.
Backward (triton): one pass over dy and y gives dz = dy ⊙ (1 + t), dg = e U, and grad_U = eᵀ g,
grad_b = Σ_t dz as ordered row-block partials; then the GEMM core does dx = dz W + dg D (the generator's
path as its rank-r term, one GEMM) and grad_D = dgᵀ x. The torch backend does the same with torch calls.

``dynamic_scale`` (the FFN's form, (a ⊙ l(a)) W_downᵀ, l from a itself) stays in torch: fusing it as a
prologue scale of the GEMM's A tile needs g before the K loop (a second pass over a) and recomputes the
(BLOCK_M, r) × (r, BLOCK_K) logits and their tanh in every column block, which costs more than the one
elementwise pass it saves. It saves z (the caller's tensor) and t = tanh(g) in g's dtype: t gives both
1 − t² for dg and the scale 1 + t for dz, so the scale itself is not kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import resolve_backend, triton_kernels
from ._checks import autocast_off, check_frozen_linear, frozen_linear_dtypes, tokens_2d
from ._library import define_op_pair, grads_or_placeholders

OP_LINEAR = "ia3_dynamic_linear"


def ia3_dynamic_linear_reference(x, weight, bias, down, up):
    """Ground truth: the formula with torch autograd (generator in fp32, the scale cast to x's dtype)."""
    g = F.linear(x.to(down.dtype), down)
    return F.linear(x, weight, bias) * (1 + torch.tanh(F.linear(g, up))).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# backends: x (T, K) 2-D; every grad in the dtype of what it is for
# ---------------------------------------------------------------------------------------------

class _TorchImpl:
    """The torch backend: the kernels' decomposition with ATen calls (fp32 generator and grads)."""

    @staticmethod
    def forward(x, weight, bias, down, up):
        wide = _wide(x.dtype)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        g = x.to(wide) @ down.to(wide).t()
        # in place: no unscaled copy survives; a wide product, as the kernel's epilogue
        return y.copy_(y.to(wide) * (1 + torch.tanh(g @ up.to(wide).t()))), g

    @staticmethod
    def backward(dy, x, y, weight, down, up, g, need_dx, need_dbias, need_ddown, need_dup):
        dx = dbias = dd = du = None
        wide = g.dtype
        t = torch.tanh(g @ up.to(wide).t())
        dyw = dy.to(wide)
        dz = dyw * (1 + t)
        if need_dbias:
            dbias = dz.sum(0).to(dy.dtype)
        if need_dx or need_ddown or need_dup:
            e = dyw * y.to(wide) * (1 - t)     # dy ⊙ z ⊙ (1 − t²), z = y / (1 + t)
            if need_dup:
                du = (e.t() @ g).to(up.dtype)
            dg = e @ up.to(wide) if (need_dx or need_ddown) else None
            if need_ddown:
                dd = (dg.t() @ x.to(wide)).to(down.dtype)
            if need_dx:
                dx = (dz.to(dy.dtype) @ weight).add_((dg @ down.to(wide)).to(dy.dtype))
        return dx, dbias, dd, du


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The generator's and the grads' working dtype: fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TritonImpl:
    """The triton backend (spu_kernels/triton/ia3_dynamic.py)."""

    @staticmethod
    def forward(x, weight, bias, down, up):
        return triton_kernels("ia3_dynamic").linear_forward(x, weight, bias, down, up)

    @staticmethod
    def backward(dy, x, y, weight, down, up, g, need_dx, need_dbias, need_ddown, need_dup):
        return triton_kernels("ia3_dynamic").linear_backward(dy, x, y, weight, down, up, g, need_dx, need_dbias,
                                                             need_ddown, need_dup)


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pair (ops/_library.py): x (..., K) flattened inside the ops (no view node in the graph)
# ---------------------------------------------------------------------------------------------

def _fwd(backend, x, weight, bias, down, up):
    y, g = _IMPLS["torch" if x.numel() == 0 else backend].forward(tokens_2d(x), weight, bias, down, up)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), g


def _fwd_fake(x, weight, bias, down, up):
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((tokens, down.shape[0]), dtype=_wide(x.dtype))


def _bwd(backend, dy, x, y, weight, down, up, g, need_dx, need_dbias, need_ddown, need_dup):
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    dx, dbias, dd, du = impl.backward(tokens_2d(dy), tokens_2d(x), tokens_2d(y), weight, down, up, g,
                                      need_dx, need_dbias, need_ddown, need_dup)
    if dx is not None and dy.dim() != 2:
        dx = dx.view(*dy.shape[:-1], dx.shape[1])
    return grads_or_placeholders((dx, dbias, dd, du), (dy.dtype, dy.dtype, down.dtype, up.dtype), dy)


def _bwd_fake(dy, x, y, weight, down, up, g, need_dx, need_dbias, need_ddown, need_dup):
    shapes = ((*dy.shape[:-1], down.shape[1]), (dy.shape[-1],), tuple(down.shape), tuple(up.shape))
    dtypes = (dy.dtype, dy.dtype, down.dtype, up.dtype)
    return tuple(dy.new_empty(s if n else (0,), dtype=dt)
                 for s, n, dt in zip(shapes, (need_dx, need_dbias, need_ddown, need_dup), dtypes))


def _setup_context(ctx, inputs, output):
    x, weight, bias, down, up = inputs
    need_dx, _, _, need_dd, need_du = ctx.needs_input_grad[:5]
    keep_y = need_dx or need_dd or need_du
    # y: the returned tensor's storage (no copy); g: the auxiliary output; x only for grad_D; W only for dx
    ctx.save_for_backward(x if need_dd else None, output[0] if keep_y else None, weight if need_dx else None,
                          down, up, output[1])
    ctx.y_dtype = output[0].dtype


def _backward(ctx, bwd, dy):
    x, y, weight, down, up, g = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None:      # y unused (an undefined grad: the eager Function does not materialise zeros)
        return None, None, None, None, None
    if dy.dtype != ctx.y_dtype:
        dy = dy.to(ctx.y_dtype)
    needs = (need[0], need[2], need[3], need[4])
    grads = bwd(dy, x, y, weight, down, up, g, *needs)
    dx, dbias, dd, du = (t if n else None for t, n in zip(grads, needs))
    return dx, None, dbias, dd, du


IA3_DYNAMIC_LINEAR = define_op_pair(
    OP_LINEAR, IMPLEMENTED, fwd=_fwd, bwd=_bwd, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up) -> (Tensor, Tensor)",
    bwd_schema="(Tensor dy, Tensor? x, Tensor? y, Tensor? weight, Tensor down, Tensor up, Tensor g, "
               "bool need_dx, bool need_dbias, bool need_ddown, bool need_dup) -> (Tensor, Tensor, Tensor, Tensor)",
    setup_context=_setup_context, backward=_backward)
IA3DynamicLinearFunction = IA3_DYNAMIC_LINEAR.function


def ia3_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                       up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Data-dependent (IA)³ on a linear layer's output, fused: y = (x Wᵀ + b) ⊙ (1 + tanh((x Dᵀ) Uᵀ)).

    Args:
        x: (..., K) in fp32, fp16 or bf16 (float64 too on the torch backend, for gradcheck); any leading dims,
            any strides.
        weight: (N, K), frozen (requires_grad=False). bias: (N,) or None (gets a grad if it wants one).
        down: D (r, K); up: U (N, r) (rows of zeros leave their outputs unscaled, exactly). Any float
            dtype, read as they are (no cast kernel); their grads come in their own dtype.
        backend: "torch" or "triton"; default as in spu_kernels.backends.
    Under torch.autocast x, W and b are cast to the autocast dtype first, as nn.Linear would be.
    """
    f64 = isinstance(x, torch.Tensor) and x.dtype == torch.float64
    # float64 (gradcheck, the torch backend only) past the kernels' dtype check: a zero-stride fp32 stand-in
    k, n = check_frozen_linear(OP_LINEAR, torch.empty((), device=x.device).expand(x.shape) if f64 else x, weight,
                               bias)
    for name, t, shape in (("down (D)", down, "(r, K={})".format(k)), ("up (U)", up, f"(N={n}, r)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{OP_LINEAR}: {name} must be a 2-D tensor {shape}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{OP_LINEAR}: {name} must be a floating tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP_LINEAR}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    if down.shape[1] != k or down.shape[0] < 1:
        raise ValueError(f"{OP_LINEAR}: down (D) must be (r, K={k}) with r >= 1, got {tuple(down.shape)}")
    if tuple(up.shape) != (n, down.shape[0]):
        raise ValueError(f"{OP_LINEAR}: up (U) must be (N={n}, r={down.shape[0]}), got {tuple(up.shape)}")
    x, weight, bias = frozen_linear_dtypes(OP_LINEAR, x, weight, bias)
    chosen = "torch" if f64 and backend is None else resolve_backend(OP_LINEAR, IMPLEMENTED, x.device, backend)
    if f64 and chosen != "torch":
        raise TypeError(f"{OP_LINEAR}: float64 runs on the torch backend only (the {chosen} kernels take float32, "
                        "float16 or bfloat16); pass backend='torch' or cast x and the layer")
    with autocast_off(x.device):
        return IA3_DYNAMIC_LINEAR(chosen, x, weight, bias, down, up)[0]


def dynamic_scale_reference(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Plain torch: z ⊙ (1 + tanh(g)), the scale cast to z's dtype."""
    return z * (1 + torch.tanh(g)).to(z.dtype)


class DynamicScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(g)
        ctx.save_for_backward(z, t)
        return z * (1 + t).to(z.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        z, t = ctx.saved_tensors
        dz = dy * (1 + t).to(dy.dtype) if ctx.needs_input_grad[0] else None
        dg = None
        if ctx.needs_input_grad[1]:
            dg = (dy.to(t.dtype) * z.to(t.dtype)) * (1 - t * t)
        return dz, dg


def dynamic_scale(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y = z ⊙ (1 + tanh(g)) (see the module docstring); z and g of one shape, floating point."""
    if z.shape != g.shape:
        raise ValueError(f"dynamic_scale: z {tuple(z.shape)} and g {tuple(g.shape)} must have the same shape")
    if not (z.is_floating_point() and g.is_floating_point()):
        raise TypeError(f"dynamic_scale: z and g must be floating point, got {z.dtype} and {g.dtype}")
    if z.device != g.device:
        raise ValueError(f"dynamic_scale: z is on {z.device}, g on {g.device}; put them on one device")
    return DynamicScaleFunction.apply(z, g)
