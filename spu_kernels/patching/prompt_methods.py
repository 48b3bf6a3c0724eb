"""The soft prompt: ``patch(model, "prompt", n_tokens=20)`` on its own, or ``soft_prompt=20`` (or a
dict of these options) beside any other method, e.g. ``patch(model, "lora", r=8, soft_prompt=20)``.

Where the prompt goes: the backbone child of the task model (``model.bert`` / ``.roberta`` /
``.distilbert`` / ``.transformer`` / ``.model``: ``base_model_prefix``), or for encoder-decoder
models (T5) the encoder stack, whose output the decoder cross-attends to. ``generate()`` works on the
patched model, with or without a KV cache (see modules/soft_prompt.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..modules.ladder import LadderBackbone
from ..modules.soft_prompt import SoftPromptBackbone
from .core import PatchContext
from .options import float_dtype
from .registry import register_method, register_shared_option


def _target(model: nn.Module) -> str:
    """Qualified name of the module the prompt wraps."""
    if any(isinstance(m, LadderBackbone) for m in model.modules()):
        raise ValueError("soft prompt: a ladder side network (lst / klst) reads the backbone's hidden states "
                         "directly; soft prompts cannot be combined with it")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        for name, mod in model.named_modules():
            if name.split(".")[-1] == "encoder" and hasattr(mod, "get_input_embeddings"):
                return name
        raise ValueError(f"soft prompt: no encoder found in {type(model).__name__}")
    prefix = getattr(model, "base_model_prefix", "")
    child = getattr(model, prefix, None) if prefix else None
    if isinstance(child, nn.Module) and child is not model and hasattr(child, "get_input_embeddings"):
        return prefix
    raise ValueError(f"soft prompt needs a task model with a backbone child (e.g. BertForSequenceClassification, "
                     f"GPT2LMHeadModel); {type(model).__name__} has no {prefix!r} child with input embeddings")


def add_soft_prompt(ctx: PatchContext, n_tokens: int = 20, init: str = "vocab", init_token_ids=None, seed: int = 0,
                    adapter_dtype: str | torch.dtype | None = "float32") -> None:
    name = _target(ctx.model)
    wrapped = ctx.model.get_submodule(name)
    max_pos = getattr(getattr(ctx.model, "config", None), "max_position_embeddings", None)
    if ctx.family is not None and ctx.family.positions != "absolute":
        max_pos = None      # relative / rotary positions: no table to run off the end of
    mod = SoftPromptBackbone(wrapped, n_tokens=n_tokens, init=init, init_token_ids=init_token_ids, seed=seed,
                             dtype=float_dtype(adapter_dtype), max_positions=max_pos)
    ctx.replace(name, mod)
    ctx.train([mod.soft_prompt])


def soft_prompt_options(value) -> dict:
    """``soft_prompt=`` of patch(): an int (n_tokens) or a dict of add_soft_prompt's options."""
    if isinstance(value, bool) or not isinstance(value, (int, dict)):
        raise TypeError(f"soft_prompt must be a number of prompt tokens or a dict of options (n_tokens, init, "
                        f"init_token_ids, seed, adapter_dtype), got {value!r}")
    opts = {"n_tokens": value} if isinstance(value, int) else dict(value)
    allowed = ("n_tokens", "init", "init_token_ids", "seed", "adapter_dtype")
    for k in opts:
        if k not in allowed:
            raise TypeError(f"soft_prompt: unknown option {k!r}; it takes {', '.join(allowed)}")
    return opts


# patch(model, method, soft_prompt=...): checked before the model changes, added after the method's adapters
register_shared_option(
    "soft_prompt", prepare=soft_prompt_options, apply=lambda ctx, opts: add_soft_prompt(ctx, **opts),
    excludes={"prompt": "patch(..., 'prompt') is the soft prompt already; give its options directly "
                        "(n_tokens=...), not soft_prompt="})


@register_method("prompt", "soft prompt tuning (Lester et al. 2021): trainable vectors prepended to the input "
                           "embeddings")
def prompt(ctx: PatchContext, *, n_tokens: int = 20, init: str = "vocab", init_token_ids: list[int] | None = None,
           seed: int = 0, adapter_dtype: str | torch.dtype | None = "float32") -> None:
    """``init="vocab"`` starts from embeddings of random vocabulary tokens (or ``init_token_ids``, e.g.
    the tokens of a task description), "random" from noise of the embeddings' scale."""
    add_soft_prompt(ctx, n_tokens, init, init_token_ids, seed, adapter_dtype)
