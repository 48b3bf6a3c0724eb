"""LoRA (Hu et al. 2021).

* ``LoRALinear``: y = x Wᵀ + b + (alpha / r) · (drop(x) Aᵀ) Bᵀ, fused.
* ``LoRAEmbedding``: y = E[x] + (alpha / r) · Aᵀ[x] Bᵀ on an ``nn.Embedding``, as PEFT's
  ``lora.Embedding`` (same parameter names, shapes, init and forward; plain torch, no kernel).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import AdapterModule
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


class LoRAEmbedding(AdapterModule):
    """A frozen ``nn.Embedding`` (weight E, (V, D)) plus a trainable rank-r update, as PEFT's
    ``lora.Embedding``: ``lora_embedding_A`` (r, V) starts at zero and ``lora_embedding_B``
    (D, r) standard normal, so step 0 equals the embedding; y = E[x] + s · Aᵀ[x] Bᵀ with Aᵀ
    looked up as E is (padding_idx, max_norm, ... of the base layer), s = alpha / r (alpha / √r
    with ``use_rslora``). No dropout (PEFT applies none to embeddings either). ``merge`` adds
    s · (B A)ᵀ to E in place. ``tied``: E is shared with another module (an LM head):
    merging would change that module too, so it is refused.
    """

    switchable = True

    def __init__(self, base_layer: nn.Embedding, r: int = 16, alpha: float | None = None, use_rslora: bool = False,
                 adapter_dtype: torch.dtype | None = torch.float32, tied: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        v, d = base_layer.weight.shape
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"LoRAEmbedding: rank r must be a positive int, got {r!r}")
        if r > min(v, d):
            raise ValueError(f"LoRAEmbedding: rank r={r} exceeds min(num_embeddings, embedding_dim) = "
                             f"min({v}, {d}); use r <= {min(v, d)}")
        self.base_layer = base_layer
        self.num_embeddings, self.embedding_dim, self.r = v, d, r
        self.alpha = float(2 * r if alpha is None else alpha)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.tied = bool(tied)
        w = base_layer.weight
        w.requires_grad_(False)
        dtype = adapter_dtype or w.dtype
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, v, device=w.device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(d, r, device=w.device, dtype=dtype))
        nn.init.normal_(self.lora_embedding_B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def merge_error(self) -> str | None:
        if self.tied:
            return ("LoRAEmbedding: the embedding weight is tied to another module (e.g. the LM head), which merging "
                    "would change too; use spu_kernels.unpatch, or untie the weights before patching")
        return None

    def adapter_parameters(self):
        yield "lora_embedding_A", self.lora_embedding_A
        yield "lora_embedding_B", self.lora_embedding_B

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(x, table, padding_idx=e.padding_idx, max_norm=e.max_norm, norm_type=e.norm_type,
                           scale_grad_by_freq=e.scale_grad_by_freq, sparse=e.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.bypassed():
            return out
        a, b = self.lora_embedding_A, self.lora_embedding_B
        delta = (self._lookup(x, a.t()) @ b.t()) * self.scaling
        return out + delta.to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · (B A)ᵀ as an fp32 (V, D) tensor."""
        return self.scaling * (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the embedding weight (in place, rounded to its dtype); return it."""
        if self.merge_error:
            raise RuntimeError(self.merge_error)
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, "
                f"scaling={self.scaling:g}" + (", tied" if self.tied else ""))
