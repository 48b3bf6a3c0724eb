"""Data-dependent (IA)³'s scale: y = z ⊙ (1 + tanh(g)), per token and feature.

    dynamic_scale(z, g):  z (..., S) activations (model dtype), g (..., S) generator logits
                          (adapter dtype, e.g. fp32); y (..., S) in z's dtype.

At g = 0 (the generator's up projection starts at zero) the scale is exactly 1, so y == z bit for
bit in any dtype. torch only: the fused form (the per-token scale as an elementwise multiply in the
static (IA)³ GEMM epilogue, ops/ia3.py) is pending.

Saved for backward (the autograd of ``z * (1 + torch.tanh(g))`` would keep z, 1 + t and t):
  * z: dg = dy ⊙ z ⊙ (1 − t²) needs it (a reference to the caller's tensor, usually one that the
    caller's own graph keeps anyway, e.g. the layer input x on the input side);
  * t = tanh(g) in g's dtype: gives both 1 − t² for dg and the scale 1 + t for dz = dy ⊙ (1 + t),
    so the scale itself (another (..., S) tensor) is not kept.
"""
from __future__ import annotations

import torch


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
