"""Adapters whose base layer holds a frozen residual W_res in place of W (SiVA; KronA with
init="kopa"): how the original W comes back.

The original W stays on the CPU (``keep_original``) until ``drop_original`` frees it (patch's
``keep_original=False``, once the whole patch has succeeded). ``restore`` (unpatch) writes it back
bit for bit; ``detach_base`` / ``attach_base`` (named adapters, ``disable_adapter``) swap W and
W_res in the base layer, keeping the one not in use on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ResidualWeight:
    """Mixin for an AdapterModule whose ``base_layer.weight`` holds W_res: put it first in the bases
    and call ``keep_original`` before the weight is overwritten. ``holds_residual`` False (KronA with
    B = 0 at init) makes everything here act as for a plain wrapper."""

    _original_weight: torch.Tensor | None = None
    _residual: torch.Tensor | None = None

    @property
    def holds_residual(self) -> bool:
        return True

    def keep_original(self, weight: torch.Tensor, keep: bool) -> None:
        """Keep the base layer's ``weight`` as it is now (the original W) on the CPU, or nothing."""
        self._original_weight = weight.detach().to("cpu", copy=True) if keep else None

    def drop_original(self) -> None:
        """Free the host copy of the original weight (``keep_original=False``): ``restore`` is then an error."""
        self._original_weight = None

    def _gone(self) -> str:
        return (f"{type(self).__name__} was built with keep_original=False, so the original weight W is gone "
                "(its base layer holds W_res)")

    @torch.no_grad()
    def restore(self) -> nn.Module:
        """Put the original weight back, bit for bit, and return the base layer."""
        if self.holds_residual:
            if self._original_weight is None:
                raise RuntimeError(f"{self._gone()}; merge() folds the trained factors back in instead")
            self.base_layer.weight.copy_(self._original_weight.to(self.base_layer.weight.device))
        return self.base_layer

    @property
    def detach_error(self) -> str | None:
        if self.holds_residual and self._original_weight is None:
            return (f"{self._gone()}: the base layer cannot compute the original model (adapter switching and "
                    "disable_adapter need it); patch with keep_original=True")
        return None

    @torch.no_grad()
    def detach_base(self) -> None:
        """Put W back in the base layer, keeping W_res on the CPU for ``attach_base``."""
        if not self.holds_residual or self._residual is not None:
            return
        if self.detach_error:
            raise RuntimeError(self.detach_error)
        w = self.base_layer.weight
        self._residual = w.detach().to("cpu", copy=True)
        w.copy_(self._original_weight.to(w.device))

    @torch.no_grad()
    def attach_base(self) -> None:
        """Put W_res back in the base layer."""
        if self._residual is not None:
            self.base_layer.weight.copy_(self._residual.to(self.base_layer.weight.device))
            self._residual = None
