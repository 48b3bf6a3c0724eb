"""Input checks shared by the ops on a frozen linear layer (lowrank_linear, ia3_linear,
kron_linear) and by the seeded ops (dropout, zo_axpby): the messages say what was wrong and how
to fix it."""
from __future__ import annotations

import contextlib
import operator

import torch

from .dropout_rng import draw_seed

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_frozen_linear(op: str, x, weight, bias) -> tuple[int, int]:
    """x (..., K) float, weight (N, K) frozen, bias (N,) or None, all on x's device. Returns (K, N)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor of shape (..., K), got {type(x).__name__}"
                         + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else ""))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    k = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{op}: weight must be (N, K={k}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(getattr(weight, 'shape', ()))}")
    n = weight.shape[0]
    if weight.requires_grad:
        raise ValueError(f"{op}: weight requires grad, but this op computes no grad for the frozen "
                         "weight; call weight.requires_grad_(False) (spu_kernels.patch does this)")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must be (N={n},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    return k, n


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The torch.autocast dtype in force for tensors on ``device``, else None (meta tensors, used for
    shape inference, never autocast)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device: torch.device):
    """The context an op's autograd call runs in: autocast off (its inputs are cast already); no
    context at all where autocast is not on (entering one costs host time on every call)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return _NO_CONTEXT
    return torch.autocast(device.type, enabled=False)


def frozen_linear_dtypes(op: str, x, weight, bias):
    """(x, weight, bias) in one dtype: under torch.autocast all cast to the autocast dtype, as
    nn.Linear would be; otherwise they must already agree (an error saying how to fix it)."""
    dt = autocast_dtype(x.device)
    if dt is not None:
        return x.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{op}: x is {x.dtype} but weight is {weight.dtype}"
                        + (f" and bias {bias.dtype}" if bias is not None else "")
                        + "; cast the input or the layer to one dtype, or run under torch.autocast")
    return x, weight, bias


def tokens_2d(t):
    """t (..., C) as (tokens, C): t itself when 2-D (or None), else a reshape. The ops flatten inside
    their autograd Function, so that no view node sits around them in the graph (each costs host
    time in eager mode)."""
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


SEED_LIMIT = 2**63   # the Philox key is 64 bits, but the cuda op takes an int64: [0, 2**63) on every backend


def check_seed(op: str, seed) -> int:
    """A Philox seed as an int in [0, 2**63) (ints and numpy ints; not bools or floats)."""
    try:
        value = operator.index(seed) if not isinstance(seed, bool) else None
    except TypeError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{op}: seed must be an int in [0, 2**63) (the Philox key every backend takes), "
                         f"got {seed!r}; e.g. spu_kernels.ops.dropout_rng.new_seed(), or seed % 2**63")
    return value


def seed_tensor(op: str, seed, device: torch.device) -> torch.Tensor:
    """A dropout seed as the 0-dim int64 tensor on ``device`` the backends read: an int is checked
    (``check_seed``) and copied there; a tensor must hold one int64 (its value is not read here: on
    a GPU that would sync); None draws a fresh one (``dropout_rng.draw_seed``)."""
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"{op}: a seed tensor must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed.reshape(()).to(device)
    return torch.tensor(check_seed(op, seed), dtype=torch.int64, device=device)
