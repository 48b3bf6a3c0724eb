"""The fused low-rank linear, shared by LoRA and SiVA:

    y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ

x (..., K) tokens; W (N, K) frozen; b (N,) optional; A (r, K); B (N, r); s a scalar; g (r,) an
optional per-rank scale (SiVA's singular values; LoRA has none); drop() inverted dropout with
probability p whose mask is regenerated from a seed (ops/dropout_rng.py), never stored.

Three things live here:
  * ``lowrank_linear_reference``: the math in plain torch with autograd: the ground truth.
  * ``LOWRANK_LINEAR``: the op pair (ops/_library.py): custom ops ``lowrank_linear_{fwd,bwd}_<backend>``
    for torch.compile and ``LowRankLinearFunction`` for eager calls, over one implementation. It
    saves x (the caller's tensor, no copy, and only when A needs a grad), u = drop(x) Aᵀ (T×r) and
    the seed (a 0-dim tensor): never a mask, a dropped-out x, or a T×N branch output. Grads for x,
    b, A, B and g as each is needed; none for W.
  * the torch backend (``_TorchImpl``, the same decomposition with cuBLAS / ATen calls) and the
    dispatch to the triton backend (spu_kernels/triton/lowrank_linear.py) and the cuda backend
    (spu_kernels._C, csrc/lowrank_linear.cpp).
"""
from __future__ import annotations

import functools
import math

import torch

from ..backends import resolve_backend, triton_kernels
from ._checks import autocast_off, check_frozen_linear, frozen_linear_dtypes, seed_tensor, tokens_2d
from ._library import define_op_pair, no_grad_placeholder
from .dropout_rng import dropout_keep_mask, dropout_threshold

OP_NAME = "lowrank_linear"


def lowrank_linear_reference(x, weight, bias, lora_a, lora_b, scale=1.0, rank_scale=None, dropout_p=0.0,
                             seed=None):
    """Ground truth: the formula as written, differentiable by torch autograd (keeps whatever
    autograd keeps). The dropout mask is the spec's mask for ``seed``."""
    h = x
    if dropout_p > 0:
        if seed is None:
            raise ValueError("lowrank_linear_reference: dropout_p > 0 needs the seed of the mask")
        k = x.shape[-1]
        keep = dropout_keep_mask(seed, x.numel() // k, k, dropout_p, x.device).view(x.shape)
        h = x * keep.to(x.dtype) / (1.0 - dropout_p)
    h = h @ lora_a.t()
    if rank_scale is not None:
        h = h * rank_scale
    y = x @ weight.t() + scale * (h @ lora_b.t())
    if bias is not None:
        y = y + bias
    return y


def grad_layout(r: int, k: int, n: int, need_dbias: bool, need_da: bool, need_db: bool,
                need_dg: bool) -> tuple[dict, int]:
    """Where the reduced grads sit in the one fp32 vector the backward op returns: grad_A (r, K),
    grad_B (N, r), grad_bias (N,), grad_g (r,), those asked for, in this order. Returns
    ({name: (offset, shape)}, total length). One vector: the triton backend's kernels write their
    token splits' partial sums into rows laid out this way and one ordered sum finishes them all,
    and a custom op may not return views of one buffer as several outputs."""
    if type(r) is int and type(k) is int and type(n) is int:   # not symbolic (a fake tensor's sizes)
        return _cached_grad_layout(r, k, n, need_dbias, need_da, need_db, need_dg)
    return _grad_layout(r, k, n, need_dbias, need_da, need_db, need_dg)


def _grad_layout(r, k, n, need_dbias, need_da, need_db, need_dg):
    out, off = {}, 0
    for name, shape, need in (("a", (r, k), need_da), ("b", (n, r), need_db), ("bias", (n,), need_dbias),
                              ("g", (r,), need_dg)):
        if need:
            out[name] = (off, shape)
            off += math.prod(shape)
    return out, off


_cached_grad_layout = functools.lru_cache(maxsize=1024)(_grad_layout)


def _pack(grads: dict, layout: dict, total: int, device) -> torch.Tensor:
    """The torch backend makes separate grads; it packs them as the kernel backends return them."""
    if not layout:
        return torch.empty((0,), device=device, dtype=torch.float32)
    return torch.cat([grads[name].float().reshape(-1) for name in layout])


class _TorchImpl:
    """The torch backend: the kernels' decomposition with plain torch calls (A, B, g cast to x's
    dtype first, u kept in fp32 like the kernels')."""

    @staticmethod
    def dropped(x, p, seed):
        if p == 0:
            return x
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))

    @staticmethod
    def forward(x, weight, bias, a, b, g, scale, p, seed):
        dt = x.dtype
        a, b, g = a.to(dt), b.to(dt), (g.to(dt) if g is not None else None)
        u = _TorchImpl.dropped(x, p, seed) @ a.t()
        ug = u * (g * scale) if g is not None else u * scale
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        y.addmm_(ug, b.t())   # accumulate in place: no T×N branch output
        return y, u.float()

    @staticmethod
    def backward(dy, x, weight, a, b, g, u, scale, p, seed, need_dx, need_dbias, need_da, need_db, need_dg):
        dt = dy.dtype
        a, b, g, u_dt = a.to(dt), b.to(dt), (g.to(dt) if g is not None else None), u.to(dt)
        gs = g * scale if g is not None else scale
        v = dy @ b
        vg = v * gs
        dx, grads = None, {}
        if need_dx:
            dx = dy @ weight
            if p == 0:
                dx.addmm_(vg, a)
            else:
                dx += _TorchImpl.dropped(vg @ a, p, seed)
        if need_da:
            grads["a"] = vg.t() @ _TorchImpl.dropped(x, p, seed)
        if need_db:
            grads["b"] = dy.t() @ (u_dt * gs)
        if need_dg:
            grads["g"] = (u * v.float()).sum(0) * scale
        if need_dbias:
            grads["bias"] = dy.sum(0)
        layout, total = grad_layout(a.shape[0], a.shape[1], b.shape[0], need_dbias, need_da, need_db, need_dg)
        return dx, _pack(grads, layout, total, dy.device)


