"""Drop-in nn.Modules built on the ops."""
from .lora import LoRALinear
from .lowrank_base import LowRankAdapterLinear, is_linear_like
from .siva import SiVALinear

__all__ = ["LoRALinear", "SiVALinear", "LowRankAdapterLinear", "is_linear_like"]
