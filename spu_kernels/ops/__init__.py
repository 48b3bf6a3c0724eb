"""Operations: one file per op, each with its plain-torch reference, its op pair (custom ops for
torch.compile and an autograd.Function for eager calls, ops/_library.py) and the dispatch to the
backends (torch | triton | cuda; each op file's ``IMPLEMENTED`` says which it has)."""
from .bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_reference
from .dropout_rng import dropout_keep_mask, philox4x32
from .ia3 import ia3_linear, ia3_linear_reference, ia3_scaled_act, ia3_scaled_act_reference
from .ia3_dynamic import ia3_dynamic_linear, ia3_dynamic_linear_reference
from .kron_linear import kron_linear, kron_linear_reference
from .ladder_cross_attention import (
    LadderCrossAttentionFunction,
    ladder_cross_attention,
    ladder_cross_attention_reference,
)
from .lowrank_linear import LowRankLinearFunction, lowrank_linear, lowrank_linear_reference
from .masked_adamw import masked_adamw_
from .zo_perturb import zo_axpby_, zo_normal

__all__ = ["dropout_keep_mask", "philox4x32", "LowRankLinearFunction", "lowrank_linear", "lowrank_linear_reference",
           "ia3_linear", "ia3_linear_reference", "ia3_scaled_act", "ia3_scaled_act_reference",
           "ia3_dynamic_linear", "ia3_dynamic_linear_reference", "kron_linear",
           "kron_linear_reference", "LadderCrossAttentionFunction", "ladder_cross_attention",
           "ladder_cross_attention_reference", "zo_axpby_", "zo_normal", "masked_adamw_",
           "bottleneck_adapter", "bottleneck_adapter_reference"]
