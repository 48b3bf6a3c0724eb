"""spu_kernels: fused kernels for selective parameter updating (parameter-efficient fine-tuning).

    import spu_kernels
    spu_kernels.patch(model, "siva", r=16)      # or "lora", "siva_kv", "ia3", "krona", "lst", "klst", "prompt"
    ...train...
    spu_kernels.merge(model)                    # or spu_kernels.unpatch(model)

Layers: patching -> modules -> ops -> (triton | _C | torch reference), each importing only the
ones below it. README.md's "Layout" section lists what each holds; the docstrings of
patching/core.py and registry.py (methods, shared options), modules/adapter.py (the contract of a
replacing module) and ops/_library.py (op pairs, backends) say how they fit together.
"""
from ._version import __version__
from .backends import available_backends, backend_status, use_backend
from .modules import (
    BottleneckAdapterLinear,
    IA3Linear,
    IA3ScaledActivation,
    KronALinear,
    LadderSideNetwork,
    LoRAEmbedding,
    LoRALinear,
    PrefixAttention,
    PromptClassifier,
    PromptTemplate,
    SiVALinear,
    SoftPromptBackbone,
)
from .ops import (
    bottleneck_adapter,
    ia3_dynamic_linear,
    ia3_linear,
    ia3_scaled_act,
    kron_linear,
    ladder_cross_attention,
    ladder_cross_attention_reference,
    lowrank_linear,
    lowrank_linear_reference,
)
from .optim import MaskedAdamW, MeZO
from .patching import (
    NoPeftEquivalent,
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapter,
    from_peft,
    from_pretrained,
    is_patched,
    known_methods,
    list_adapters,
    load_adapter,
    merge,
    merge_adapter,
    patch,
    peft_adapter_files,
    register_method,
    save_adapter,
    save_pretrained,
    set_adapter,
    summary,
    to_peft,
    unmerge_adapter,
    unpatch,
)
from .patching.fishmask_methods import fisher_scores, fishmask_masks
from .patching.prefix_methods import fold_prefix


def describe_method(name: str) -> str:
    """One line on a method and its options with their defaults."""
    from .patching.registry import get_method, shared_options
    spec = get_method(name)
    opts = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items())
    shared = ", ".join(f"{k}={v!r}" for k, v in shared_options(name).items())
    return f"{name}: {spec.description}. Options: {opts}; plus {shared}"


__all__ = ["patch", "unpatch", "merge", "summary", "is_patched", "save_adapter", "load_adapter", "save_pretrained",
           "from_pretrained", "known_methods", "register_method", "describe_method",
           "add_adapter", "set_adapter", "delete_adapter", "active_adapter", "list_adapters", "disable_adapter",
           "merge_adapter", "unmerge_adapter", "from_peft", "to_peft", "peft_adapter_files", "NoPeftEquivalent",
           "available_backends", "backend_status", "use_backend",
           "lowrank_linear", "lowrank_linear_reference", "ia3_linear", "ia3_scaled_act", "ia3_dynamic_linear",
           "kron_linear",
           "ladder_cross_attention", "ladder_cross_attention_reference", "LoRALinear", "LoRAEmbedding", "SiVALinear",
           "IA3Linear", "IA3ScaledActivation", "KronALinear", "LadderSideNetwork", "SoftPromptBackbone",
           "PromptTemplate", "PromptClassifier", "MeZO", "MaskedAdamW", "fisher_scores", "fishmask_masks",
           "PrefixAttention", "fold_prefix", "BottleneckAdapterLinear", "bottleneck_adapter", "__version__"]
