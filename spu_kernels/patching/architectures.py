"""Everything the package knows about Hugging Face architecture families, one ``Family`` record each.

A family names its modules by role (query, key, value, attn_out, ffn_in, ffn_out ...), so that a
method asks for roles ("query", "value") and gets the right module names for BERT, T5, GPT-2 or
LLaMA alike. GPT-2 stores q, k and v in one fused Conv1D (c_attn): a role there is a slice of that
layer's output rows. The record also says where the blocks are (``stacks``) and what follows the
last one (``top``), the kind of positions, how to tell a gated FFN, and how a ladder side network
reads the blocks (``side_layout``, ``side_block``). The methods ask the record; none of them
compares family names or model_type strings.

Adding a family = one ``Family`` record in ``FAMILIES`` below (plus its block extractor if it gets
ladder side networks) + a tiny model in tests/models.py (``FAMILY_MODELS`` and ``EXPECTED_TARGETS``),
which every per-family test then runs on: 2 files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

# Task heads: top-level children of a *For... model that train by default (configurable).
HEAD_NAMES = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head")

POSITIONS = ("absolute", "rotary", "relative")


@dataclass(frozen=True)
class SideLayout:
    """What a ladder side network (patching/ladder_methods.py) needs of one backbone."""
    layers: nn.ModuleList              # the backbone's transformer blocks, in order
    block: dict                        # SideBlock options: act, pre_norm, norm ("layer" / "rms"), eps, glu
    d_ff: int                          # the backbone's FFN width
    causal: bool
    final_norm: nn.Module | None       # the norm after the last block (of the blocks' norm kind), if any
    # a learned relative position bias shared by the blocks (T5): {"table": (num_buckets, heads) weight,
    # "max_distance": int}; the side network gets its own table of that shape
    relative_bias: dict | None = None


@dataclass(frozen=True)
class Family:
    """One architecture family. Module-name patterns are regexes for the end of a qualified name
    (see ``name_matches``; a leading ``^`` makes one match the whole name)."""
    name: str
    model_types: tuple[str, ...]                           # config.model_type values of the family
    roles: dict[str, str] = field(default_factory=dict)   # role -> pattern of the module with that role
    fused_qkv: str | None = None                           # pattern of the module holding [q; k; v] rows
    models: str = ""                                       # its architectures by name, for messages
    stacks: tuple[str, ...] = ()       # patterns of the ModuleLists holding the transformer blocks
    top: tuple[str, ...] = ()          # patterns of the modules after the last block (final norm, pooler)
    positions: str = "absolute"        # "absolute" (a table of max_position_embeddings), "rotary", "relative"
    gate_attrs: tuple[str, ...] = ()   # children that make an FFN block gated: hidden = act(gate) * up
    encoder_decoder: bool = False
    # ladder side networks (None: not supported): where the blocks are and the side blocks' options,
    # side_layout(backbone, config) (encoder_decoder: of one stack, the encoder or the decoder); and one
    # block's weights in canonical form (nn.Linear layout, full size; keys q k v o ln1 fin fout ln2, + gate;
    # a decoder block's cross-attention: xq xk xv xo lnx) for the pruned init, side_block(block, config)
    side_layout: Callable[[nn.Module, Any], SideLayout] | None = None
    side_block: Callable[[nn.Module, Any], dict] | None = None

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"Family {self.name}: positions must be one of {', '.join(POSITIONS)}, "
                             f"got {self.positions!r}")
        if (self.side_layout is None) != (self.side_block is None):
            raise ValueError(f"Family {self.name}: side_layout and side_block go together")


# --- ladder side networks: each family's blocks in one canonical form ---------------------------

def _lin(m):
    return m.weight, m.bias


def _conv1d(m):
    return m.weight.t(), m.bias       # transformers Conv1D stores (in, out)


def _norm(m):
    return m.weight, getattr(m, "bias", None)


def _act(name):
    from transformers.activations import ACT2FN
    return ACT2FN[name]


def head_dim(cfg) -> int:
    """The attention head width of a transformers config."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _bert_block(layer, cfg):
    a = layer.attention
    return {"q": _lin(a.self.query), "k": _lin(a.self.key), "v": _lin(a.self.value), "o": _lin(a.output.dense),
            "ln1": _norm(a.output.LayerNorm), "fin": _lin(layer.intermediate.dense), "fout": _lin(layer.output.dense),
            "ln2": _norm(layer.output.LayerNorm)}


