"""Operations: one file per op, each with its plain-torch reference, its autograd.Function and the
dispatch to the backends (torch | triton | cuda)."""
from .dropout_rng import dropout_keep_mask, philox4x32
from .lowrank_linear import LowRankLinearFunction, lowrank_linear, lowrank_linear_reference

__all__ = ["dropout_keep_mask", "philox4x32", "LowRankLinearFunction", "lowrank_linear",
           "lowrank_linear_reference"]
