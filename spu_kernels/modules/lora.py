"""LoRALinear: y = x Wᵀ + b + (alpha / r) · (drop(x) Aᵀ) Bᵀ (Hu et al. 2021), fused."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .lowrank_base import LowRankAdapterLinear


class LoRALinear(LowRankAdapterLinear):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a trainable rank-r update.

    A (``lora_A``, (S·r, K)) starts Kaiming-uniform as nn.Linear's weight does and B (``lora_B``,
    (rows, r)) starts at zero, so the wrapped layer's output is unchanged at step 0.
    Scaling s = alpha / r, or alpha / sqrt(r) with ``use_rslora``. Adapter parameters are kept in
    ``adapter_dtype`` (fp32 by default: fp32 master weights for the optimiser; the op casts them to
    the activations' dtype).
    """

    def __init__(self, base_layer: nn.Module, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                 use_rslora: bool = False, out_slices: Sequence[tuple[int, int]] | None = None,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__(base_layer, r, 1.0, dropout, out_slices)   # validates r first
        self.alpha = float(2 * r if alpha is None else alpha)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        dtype = adapter_dtype or w.dtype
        n_slices = len(self.out_slices) if self.out_slices else 1
        self.lora_A = nn.Parameter(torch.empty(n_slices * r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self._rows(), r, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                    **kwargs) -> "LoRALinear":
        """Wrap ``linear`` (which keeps its weight; it is frozen here)."""
        return cls(linear, r=r, alpha=alpha, dropout=dropout, **kwargs)

    def lowrank_factors(self):
        return self.lora_A, self._assemble_b(self.lora_B), None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha:g}"