def _bert_side(backbone, cfg):
    return SideLayout(backbone.encoder.layer,
                      dict(act=_act(cfg.hidden_act), pre_norm=False, norm="layer", eps=cfg.layer_norm_eps),
                      cfg.intermediate_size, False, None)


def _distilbert_block(layer, cfg):
    a = layer.attention
    return {"q": _lin(a.q_lin), "k": _lin(a.k_lin), "v": _lin(a.v_lin), "o": _lin(a.out_lin),
            "ln1": _norm(layer.sa_layer_norm), "fin": _lin(layer.ffn.lin1), "fout": _lin(layer.ffn.lin2),
            "ln2": _norm(layer.output_layer_norm)}


def _distilbert_side(backbone, cfg):
    return SideLayout(backbone.transformer.layer,
                      dict(act=_act(cfg.activation), pre_norm=False, norm="layer", eps=1e-12),
                      cfg.hidden_dim, False, None)


def _gpt2_block(layer, cfg):
    w, b = _conv1d(layer.attn.c_attn)
    d = w.shape[1]
    q, k, v = (w[i * d:(i + 1) * d] for i in range(3))
    bq, bk, bv = (b[i * d:(i + 1) * d] for i in range(3))
    return {"q": (q, bq), "k": (k, bk), "v": (v, bv), "o": _conv1d(layer.attn.c_proj), "ln1": _norm(layer.ln_1),
            "fin": _conv1d(layer.mlp.c_fc), "fout": _conv1d(layer.mlp.c_proj), "ln2": _norm(layer.ln_2)}


def _gpt2_side(backbone, cfg):
    return SideLayout(backbone.h,
                      dict(act=_act(cfg.activation_function), pre_norm=True, norm="layer", eps=cfg.layer_norm_epsilon),
                      cfg.n_inner or 4 * cfg.hidden_size, True, backbone.ln_f)


def _llama_block(layer, cfg):
    a, m = layer.self_attn, layer.mlp
    rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    hd = head_dim(cfg)

    def kv(lin):   # grouped-query attention: every query head gets its key / value head's rows
        w, b = lin.weight, lin.bias
        w = w.view(-1, hd, w.shape[1]).repeat_interleave(rep, 0).reshape(-1, w.shape[1])
        return w, (b.view(-1, hd).repeat_interleave(rep, 0).reshape(-1) if b is not None else None)
    return {"q": _lin(a.q_proj), "k": kv(a.k_proj), "v": kv(a.v_proj), "o": _lin(a.o_proj),
            "ln1": _norm(layer.input_layernorm), "gate": _lin(m.gate_proj), "fin": _lin(m.up_proj),
            "fout": _lin(m.down_proj), "ln2": _norm(layer.post_attention_layernorm)}


def _llama_side(backbone, cfg):
    return SideLayout(backbone.layers,
                      dict(act=_act(cfg.hidden_act), pre_norm=True, norm="rms", eps=cfg.rms_norm_eps, glu=True),
                      cfg.intermediate_size, True, backbone.norm)


def _t5_block(block, cfg):
    """A T5Block (encoder: self-attention, FFN; decoder: also cross-attention, as "xq" .. "xo", "lnx")."""
    sa, ff = block.layer[0], block.layer[-1]
    a, m = sa.SelfAttention, ff.DenseReluDense
    gated = hasattr(m, "wi_0")
    out = {"q": _lin(a.q), "k": _lin(a.k), "v": _lin(a.v), "o": _lin(a.o), "ln1": _norm(sa.layer_norm),
           "fin": _lin(m.wi_1 if gated else m.wi), "fout": _lin(m.wo), "ln2": _norm(ff.layer_norm)}
    if gated:
        out["gate"] = _lin(m.wi_0)
    if len(block.layer) == 3:
        x = block.layer[1].EncDecAttention
        out.update(xq=_lin(x.q), xk=_lin(x.k), xv=_lin(x.v), xo=_lin(x.o), lnx=_norm(block.layer[1].layer_norm))
    return out


def _t5_side(stack, cfg):
    """One T5 stack (``model.encoder`` or ``model.decoder``): pre-norm RMS blocks, unscaled attention
    logits (T5 folds the scale into its weights), relu or gated-gelu FFN, block 0's relative bias."""
    attn = stack.block[0].layer[0].SelfAttention
    return SideLayout(stack.block,
                      dict(act=_act(cfg.dense_act_fn), pre_norm=True, norm="rms", eps=cfg.layer_norm_epsilon,
                           glu=cfg.is_gated_act, attn_scale=1.0),
                      cfg.d_ff, bool(stack.is_decoder), stack.final_layer_norm,
                      {"table": attn.relative_attention_bias.weight,
                       "max_distance": attn.relative_attention_max_distance})