class _TritonImpl:
    """The triton backend (kernels in spu_kernels/triton/lowrank_linear.py): A, B, g read in their
    own dtype, u and every reduced grad in fp32, so no cast kernel runs."""

    @staticmethod
    def forward(x, weight, bias, a, b, g, scale, p, seed):
        return triton_kernels("lowrank_linear").forward(x, weight, bias, a, b, g, scale, p, seed,
                                                        dropout_threshold(p) if p > 0 else 0)

    @staticmethod
    def backward(dy, x, weight, a, b, g, u, scale, p, seed, need_dx, need_dbias, need_da, need_db, need_dg):
        layout, total = grad_layout(a.shape[0], a.shape[1], b.shape[0], need_dbias, need_da, need_db, need_dg)
        dx, ws = triton_kernels("lowrank_linear").backward(dy, x, weight, a, b, g, u, scale, p, seed,
                                                           dropout_threshold(p) if p > 0 else 0, need_dx, layout,
                                                           total)
        return dx, ws


class _CudaImpl:
    """The cuda backend: torch.ops.spu_kernels.lowrank_linear_{fwd,bwd} from spu_kernels._C
    (csrc/lowrank_linear.cpp): CUDA kernels write the rank-r term (and bias) into the output and
    cuBLAS adds the dense GEMM onto it (beta = 1); passes over x and dy for the skinny products.
    Like the triton backend it reads A, B, g in their own dtype and returns u and the packed grads
    in fp32, so no cast or packing op runs here."""

    @staticmethod
    def _ops():
        from .._extension import load_extension
        load_extension()   # registers torch.ops.spu_kernels.* (resolve_backend checked it loads)
        return torch.ops.spu_kernels

    @staticmethod
    def forward(x, weight, bias, a, b, g, scale, p, seed):
        return _CudaImpl._ops().lowrank_linear_fwd(x, weight, bias, a, b, g, scale, p, seed,
                                                   dropout_threshold(p) if p > 0 else 0)

    @staticmethod
    def backward(dy, x, weight, a, b, g, u, scale, p, seed, need_dx, need_dbias, need_da, need_db, need_dg):
        dx, packed = _CudaImpl._ops().lowrank_linear_bwd(dy, x, weight, a, b, g, u, scale, p, seed,
                                                         dropout_threshold(p) if p > 0 else 0, need_dx, need_dbias,
                                                         need_da, need_db, need_dg)
        return (dx if need_dx else None), packed


