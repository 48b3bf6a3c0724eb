"""Optimisers built on spu_kernels ops: MeZO (zeroth-order, two forward passes a step) and MaskedAdamW
(AdamW on selected entries only, for FishMask)."""
from .masked_adamw import MaskedAdamW
from .mezo import MeZO

__all__ = ["MeZO", "MaskedAdamW"]