# --- the families ---------------------------------------------------------------------------------

_ATTN = ("query", "key", "value")

FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert"),
           {"query": r"attention\.self\.query", "key": r"attention\.self\.key", "value": r"attention\.self\.value",
            "attn_out": r"attention\.output\.dense", "ffn_in": r"intermediate\.dense",
            "ffn_out": r"layer\.\d+\.output\.dense", "ffn_act": r"intermediate\.intermediate_act_fn"},
           models="BERT, RoBERTa, XLM-R", stacks=(r"encoder\.layer",), top=(r"pooler",),
           side_layout=_bert_side, side_block=_bert_block),
    Family("distilbert", ("distilbert",),
           {"query": r"q_lin", "key": r"k_lin", "value": r"v_lin", "attn_out": r"out_lin",
            "ffn_in": r"ffn\.lin1", "ffn_out": r"ffn\.lin2", "ffn_act": r"ffn\.activation"},
           stacks=(r"transformer\.layer",), side_layout=_distilbert_side, side_block=_distilbert_block),
    Family("t5", ("t5", "mt5"),
           {"query": r"q", "key": r"k", "value": r"v", "attn_out": r"o", "ffn_in": r"wi(_0|_1)?", "ffn_out": r"wo",
            "ffn_act": r"DenseReluDense\.act"},
           stacks=(r"encoder\.block", r"decoder\.block"),
           top=(r"encoder\.final_layer_norm", r"decoder\.final_layer_norm"),
           positions="relative", gate_attrs=("wi_0",), encoder_decoder=True,   # T5 v1.1 "gated-gelu": wi_0, wi_1
           side_layout=_t5_side, side_block=_t5_block),   # side_layout of one stack (encoder or decoder)
    Family("gpt2", ("gpt2",),
           {"attn_out": r"attn\.c_proj", "ffn_in": r"mlp\.c_fc", "ffn_out": r"mlp\.c_proj",
            "ffn_act": r"mlp\.act"},
           fused_qkv=r"attn\.c_attn", stacks=(r"transformer\.h", r"^h"), top=(r"ln_f",),
           side_layout=_gpt2_side, side_block=_gpt2_block),
    Family("llama", ("llama", "mistral", "qwen2"),
           {"query": r"q_proj", "key": r"k_proj", "value": r"v_proj", "attn_out": r"o_proj",
            "ffn_gate": r"gate_proj", "ffn_in": r"up_proj", "ffn_out": r"down_proj",
            "ffn_act": r"mlp\.act_fn"},
           models="LLaMA, Mistral, Qwen2", stacks=(r"model\.layers", r"^layers"), top=(r"model\.norm", r"^norm"),
           positions="rotary", gate_attrs=("gate_proj",), side_layout=_llama_side, side_block=_llama_block),
)


def family_of(model) -> Family | None:
    """The family of a transformers model (by ``config.model_type``), or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def model_type_of(model) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def supported_model_types() -> list[str]:
    return [t for fam in FAMILIES for t in fam.model_types]


def role_targets(fam: Family, roles: tuple[str, ...]) -> list[tuple[str, tuple[int, ...] | None]]:
    """Module-name patterns (regexes for the end of a qualified name, see ``name_matches``) for
    ``roles`` and, for a fused q/k/v layer, which thirds of its output
    rows (0 = q, 1 = k, 2 = v) the roles are; None means the whole layer."""
    out: list[tuple[str, tuple[int, ...] | None]] = []
    thirds = tuple(_ATTN.index(r) for r in roles if r in _ATTN)
    if fam.fused_qkv and thirds:
        out.append((fam.fused_qkv, thirds))
    for role in roles:
        if role in _ATTN and fam.fused_qkv:
            continue
        if role not in fam.roles:
            raise ValueError(f"the {fam.name} family has no {role!r} projection; "
                             f"it has {', '.join(sorted(set(fam.roles) | (set(_ATTN) if fam.fused_qkv else set())))}")
        out.append((fam.roles[role], None))
    return out


def name_matches(name: str, pattern: str) -> bool:
    """Whether the qualified module name ends with ``pattern`` at a dot boundary; a pattern that
    starts with ``^`` (e.g. ``^h``: GPT2Model's own blocks) matches the whole name only."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None
