"""Which modules of which Hugging Face architecture family play which role.

A family names its attention projections by role (query, key, value, attn_out, ffn_in, ffn_out
...), so that a method asks for roles ("query", "value") and gets the right module names for BERT,
T5, GPT-2 or LLaMA alike. GPT-2 stores q, k and v in one fused Conv1D (c_attn): a role there is a
slice of that layer's output rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Task heads: top-level children of a *For... model that train by default (configurable).
HEAD_NAMES = ("classifier", "pre_classifier", "score", "qa_outputs", "classification_head")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    roles: dict[str, str] = field(default_factory=dict)   # role -> regex for the end of a module's name
    fused_qkv: str | None = None                           # regex of the module holding [q; k; v] rows


_ATTN = ("query", "key", "value")

FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert"),
           {"query": r"attention\.self\.query", "key": r"attention\.self\.key", "value": r"attention\.self\.value",
            "attn_out": r"attention\.output\.dense", "ffn_in": r"intermediate\.dense",
            "ffn_out": r"layer\.\d+\.output\.dense", "ffn_act": r"intermediate\.intermediate_act_fn"}),
    Family("distilbert", ("distilbert",),
           {"query": r"q_lin", "key": r"k_lin", "value": r"v_lin", "attn_out": r"out_lin",
            "ffn_in": r"ffn\.lin1", "ffn_out": r"ffn\.lin2", "ffn_act": r"ffn\.activation"}),
    Family("t5", ("t5", "mt5"),
           {"query": r"q", "key": r"k", "value": r"v", "attn_out": r"o", "ffn_in": r"wi(_0|_1)?", "ffn_out": r"wo",
            "ffn_act": r"DenseReluDense\.act"}),
    Family("gpt2", ("gpt2",),
           {"attn_out": r"attn\.c_proj", "ffn_in": r"mlp\.c_fc", "ffn_out": r"mlp\.c_proj",
            "ffn_act": r"mlp\.act"},
           fused_qkv=r"attn\.c_attn"),
    Family("llama", ("llama", "mistral", "qwen2"),
           {"query": r"q_proj", "key": r"k_proj", "value": r"v_proj", "attn_out": r"o_proj",
            "ffn_gate": r"gate_proj", "ffn_in": r"up_proj", "ffn_out": r"down_proj",
            "ffn_act": r"mlp\.act_fn"}),
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
    """Whether the qualified module name ends with ``pattern`` at a dot boundary."""
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None
