"""Prefix tuning: ``patch(model, "prefix", n_tokens=20)`` — trainable keys / values in front of every
self-attention (modules/prefix.py); ``reparam=True`` computes them from one tanh MLP,
``init_token_ids`` starts them from real tokens' keys / values. BERT / RoBERTa, GPT-2 and LLaMA /
Mistral / Qwen2 (decoders: ``generate()`` with or without a cache); not yet DistilBERT (its
attention has no cache interface) nor T5 (its relative position bias would need prefix columns
too): those raise before the model changes. ``merge`` refuses; PEFT's format holds no file for it
(peft_format.py has no builder for "prefix")."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..modules.prefix import PrefixAttention, PrefixEncoder
from .core import PatchContext
from .model_modes import evaluating
from .options import float_dtype
from .registry import register_method

#: self-attention classes whose keys / values pass through ``past_key_values.update``
_ATTENTION = ("BertSelfAttention", "RobertaSelfAttention", "GPT2Attention", "LlamaAttention", "MistralAttention",
              "Qwen2Attention")


def _self_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules()
             if type(m).__name__ in _ATTENTION and not getattr(m, "is_cross_attention", False)]
    if not found:
        raise ValueError(f"prefix tuning supports BERT / RoBERTa, GPT-2 and LLaMA / Mistral / Qwen2 self-attention "
                         f"({', '.join(_ATTENTION)}); {type(model).__name__} has none (DistilBERT and T5 are not "
                         "supported yet: use 'prompt' or 'lora' there)")
    return found


@register_method("prefix", "prefix tuning (Li & Liang 2021): trainable keys and values prepended in every "
                           "self-attention layer; step 0 differs from the original model (the queries attend to "
                           "the prefix); cannot be merged")
def prefix(ctx: PatchContext, *, n_tokens: int = 20, init_std: float = 0.02, init_token_ids: list[int] | None = None,
           reparam: bool = False, reparam_hidden: int = 512, seed: int = 0,
           adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """Every self-attention layer gets ``n_tokens`` key and value vectors per key/value head,
    drawn from N(0, init_std^2) (``seed``), or (``init_token_ids``: Li & Liang's init from real
    words, cycled to n_tokens) the keys / values the frozen model computes for those tokens at
    positions 0..n_tokens-1. ``reparam=True``: the paper's reparameterisation, every layer's
    prefix from one tanh MLP (width ``reparam_hidden``) of a trainable (n_tokens, d) embedding."""
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"prefix: n_tokens must be a positive int, got {n_tokens!r}")
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
        raise ValueError(f"prefix: init_std must be a positive number, got {init_std!r}")
    if not isinstance(reparam, bool):
        raise TypeError(f"prefix: reparam must be True or False, got {reparam!r}")
    if isinstance(reparam_hidden, bool) or not isinstance(reparam_hidden, int) or reparam_hidden < 1:
        raise ValueError(f"prefix: reparam_hidden must be a positive int, got {reparam_hidden!r}")
    if reparam and init_token_ids is not None:
        raise ValueError("prefix: init_token_ids sets plain prefixes; it cannot initialise the reparameterisation "
                         "MLP (reparam=True): pass one of them")
    dtype = float_dtype(adapter_dtype)
    ids = _token_ids(ctx.model, init_token_ids, n_tokens)
    targets = _self_attentions(ctx.model)
    gen = torch.Generator().manual_seed(seed)
    encoder = None
    for layer, (name, attn) in enumerate(targets):
        cfg = attn.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(attn, "head_dim", None) or attn.attention_head_size
        if reparam and encoder is None:
            w = next(attn.parameters())
            encoder = PrefixEncoder(n_tokens, cfg.hidden_size, reparam_hidden, len(targets), kv_heads, head_dim,
                                    gen, dtype or w.dtype, w.device)
        mod = PrefixAttention(attn, n_tokens, kv_heads, head_dim, init_std=float(init_std), generator=gen,
                              dtype=dtype, encoder=encoder, layer=layer, owns_encoder=layer == 0)
        ctx.replace(name, mod)
        ctx.train(p for _, p in mod.adapter_parameters())
    if ids is not None:
        _init_from_tokens(ctx.model, [r.new for r in ctx.replacements if isinstance(r.new, PrefixAttention)], ids)


def _token_ids(model: nn.Module, init_token_ids, n_tokens: int) -> torch.Tensor | None:
    if init_token_ids is None:
        return None
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.as_tensor(list(init_token_ids), dtype=torch.long)
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"prefix: init_token_ids must be token ids in [0, {vocab}), got {list(init_token_ids)[:8]}")
    return ids.repeat(n_tokens // ids.numel() + 1)[:n_tokens]


@torch.no_grad()
def _init_from_tokens(model: nn.Module, wrappers: list[PrefixAttention], ids: torch.Tensor) -> None:
    """Run the backbone once on ``ids`` (eval mode, no cache) and set each layer's prefix to the
    keys / values its attention computed."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for w in wrappers:
        w._recording = []
    try:
        with evaluating(backbone):
            device = next(backbone.parameters()).device
            backbone(input_ids=ids[None].to(device), use_cache=False)
        for w in wrappers:
            (keys, values), = w._recording
            w.init_from(keys, values)
    finally:
        for w in wrappers:
            w._recording = None
