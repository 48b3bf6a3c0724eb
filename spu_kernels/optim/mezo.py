"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes").

One step, with a fresh seed s and z ~ N(0, I) regenerated from s by the zo_axpby op (never stored):

    θ ← θ + εz;  L₊ = L(θ)          sweep 1
    θ ← θ − 2εz; L₋ = L(θ)          sweep 2
    g = (L₊ − L₋) / (2ε)            the projected gradient, a scalar
    θ ← (θ + εz) − lr·(g·z + wd·(θ + εz))   sweep 3: restore and update in one pass,
      = a·θ + (a·ε − lr·g)·z   with a = 1 − lr·wd

So a step costs two forward passes (run under no_grad: no activations kept) plus three
memory-bound sweeps over the trainable parameters, and (fp32 parameters) no memory beyond inference. Works on any
trainable set: a full model, LoRA / SiVA adapters, soft prompts (only parameters with
requires_grad=True are perturbed).

fp16 / bf16 parameters: θ+εz−2εz+εz rounds three times, so restoring by sweeps drifts (lr = 0
moved bf16 weights by up to 7.8e-3 in 20 steps, 6.6e-2 on triton). A half-precision θ is therefore copied before the
step (one copy of those parameters in their dtype, far below backprop's memory) and sweep 3
restarts from it: θ ← a·θ_saved − lr·g·z, rounded once, and exactly θ_saved when lr = 0. fp32 keeps
the in-place sweeps (restored to rounding, no copy).

Errors: if the closure raises, a loss is not finite or the update overflows, θ is put back (half
precision exactly, fp32 to rounding) before the error propagates; an eps whose εz could overflow
the parameters' dtype is refused before anything moves. Non-contiguous parameters are swept
through a contiguous copy.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..ops._checks import FLOAT_DTYPES
from ..ops.dropout_rng import new_seed
from ..ops.zo_perturb import Z_MAX, zo_axpby_

_HALF = (torch.float16, torch.bfloat16)


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD with seeded perturbations.

        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3, weight_decay=0.0)
        def closure():
            return model(**batch).loss          # called twice per step, under torch.no_grad()
        loss = opt.step(closure)

    ``lr`` and ``weight_decay`` may differ per param group; ``eps`` is one value for the whole
    optimiser (the two-sided difference needs one ε for all coordinates). ``step`` returns the
    mean of L₊ and L₋; ``last_step`` holds (seed, L₊, L₋, g) of the latest step. Seeds come from
    torch's CPU generator, so ``torch.manual_seed`` makes runs repeat.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"MeZO: lr must be >= 0, got {lr!r}")
        if not eps > 0.0:
            raise ValueError(f"MeZO: eps must be > 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"MeZO: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps = float(eps)
        self.backend = backend
        self.last_step: dict | None = None

    def _trainable(self):
        """[(group, [params])] with each param's global base offset fixed by its place in the
        optimiser, so z of a parameter is the same whatever else trains."""
        out, offset, bases = [], 0, {}
        for group in self.param_groups:
            ps = []
            for p in group["params"]:
                if p.requires_grad:
                    bases[p] = offset
                    ps.append(p)
                offset += p.numel()
            out.append((group, ps))
        return out, bases

    def _sweep(self, params, bases, seed, alpha, beta, shift=None):
        """p ← α·p + β·z, one zo_axpby_ call per device; a non-contiguous parameter goes through a
        contiguous copy (its z follows its row-major index, as for any tensor). ``shift`` records
        the multiple of z each parameter carries once its batch is done (for ``_restore``)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for ps in by_device.values():
            ts = [p.data if p.is_contiguous() else p.data.contiguous() for p in ps]
            zo_axpby_(ts, seed, alpha, beta, bases=[bases[p] for p in ps], backend=self.backend)
            for p, t in zip(ps, ts):
                if not p.is_contiguous():
                    p.data.copy_(t)
                if shift is not None:
                    shift[p] = shift.get(p, 0.0) + beta

    def _restore(self, params, bases, seed, shift, saved):
        """θ as before the step: half precision from the saved copy (exactly), fp32 by −shift·z."""
        for p, t in saved.items():
            p.data.copy_(t)
        by_shift: dict[float, list[torch.Tensor]] = {}
        for p in params:
            if p not in saved and shift.get(p, 0.0) != 0.0:
                by_shift.setdefault(shift[p], []).append(p)
        for s, ps in by_shift.items():
            self._sweep(ps, bases, seed, 1.0, -s)

    def _check_params(self, params) -> None:
        """Before anything moves: float dtypes, and an eps whose εz cannot overflow them."""
        for dt in {p.dtype for p in params}:
            if dt not in FLOAT_DTYPES:
                raise TypeError(f"MeZO: a trainable parameter is {dt}; MeZO perturbs float32 / float16 / "
                                "bfloat16 parameters (freeze the others: requires_grad_(False))")
            limit = torch.finfo(dt).max / (2 * Z_MAX)
            if self.eps > limit:
                raise ValueError(f"MeZO: eps={self.eps:g} would overflow {dt} parameters (|εz| reaches "
                                 f"{Z_MAX}·eps); use a smaller eps, at most {limit:.3g} (1e-3 is usual)")

    def _loss(self, closure, which: str) -> float:
        value = float(closure())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"MeZO: the loss {which} is {value}, not finite; the parameters were restored. Check the "
                f"loss (inputs, log of 0, fp16 overflow) or use a smaller eps (now {self.eps:g})")
        return value

    def _update(self, group, ps, bases, seed, g, saved) -> None:
        """Sweep 3: fp32 from θ−εz, θ ← a·θ + (a·ε − lr·g)·z; half precision from the saved θ,
        θ ← a·θ_saved − lr·g·z (one rounding; lr = 0 leaves θ bit for bit)."""
        lr, a = group["lr"], 1.0 - group["lr"] * group["weight_decay"]
        self._sweep([p for p in ps if p not in saved], bases, seed, a, a * self.eps - lr * g)
        half = [p for p in ps if p in saved]
        for p in half:
            p.data.copy_(saved[p])
        if half and (a != 1.0 or lr * g != 0.0):
            self._sweep(half, bases, seed, a, -lr * g)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("MeZO.step(closure) needs a closure that returns the loss: a step evaluates it twice, "
                             "at θ+εz and θ−εz")
        groups, bases = self._trainable()
        params = [p for _, ps in groups for p in ps]
        if not params:
            raise ValueError("MeZO: no parameter with requires_grad=True to optimise")
        self._check_params(params)
        seed, eps = new_seed(), self.eps
        saved = {p: p.detach().clone() for p in params if p.dtype in _HALF}
        shift: dict[torch.Tensor, float] = {}
        try:   # any error before the update puts θ back first
            self._sweep(params, bases, seed, 1.0, eps, shift)
            loss_pos = self._loss(closure, "L₊ = L(θ+εz) (the closure's first call)")
            self._sweep(params, bases, seed, 1.0, -2.0 * eps, shift)
            loss_neg = self._loss(closure, "L₋ = L(θ−εz) (the closure's second call)")
            g = (loss_pos - loss_neg) / (2.0 * eps)
            if not all(math.isfinite(group["lr"] * g) for group, _ in groups):
                raise FloatingPointError(f"MeZO: the update lr·g is not finite (g = (L₊ − L₋)/2ε = {g:g}, with "
                                         f"L₊ = {loss_pos:g}, L₋ = {loss_neg:g}); the parameters were restored. "
                                         "Use a larger eps or a smaller lr")
        except BaseException:
            self._restore(params, bases, seed, shift, saved)
            raise
        for group, ps in groups:
            self._update(group, ps, bases, seed, g, saved)
        self.last_step = dict(seed=seed, loss_pos=loss_pos, loss_neg=loss_neg, projected_grad=g)
        return torch.tensor(0.5 * (loss_pos + loss_neg))
