"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes").

One step, with a fresh seed s and z ~ N(0, I) regenerated from s by the zo_axpby op (never stored):

    θ ← θ + εz;  L₊ = L(θ)          sweep 1
    θ ← θ − 2εz; L₋ = L(θ)          sweep 2
    g = (L₊ − L₋) / (2ε)            the projected gradient, a scalar
    θ ← (θ + εz) − lr·(g·z + wd·(θ + εz))   sweep 3: restore and update in one pass,
      = a·θ + (a·ε − lr·g)·z   with a = 1 − lr·wd

So a step costs two forward passes (run under no_grad: no activations kept) plus three
memory-bound sweeps over the trainable parameters, and no memory beyond inference. Works on any
trainable set: a full model, LoRA / SiVA adapters, soft prompts (only parameters with
requires_grad=True are perturbed).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..ops.dropout_rng import new_seed
from ..ops.zo_perturb import zo_axpby_


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

    def _sweep(self, params, bases, seed, alpha, beta):
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        for ps in by_device.values():
            zo_axpby_([p.data for p in ps], seed, alpha, beta, bases=[bases[p] for p in ps], backend=self.backend)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("MeZO.step(closure) needs a closure that returns the loss: a step evaluates it twice, "
                             "at θ+εz and θ−εz")
        groups, bases = self._trainable()
        params = [p for _, ps in groups for p in ps]
        if not params:
            raise ValueError("MeZO: no parameter with requires_grad=True to optimise")
        seed, eps = new_seed(), self.eps
        self._sweep(params, bases, seed, 1.0, eps)
        loss_pos = float(closure())
        self._sweep(params, bases, seed, 1.0, -2.0 * eps)
        loss_neg = float(closure())
        g = (loss_pos - loss_neg) / (2.0 * eps)
        for group, ps in groups:
            a = 1.0 - group["lr"] * group["weight_decay"]
            self._sweep(ps, bases, seed, a, a * eps - group["lr"] * g)
        self.last_step = dict(seed=seed, loss_pos=loss_pos, loss_neg=loss_neg, projected_grad=g)
        return torch.tensor(0.5 * (loss_pos + loss_neg))
