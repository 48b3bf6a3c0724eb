"""Optimisers built on spu_kernels ops: MeZO (zeroth-order, two forward passes a step)."""
from .mezo import MeZO

__all__ = ["MeZO"]
