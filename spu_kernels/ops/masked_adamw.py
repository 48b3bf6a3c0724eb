"""One AdamW step on selected entries of many tensors, in place (FishMask's optimiser step).

For each tensor p with flat entry indices idx (int64, unique, of p's row-major layout), its
gradient g (p's shape, contiguous) and fp32 state m, v of idx's length, every selected entry
e = idx[j] takes, in fp32 and rounded once to p's dtype:

    x  = p[e] · (1 − lr·wd)                          decoupled weight decay
    m_j ← m_j + (1 − β₁)·(g[e] − m_j)                (β₁·m_j + (1 − β₁)·g[e], as torch's lerp)
    v_j ← β₂·v_j + (1 − β₂)·g[e]²
    p[e] ← x − (lr / (1 − β₁ᵗ)) · m_j / (sqrt(v_j) / sqrt(1 − β₂ᵗ) + eps)

which is torch.optim.AdamW's step (t = step, counted from 1) on the gathered values. Entries
outside idx are neither read nor written, so the optimiser state is 2·len(idx) fp32 values per
tensor: ∝ the mask, not the model. The triton backend updates all tensors of one dtype in one
launch (a device-side pointer table, as the MeZO kernel).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..backends import resolve_backend, triton_kernels
from ._checks import FLOAT_DTYPES
from ._library import define_inplace_ops

OP_NAME = "masked_adamw"


def _torch_masked_adamw_(params, grads, indices, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
                         step):
    bc1, bc2_sqrt = 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)
    for p, g, idx, m, v in zip(params, grads, indices, exp_avgs, exp_avg_sqs):
        if idx.numel() == 0:
            continue
        flat = p.view(-1)
        gi = g.reshape(-1).index_select(0, idx).float()
        x = flat.index_select(0, idx).float() * (1.0 - lr * weight_decay)
        m.lerp_(gi, 1.0 - beta1)
        v.mul_(beta2).addcmul_(gi, gi, value=1.0 - beta2)
        x = x - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
        flat.index_copy_(0, idx, x.to(p.dtype))


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  backend: str | None = None) -> None:
    """In place: the AdamW step above on ``params[i]`` at ``indices[i]`` (see the module docstring).

    Args:
        params: fp32 / fp16 / bf16 tensors on one device, each contiguous.
        grads: their gradients (same shape and dtype, contiguous).
        indices: int64 1-D tensors of unique flat indices in [0, numel) (not checked here: the
            caller, e.g. MaskedAdamW, checks them once; a duplicate would race on the triton backend).
        exp_avgs, exp_avg_sqs: fp32 1-D state tensors of each index tensor's length, updated in place.
        step: the step number t >= 1 (for the bias corrections).
        backend: "torch" or "triton"; default as in spu_kernels.backends.
    """
    params, grads, indices = list(params), list(grads), list(indices)
    exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
    n = len(params)
    if not (len(grads) == len(indices) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError(f"{OP_NAME}: got {n} params, {len(grads)} grads, {len(indices)} index tensors, "
                         f"{len(exp_avgs)} exp_avgs and {len(exp_avg_sqs)} exp_avg_sqs; they must pair up")
    if n == 0:
        return
    device = params[0].device
    for i, (p, g, idx, m, v) in enumerate(zip(params, grads, indices, exp_avgs, exp_avg_sqs)):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP_NAME}: params[{i}] must be float32/float16/bfloat16, got {p.dtype}")
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"{OP_NAME}: grads[{i}] is {g.dtype} {tuple(g.shape)} but params[{i}] is "
                             f"{p.dtype} {tuple(p.shape)}; pass each parameter's own .grad")
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise TypeError(f"{OP_NAME}: indices[{i}] must be a 1-D int64 tensor, got {idx.dtype} of shape "
                            f"{tuple(idx.shape)}")
        for what, s in (("exp_avgs", m), ("exp_avg_sqs", v)):
            if s.dtype != torch.float32 or s.shape != idx.shape:
                raise ValueError(f"{OP_NAME}: {what}[{i}] must be float32 of shape {tuple(idx.shape)} (one per "
                                 f"index), got {s.dtype} {tuple(s.shape)}")
        for what, t in (("params", p), ("grads", g), ("indices", idx), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if t.device != device:
                raise ValueError(f"{OP_NAME}: {what}[{i}] is on {t.device} but params[0] is on {device}; "
                                 "call once per device")
            if not t.is_contiguous():
                raise ValueError(f"{OP_NAME}: {what}[{i}] is not contiguous; pass a contiguous tensor")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
        raise ValueError(f"{OP_NAME}: step must be an int >= 1 (the step number, for the bias corrections), "
                         f"got {step!r}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{OP_NAME}: betas must be in [0, 1), got ({beta1!r}, {beta2!r})")
    for name, val in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (math.isfinite(val) and val >= 0.0):
            raise ValueError(f"{OP_NAME}: {name} must be a finite number >= 0, got {val!r}")
    chosen = resolve_backend(OP_NAME, IMPLEMENTED, device, backend)
    args = (params, grads, indices, exp_avgs, exp_avg_sqs, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), int(step))
    with torch.no_grad():
        if torch.compiler.is_compiling():
            MASKED_ADAMW[chosen](*args)
        else:
            _step(chosen, *args)


def _step(backend, *args):
    if backend == "torch":
        _torch_masked_adamw_(*args)
    else:
        triton_kernels("masked_adamw").masked_adamw_multi(*args)


IMPLEMENTED = ("torch", "triton")
# torch.ops.spu_kernels.masked_adamw_<backend>: the op as torch.compile sees it (ops/_library.py)
MASKED_ADAMW = define_inplace_ops(
    OP_NAME, IMPLEMENTED, "(Tensor(a!)[] params, Tensor[] grads, Tensor[] indices, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()",
    _step, mutates=("params", "exp_avgs", "exp_avg_sqs"))
