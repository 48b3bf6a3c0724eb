"""Drop-in nn.Modules built on the ops."""
from .ia3 import IA3Linear, IA3ScaledActivation
from .krona import KronALinear
from .ladder import LadderBackbone, LadderSideNetwork
from .lora import LoRALinear
from .lowrank_base import LowRankAdapterLinear, is_linear_like
from .prompt_classifier import PromptClassifier, PromptTemplate
from .siva import SiVALinear
from .soft_prompt import SoftPromptBackbone

__all__ = ["LoRALinear", "SiVALinear", "LowRankAdapterLinear", "is_linear_like", "IA3Linear", "IA3ScaledActivation",
           "KronALinear", "LadderBackbone", "LadderSideNetwork", "SoftPromptBackbone", "PromptTemplate",
           "PromptClassifier"]