_IMPLS = {"torch": _TorchImpl, "triton": _TritonImpl, "cuda": _CudaImpl}
IMPLEMENTED = tuple(_IMPLS)


# ---------------------------------------------------------------------------------------------
# the op pair (spu_kernels/ops/_library.py): x (..., K), validated; W, bias in x's dtype; A, B, g in
# their own (master) dtype. The leading dims are flattened inside the ops, so that no view node
# sits around them in the autograd graph (each costs host time in eager mode).
# ---------------------------------------------------------------------------------------------

def _fwd(backend, x, weight, bias, a, b, g, scale, p, seed):
    impl = _IMPLS["torch" if x.numel() == 0 else backend]
    y, u = impl.forward(tokens_2d(x), weight, bias, a, b, g, scale, p, seed)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), u


def _fwd_fake(x, weight, bias, a, b, g, scale, p, seed):
    tokens = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((tokens, a.shape[0]), dtype=torch.float32)


def _bwd(backend, dy, x, weight, a, b, g, u, scale, p, seed, need_dx, need_dbias, need_da, need_db, need_dg):
    """(dx or an empty placeholder, the packed fp32 grads: grad_layout)."""
    impl = _IMPLS["torch" if dy.numel() == 0 else backend]
    flat = dy.dim() == 2
    dx, packed = impl.backward(tokens_2d(dy), tokens_2d(x), weight, a, b, g, u, scale, p, seed, need_dx, need_dbias,
                               need_da, need_db, need_dg)
    if dx is None:
        return no_grad_placeholder(dy), packed
    return (dx if flat else dx.view(*dy.shape[:-1], a.shape[1])), packed


