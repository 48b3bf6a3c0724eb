"""The ladder side-network methods: "lst" (Sung et al. 2022) and "klst" (k stacked ladders with a
per-token cross-attention; the kernel is ops/ladder_cross_attention.py).

The backbone child of the task model (``model.bert`` / ``.roberta`` / ``.distilbert`` /
``.transformer`` / ``.model``, i.e. ``model.base_model_prefix``) is replaced by a ``LadderBackbone``
holding the original backbone (frozen, run under no_grad) and the trainable side network; the task
head (classifier / score / lm_head) reads the side network's output through the backbone's own
output type, so the model's forward signature, outputs and loss are unchanged. ``unpatch`` puts the
original backbone back (through the core's replace / restore); ``merge`` is an error.

Here lives what is architecture-specific: where the layers are, and each family's block weights in
one canonical form (nn.Linear layout, full size) for the pruned initialisation of the side blocks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..modules.ladder import LadderBackbone, LadderSideNetwork, prune_indices
from .core import PatchContext
from .registry import register_method

INITS = ("prune", "random")


def _lin(m):
    return m.weight, m.bias


def _conv1d(m):
    return m.weight.t(), m.bias       # transformers Conv1D stores (in, out)


def _norm(m):
    return m.weight, getattr(m, "bias", None)


def _bert_block(layer, cfg):
    a = layer.attention
    return {"q": _lin(a.self.query), "k": _lin(a.self.key), "v": _lin(a.self.value), "o": _lin(a.output.dense),
            "ln1": _norm(a.output.LayerNorm), "fin": _lin(layer.intermediate.dense), "fout": _lin(layer.output.dense),
            "ln2": _norm(layer.output.LayerNorm)}


def _distilbert_block(layer, cfg):
    a = layer.attention
    return {"q": _lin(a.q_lin), "k": _lin(a.k_lin), "v": _lin(a.v_lin), "o": _lin(a.out_lin),
            "ln1": _norm(layer.sa_layer_norm), "fin": _lin(layer.ffn.lin1), "fout": _lin(layer.ffn.lin2),
            "ln2": _norm(layer.output_layer_norm)}


def _gpt2_block(layer, cfg):
    w, b = _conv1d(layer.attn.c_attn)
    d = w.shape[1]
    q, k, v = (w[i * d:(i + 1) * d] for i in range(3))
    bq, bk, bv = (b[i * d:(i + 1) * d] for i in range(3))
    return {"q": (q, bq), "k": (k, bk), "v": (v, bv), "o": _conv1d(layer.attn.c_proj), "ln1": _norm(layer.ln_1),
            "fin": _conv1d(layer.mlp.c_fc), "fout": _conv1d(layer.mlp.c_proj), "ln2": _norm(layer.ln_2)}


def _llama_block(layer, cfg):
    a, m = layer.self_attn, layer.mlp
    rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    hd = _head_dim(cfg)

    def kv(lin):   # grouped-query attention: every query head gets its key / value head's rows
        w, b = lin.weight, lin.bias
        w = w.view(-1, hd, w.shape[1]).repeat_interleave(rep, 0).reshape(-1, w.shape[1])
        return w, (b.view(-1, hd).repeat_interleave(rep, 0).reshape(-1) if b is not None else None)
    return {"q": _lin(a.q_proj), "k": kv(a.k_proj), "v": kv(a.v_proj), "o": _lin(a.o_proj),
            "ln1": _norm(layer.input_layernorm), "gate": _lin(m.gate_proj), "fin": _lin(m.up_proj),
            "fout": _lin(m.down_proj), "ln2": _norm(layer.post_attention_layernorm)}


def _head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _act(name):
    from transformers.activations import ACT2FN
    return ACT2FN[name]


def _layout(family: str, backbone: nn.Module, cfg):
    """(layer modules, block extractor, SideBlock options, d_ff, causal, final norm kind, final norm module)."""
    if family == "bert":
        return (backbone.encoder.layer, _bert_block,
                dict(act=_act(cfg.hidden_act), pre_norm=False, norm="layer", eps=cfg.layer_norm_eps),
                cfg.intermediate_size, False, None, None)
    if family == "distilbert":
        return (backbone.transformer.layer, _distilbert_block,
                dict(act=_act(cfg.activation), pre_norm=False, norm="layer", eps=1e-12),
                cfg.hidden_dim, False, None, None)
    if family == "gpt2":
        return (backbone.h, _gpt2_block,
                dict(act=_act(cfg.activation_function), pre_norm=True, norm="layer", eps=cfg.layer_norm_epsilon),
                cfg.n_inner or 4 * cfg.hidden_size, True, "layer", backbone.ln_f)
    if family == "llama":
        return (backbone.layers, _llama_block,
                dict(act=_act(cfg.hidden_act), pre_norm=True, norm="rms", eps=cfg.rms_norm_eps, glu=True, rope=True),
                cfg.intermediate_size, True, "rms", backbone.norm)
    raise AssertionError(family)


SUPPORTED = ("bert", "distilbert", "gpt2", "llama")


def _side_network(ctx: PatchContext, r, k, layers, init, dropout, side_dtype):
    model = ctx.model
    fam = ctx.family
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if fam is None or fam.name not in SUPPORTED:
        why = (" (encoder-decoder: the side network would need its own decoder with cross-attention; not built)"
               if fam is not None and fam.name == "t5" else "")
        raise ValueError(f"ladder side networks support the bert (BERT, RoBERTa, XLM-R), distilbert, gpt2 and llama "
                         f"(LLaMA, Mistral, Qwen2) families; model_type {mt!r} is not one of them{why}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(f"patch(..., 'lst'/'klst') needs a task model with a backbone child (e.g. "
                         f"{type(model).__name__.replace('Model', '')}ForSequenceClassification / ...ForCausalLM); "
                         f"{type(model).__name__} has no '{prefix}' child")
    cfg = model.config
    mods, extract, blk, d_ff, causal, fnorm_kind, fnorm = _layout(fam.name, backbone, cfg)
    d, h, L = cfg.hidden_size, cfg.num_attention_heads, len(mods)
    hd = _head_dim(cfg)
    p0 = next(backbone.parameters())
    side = LadderSideNetwork(d, L, h, r=r, k=k, layers=layers, causal=causal, final_norm=fnorm_kind, dropout=dropout,
                             block=dict(blk, head_dim=hd, d_ff=d_ff))
    side.to(device=p0.device)
    if init == "prune":
        with torch.no_grad():
            weights = [extract(mods[i - 1], cfg) for i in side.layers]
            d_idx, per_block = prune_indices(weights, h, hd, side.d_s, hd // r, side.blocks[0].fin.out_features,
                                             rope=blk.get("rope", False))
            inv_freq = getattr(getattr(backbone, "rotary_emb", None), "inv_freq", None)
            for blkmod, w, (hd_idx, ff_idx, freq) in zip(side.blocks, weights, per_block):
                blkmod.load_pruned({n: tuple(t.float() if t is not None else None for t in v) for n, v in w.items()},
                                   d_idx, hd_idx, ff_idx,
                                   inv_freq[freq].float() if (freq is not None and inv_freq is not None) else None)
            if side.final_norm is not None:
                side.final_norm.weight.copy_(fnorm.weight[d_idx])
                if getattr(side.final_norm, "bias", None) is not None and getattr(fnorm, "bias", None) is not None:
                    side.final_norm.bias.copy_(fnorm.bias[d_idx])
            side.init_selection(d_idx)
    side.to(dtype=_dtype(side_dtype) or p0.dtype)
    wrapper = LadderBackbone(backbone, side, decoder=causal)
    ctx.replace(prefix, wrapper)
    ctx.train(side.parameters())


def _dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"side_dtype must be a floating torch dtype (or its name), got {name!r}")
    return dt


@register_method("lst", "LST (Sung et al. 2022): a gated ladder side network of width d/r beside a frozen, "
                        "no-autograd backbone")
def lst(ctx: PatchContext, *, r: int = 8, layers: Sequence[int] | None = None, init: str = "prune",
        dropout: float = 0.0, side_dtype: str | torch.dtype | None = None) -> None:
    """Side layer i: s <- mu_i s + (1 - mu_i) C_i, then a side transformer block. ``layers``: backbone
    layer ids (1..L) that get a side layer (default all); ``init="prune"`` cuts the side blocks from
    the backbone's (L1 magnitude), "random" leaves them at default init; ``side_dtype`` defaults to
    the backbone's dtype."""
    _side_network(ctx, r, None, layers, init, dropout, side_dtype)


@register_method("klst", "k-LST: side state cross-attends per token to the k stacked ladder features around "
                         "each layer (fused Triton kernel)")
def klst(ctx: PatchContext, *, k: int = 3, r: int = 8, layers: Sequence[int] | None = None, init: str = "prune",
         dropout: float = 0.0, side_dtype: str | torch.dtype | None = None) -> None:
    """Side layer i: s <- s + CrossAttn(s; C_(i-k//2) .. C_(i+k//2), clipped to 0..L), then a side block.
    k must be odd. Other options as "lst"."""
    _side_network(ctx, r, k, layers, init, dropout, side_dtype)
