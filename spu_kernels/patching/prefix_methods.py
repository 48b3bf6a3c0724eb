"""Prefix tuning: ``patch(model, "prefix", n_tokens=20)`` — trainable keys / values in front of every
attention (modules/prefix.py); ``reparam=True`` computes them from one tanh MLP, ``init_token_ids``
starts them from real tokens' keys / values. BERT / RoBERTa, DistilBERT, GPT-2, LLaMA / Mistral /
Qwen2 (decoders: ``generate()`` with or without a cache) and T5 (``attentions="all"``: encoder
self-, decoder self- and decoder cross-attention, as Li & Liang's encoder-decoder prefixes;
``"decoder_self"``: the decoder's self-attention only, which is what PEFT 0.21's T5 prefix tuning
ends up with: it builds cross-attention prefixes, then replaces that cache with an empty one, and
the encoder gets no cache). Other models raise before the model changes. ``merge`` refuses; PEFT's
format holds no file for it (peft_format.py has no builder for "prefix"). ``fold_prefix(model)`` turns a
trained ``reparam=True`` patch into plain prefixes (the same outputs, bit for bit)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..modules.prefix import PrefixAttention, PrefixEncoder
from .core import PatchContext, patch_state
from .model_modes import evaluating
from .options import float_dtype
from .registry import register_method
from .unwrap import unwrap_model

#: attention classes whose keys / values pass through ``past_key_values.update`` (DistilBERT's through
#: modules/prefix.py's ``_distilbert_attention``)
_ATTENTION = ("BertSelfAttention", "RobertaSelfAttention", "DistilBertSelfAttention", "GPT2Attention",
              "LlamaAttention", "MistralAttention", "Qwen2Attention", "T5Attention")
#: what DistilBERT's forward, re-run by the wrapper, reads from its attention module
_DISTILBERT_ATTRS = ("q_lin", "k_lin", "v_lin", "out_lin", "attention_head_size", "scaling", "dropout", "config")
ATTENTIONS = ("all", "decoder_self")


def _attentions(model: nn.Module, attentions: str) -> list[tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules()
             if type(m).__name__ in _ATTENTION and not getattr(m, "is_cross_attention", False)]
    if not found:
        raise ValueError(f"prefix tuning supports the attention of BERT / RoBERTa, DistilBERT, GPT-2, LLaMA / Mistral "
                         f"/ Qwen2 and T5 ({', '.join(_ATTENTION)}); {type(model).__name__} has none: use 'prompt' "
                         "or 'lora' there")
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if attentions == "decoder_self":
        if not seq2seq:
            raise ValueError(f"prefix: attentions='decoder_self' is for encoder-decoder models (T5); "
                             f"{type(model).__name__} is not one: leave attentions='all'")
        found = [(n, m) for n, m in found if getattr(m, "is_decoder", False) and n.endswith(".SelfAttention")]
    for name, m in found:
        if type(m).__name__ == "DistilBertSelfAttention" and not all(hasattr(m, a) for a in _DISTILBERT_ATTRS):
            raise ValueError(f"prefix: {name} ({type(m).__name__}) lacks one of {', '.join(_DISTILBERT_ATTRS)}; this "
                             "transformers version's DistilBERT is not supported (transformers 5 is)")
    return found


@register_method("prefix", "prefix tuning (Li & Liang 2021): trainable keys and values prepended in every "
                           "attention layer; step 0 differs from the original model (the queries attend to "
                           "the prefix); cannot be merged")
def prefix(ctx: PatchContext, *, n_tokens: int = 20, init_std: float = 0.02, init_token_ids: list[int] | None = None,
           reparam: bool = False, reparam_hidden: int = 512, seed: int = 0, attentions: str = "all",
           adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """Every attention layer (T5: the ones ``attentions`` picks, see the module docstring) gets
    ``n_tokens`` key and value vectors per key/value head, drawn from N(0, init_std^2) (``seed``),
    or (``init_token_ids``: Li & Liang's init from real words, cycled to n_tokens) the keys / values
    the frozen model computes for those tokens at positions 0..n_tokens-1. ``reparam=True``: the
    paper's reparameterisation, every layer's prefix from one tanh MLP (width ``reparam_hidden``)
    of a trainable (n_tokens, d) embedding."""
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
    if attentions not in ATTENTIONS:
        raise ValueError(f"prefix: attentions must be one of {', '.join(map(repr, ATTENTIONS))}, got {attentions!r}")
    dtype = float_dtype(adapter_dtype)
    ids = _token_ids(ctx.model, init_token_ids, n_tokens)
    targets = _attentions(ctx.model, attentions)
    gen = torch.Generator().manual_seed(seed)
    encoder = None
    for layer, (name, attn) in enumerate(targets):
        cfg = attn.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = (getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None)
                    or attn.key_value_proj_dim)        # T5
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
    """Run the backbone once on ``ids`` (eval mode, no cache; an encoder-decoder model gets them as
    decoder input too) and set each layer's prefix to the keys / values its attention computed
    (T5's cross-attention: those of the encoder's output for ``ids``)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for w in wrappers:
        w._recording = []
    try:
        with evaluating(backbone):
            device = next(backbone.parameters()).device
            ids = ids[None].to(device)
            seq2seq = {"decoder_input_ids": ids} if getattr(backbone.config, "is_encoder_decoder", False) else {}
            backbone(input_ids=ids, use_cache=False, **seq2seq)
        for w in wrappers:
            (keys, values), = w._recording
            w.init_from(keys, values)
    finally:
        for w in wrappers:
            w._recording = None


def fold_prefix(model: nn.Module) -> nn.Module:
    """Fold the reparameterisation MLP of ``patch(model, "prefix", reparam=True)`` into plain prefixes:
    each layer's ``prefix_key`` / ``prefix_value`` (new trainable parameters: make a new optimizer
    if training goes on) become what the MLP computes now, and the MLP is dropped. The outputs stay
    bit for bit the same (the same tensors enter the attention); the patch is then recorded as
    ``reparam=False``, so save_adapter / save_pretrained write, and load_adapter / from_pretrained
    read, the plain prefixes. Acts on the active adapter; returns ``model``."""
    state = patch_state(model, "fold_prefix")
    if state.method != "prefix" or not state.options.get("reparam"):
        raise ValueError(f"fold_prefix: the model's active patch is {state.method!r}"
                         f"{' with reparam=False' if state.method == 'prefix' else ''}; it folds the MLP of "
                         "patch(model, 'prefix', reparam=True) and there is none to fold")
    wrappers = [r.new for r in state.replacements if isinstance(r.new, PrefixAttention)]
    with torch.no_grad():
        kv = [w.prefix() for w in wrappers]       # all of them before the owner drops the MLP
    for w, (k, v) in zip(wrappers, kv):
        w.fold(k, v)
    state.options["reparam"] = False
    params = list(unwrap_model(model).parameters())
    state.summary.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    state.summary.total_params = sum(p.numel() for p in params)
    return model
