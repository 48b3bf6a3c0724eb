"""spu_kernels: fused kernels for selective parameter updating (parameter-efficient fine-tuning).

    import spu_kernels
    spu_kernels.patch(model, "siva", r=16)      # or "lora", "siva_kv", "ia3", "krona", "lst", "klst", "prompt"
    ...train...
    spu_kernels.merge(model)                    # or spu_kernels.unpatch(model)

Layers: patching -> modules -> ops -> (triton | _C | torch reference); README.md says what each does.
"""
__version__ = "0.1.0"

from .backends import available_backends, backend_status, use_backend
from .modules import (
    IA3Linear,
    IA3ScaledActivation,
    KronALinear,
    LadderSideNetwork,
    LoRALinear,
    PromptClassifier,
    PromptTemplate,
    SiVALinear,
    SoftPromptBackbone,
)
from .ops import (
    ia3_linear,
    ia3_scaled_act,
    kron_linear,
    ladder_cross_attention,
    ladder_cross_attention_reference,
    lowrank_linear,
    lowrank_linear_reference,
)
from .optim import MeZO
from .patching import (
    is_patched,
    known_methods,
    load_adapter,
    merge,
    patch,
    register_method,
    save_adapter,
    summary,
    unpatch,
)


def describe_method(name: str) -> str:
    """One line on a method and its options with their defaults."""
    from .patching.registry import get_method
    spec = get_method(name)
    opts = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items())
    return (f"{name}: {spec.description}. Options: {opts}; plus train_head=True, trainable_modules=None"
            + (", soft_prompt=None" if name != "prompt" else ""))


__all__ = ["patch", "unpatch", "merge", "summary", "is_patched", "save_adapter", "load_adapter", "known_methods",
           "register_method", "describe_method", "available_backends", "backend_status", "use_backend",
           "lowrank_linear", "lowrank_linear_reference", "ia3_linear", "ia3_scaled_act", "kron_linear",
           "ladder_cross_attention", "ladder_cross_attention_reference", "LoRALinear", "SiVALinear", "IA3Linear",
           "IA3ScaledActivation", "KronALinear", "LadderSideNetwork", "SoftPromptBackbone", "PromptTemplate",
           "PromptClassifier", "MeZO", "__version__"]