def _bwd_fake(dy, x, weight, a, b, g, u, scale, p, seed, need_dx, need_dbias, need_da, need_db, need_dg):
    _, total = grad_layout(a.shape[0], a.shape[1], b.shape[0], need_dbias, need_da, need_db, need_dg)
    return (dy.new_empty((*dy.shape[:-1], a.shape[1]) if need_dx else (0,)),
            dy.new_empty((total,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, a, b, g, scale, p, seed = inputs
    need_dx, _, _, need_da = ctx.needs_input_grad[:4]
    # x only for grad_A (the caller's tensor: no new memory); u for grad_B and grad_g; the seed (a
    # 0-dim tensor) so that backward regenerates the forward's mask.
    ctx.save_for_backward(x if need_da else None, weight if need_dx else None, a, b, g, output[1], seed)
    ctx.cfg = (scale, p, x.dtype, bias.dtype if bias is not None else None)


def _backward(ctx, bwd, dy):
    x, weight, a, b, g, u, seed = ctx.saved_tensors
    scale, p, x_dtype, bias_dtype = ctx.cfg
    need = ctx.needs_input_grad
    if dy.dtype != x_dtype:
        dy = dy.to(x_dtype)
    needs = (need[0], need[2], need[3], need[4], need[5])
    dx, packed = bwd(dy, x, weight, a, b, g, u, scale, p, seed, *needs)
    layout, _ = grad_layout(a.shape[0], a.shape[1], b.shape[0], *needs[1:])
    dtypes = {"a": a.dtype, "b": b.dtype, "bias": bias_dtype, "g": g.dtype if g is not None else None}
    grads = {}
    for name, (off, shape) in layout.items():
        t = packed[off:off + math.prod(shape)].view(shape)
        grads[name] = t if t.dtype == dtypes[name] else t.to(dtypes[name])
    return (dx if need[0] else None, None, grads.get("bias"), grads.get("a"), grads.get("b"), grads.get("g"),
            None, None, None)


LOWRANK_LINEAR = define_op_pair(
    OP_NAME, IMPLEMENTED, fwd=_fwd, bwd=_bwd, fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, Tensor? g, float scale, float p, "
               "Tensor? seed) -> (Tensor, Tensor)",
    bwd_schema="(Tensor dy, Tensor? x, Tensor? weight, Tensor a, Tensor b, Tensor? g, Tensor u, float scale, "
               "float p, Tensor? seed, bool need_dx, bool need_dbias, bool need_da, bool need_db, "
               "bool need_dg) -> (Tensor, Tensor)",
    setup_context=_setup_context, backward=_backward)
LowRankLinearFunction = LOWRANK_LINEAR.function


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   lora_a: torch.Tensor, lora_b: torch.Tensor, *, scale: float = 1.0,
                   rank_scale: torch.Tensor | None = None, dropout_p: float = 0.0,
                   seed: int | torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """y = x Wᵀ + b + scale · ((drop(x) Aᵀ) ⊙ rank_scale) Bᵀ, fused.

    Args:
        x: (..., K) in fp32, fp16 or bf16; any leading dims, any strides.
        weight: (N, K), frozen (``requires_grad=False``): no grad is computed for it.
        bias: (N,) or None; gets a grad when it requires one.
        lora_a: A, (r, K). lora_b: B, (N, r). rank_scale: g, (r,) or None. Any float dtype: the
            kernels round them to x's dtype as they read them (no cast kernel), and their grads
            come in their own dtype (fp32 master copies get fp32 grads).
        scale: s. dropout_p: p in [0, 1), applied to the adapter's input only.
        seed: the dropout mask's seed: an int in [0, 2**63) or a one-element int64 tensor; None
            draws a fresh one on x's device (``dropout_rng.draw_seed``; a runtime value under
            torch.compile, never a constant of the graph).
        backend: "torch", "triton" or "cuda"; default as in spu_kernels.backends.
    Under torch.autocast every input is cast to the autocast dtype first, as nn.Linear would be.
    Runs as the custom op ``torch.ops.spu_kernels.lowrank_linear_fwd_<backend>`` under torch.compile.
    """
    _check(x, weight, bias, lora_a, lora_b, rank_scale, scale, dropout_p)
    seed_t = seed_tensor(OP_NAME, seed, x.device) if dropout_p > 0 else None
    x, weight, bias = frozen_linear_dtypes(OP_NAME, x, weight, bias)
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, x.device, backend)
    with autocast_off(x.device):
        return LOWRANK_LINEAR(chosen, x, weight, bias, lora_a, lora_b, rank_scale, float(scale), float(dropout_p),
                              seed_t)[0]


def _check(x, weight, bias, a, b, g, scale, p) -> None:
    """Shape / dtype / device checks with messages that say what to change."""
    def shape(t):
        return tuple(t.shape)
    k, n = check_frozen_linear(OP_NAME, x, weight, bias)
    if a.dim() != 2 or a.shape[1] != k or a.shape[0] < 1:
        raise ValueError(f"{OP_NAME}: lora_a (A) must be (r, K={k}) with r >= 1, got {shape(a)}")
    r = a.shape[0]
    if shape(b) != (n, r):
        raise ValueError(f"{OP_NAME}: lora_b (B) must be (N={n}, r={r}), got {shape(b)}")
    if g is not None and shape(g) != (r,):
        raise ValueError(f"{OP_NAME}: rank_scale (g) must be (r={r},), got {shape(g)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", a), ("lora_b", b), ("rank_scale", g)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP_NAME}: {name} is on {t.device} but x is on {x.device}; move them to one device")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{OP_NAME}: {name} must be a floating tensor, got {t.dtype}")
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{OP_NAME}: dropout_p must be a number in [0, 1), got {p!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{OP_NAME}: scale must be a finite number, got {scale!r}")
