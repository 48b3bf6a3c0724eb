"""MaskedAdamW: AdamW on chosen entries of each parameter only (FishMask, Sung et al. 2021).

    opt = MaskedAdamW([(p, idx), ...], lr=1e-4)     # idx: int64 flat indices into p (unique)
    loss.backward(); opt.step(); opt.zero_grad()

The state (``exp_avg``, ``exp_avg_sq``: fp32, one value per index) exists for the selected
entries only, so it takes 8 bytes per selected entry: ∝ the mask, not the model (torch's AdamW
keeps two full tensors per parameter). Entries outside the mask never change, whatever their
gradient holds. A step is one masked_adamw launch per dtype (and per distinct hyperparameter set)
over all parameters (ops/masked_adamw.py). Parameters may be fp32, fp16 or bf16 (fp32 state,
computed in fp32, rounded once); a parameter without a gradient is skipped, as torch's AdamW does.

``state_dict`` / ``load_state_dict`` keep the indices (int64) and the fp32 state as they are
(torch's loader would cast them to the parameter's dtype).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..ops._checks import FLOAT_DTYPES
from ..ops.masked_adamw import masked_adamw_


def _check_index(i: int, p: torch.Tensor, idx) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"MaskedAdamW: parameter {i} must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(p, 'dtype', type(p).__name__)}")
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        raise TypeError(f"MaskedAdamW: the mask of parameter {i} must be a 1-D int64 tensor of flat indices, got "
                        f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
    idx = idx.to(p.device)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= p.numel():
            raise ValueError(f"MaskedAdamW: the mask of parameter {i} (shape {tuple(p.shape)}, {p.numel()} entries) "
                             f"holds index {lo if lo < 0 else hi}, outside [0, {p.numel()})")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"MaskedAdamW: the mask of parameter {i} holds repeated indices; pass each entry once")
    return idx.contiguous()


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW whose state exists only for the entries of each parameter its mask names.

    Args:
        params: (parameter, indices) pairs, or param groups ``{"params": [(p, idx), ...], "lr": ...}``.
            ``indices``: 1-D int64 flat (row-major) indices into the parameter, unique.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, applied to the
            selected entries only).
        backend: "torch" or "triton" for the masked_adamw op; default as in spu_kernels.backends.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str | None = None):
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"MaskedAdamW: lr must be >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"MaskedAdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"MaskedAdamW: eps must be >= 0, got {eps!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"MaskedAdamW: weight_decay must be >= 0, got {weight_decay!r}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        plain_groups = []
        for g in groups:
            pairs = list(g["params"])
            for pair in pairs:
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise TypeError("MaskedAdamW takes (parameter, indices) pairs, e.g. "
                                    f"MaskedAdamW([(p, idx), ...]); got {type(pair).__name__}")
            checked = [(p, _check_index(len(masks) + j, p, idx)) for j, (p, idx) in enumerate(pairs)]
            masks.extend(checked)
            plain_groups.append({**g, "params": [p for p, _ in checked]})
        if len({id(p) for p, _ in masks}) != len(masks):
            raise ValueError("MaskedAdamW: a parameter appears twice; give each one mask")
        super().__init__(plain_groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend
        for p, idx in masks:
            self.state[p] = {"step": 0, "index": idx,
                             "exp_avg": torch.zeros(idx.numel(), dtype=torch.float32, device=p.device),
                             "exp_avg_sq": torch.zeros(idx.numel(), dtype=torch.float32, device=p.device)}

    def state_numel(self) -> int:
        """Optimiser state entries (exp_avg + exp_avg_sq, fp32): 2 x the selected entries."""
        return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in self.state.values())

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            batches: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not take sparse gradients")
                st = self.state[p]
                st["step"] += 1
                batches.setdefault((p.device, st["step"]), []).append(p)
            for (_, step), ps in batches.items():
                grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in ps]
                datas = [p.data if p.is_contiguous() else p.data.contiguous() for p in ps]
                masked_adamw_(datas, grads, [self.state[p]["index"] for p in ps],
                              [self.state[p]["exp_avg"] for p in ps], [self.state[p]["exp_avg_sq"] for p in ps],
                              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=step, backend=self.backend)
                for p, d in zip(ps, datas):
                    if d is not p.data:
                        p.data.copy_(d)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the indices stay int64 and the state fp32 (checked against this optimiser's masks)."""
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        own = {p: self.state[p]["index"] for p in params}
        super().load_state_dict({**state_dict, "state": {}})
        if set(saved) != set(range(len(params))):
            raise ValueError(f"MaskedAdamW.load_state_dict: the state has entries for {len(saved)} parameters, "
                             f"this optimiser has {len(params)}")
        for i, p in enumerate(params):
            s = saved[i]
            if not torch.equal(s["index"].to(p.device), own[p]):
                raise ValueError(f"MaskedAdamW.load_state_dict: parameter {i}'s mask differs from the saved one; "
                                 "build the optimiser with the masks it was saved with")
            self.state[p] = {"step": int(s["step"]), "index": own[p],
                             "exp_avg": s["exp_avg"].to(device=p.device, dtype=torch.float32).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=torch.float32).clone()}
