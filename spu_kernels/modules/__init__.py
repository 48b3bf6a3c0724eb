"""Drop-in nn.Modules built on the ops. Each module that ``patch`` puts in a model's place is an
``AdapterModule`` (adapter.py: the contract the patching core relies on)."""
from .adapter import AdapterModule
from .bottleneck import BottleneckAdapterLinear
from .ia3 import IA3Linear, IA3ScaledActivation
from .ia3_dynamic import IA3DynamicLinear
from .krona import KronALinear
from .ladder import LadderBackbone, LadderSideNetwork
from .lora import LoRAEmbedding, LoRALinear
from .lowrank_base import LowRankAdapterLinear, WrappedLinear, is_linear_like
from .prefix import PrefixAttention, PrefixEncoder
from .prompt_classifier import PromptClassifier, PromptTemplate
from .siva import SiVALinear
from .soft_prompt import SoftPromptBackbone

__all__ = ["AdapterModule", "WrappedLinear", "LoRALinear", "SiVALinear", "LowRankAdapterLinear", "is_linear_like",
           "IA3Linear", "IA3ScaledActivation", "KronALinear", "LadderBackbone", "LadderSideNetwork",
           "SoftPromptBackbone", "PromptTemplate", "PromptClassifier", "LoRAEmbedding", "IA3DynamicLinear",
           "PrefixAttention", "PrefixEncoder", "BottleneckAdapterLinear"]
