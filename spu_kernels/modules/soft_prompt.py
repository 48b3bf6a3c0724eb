"""Soft prompt tuning (Lester et al. 2021): p trainable vectors prepended to the input embeddings.

``SoftPromptBackbone`` wraps a transformers backbone (BertModel, GPT2Model, LlamaModel, a T5
encoder stack, ...): it embeds ``input_ids`` itself, prepends the prompt (B, p, d), extends the
attention mask with ones (the prompt is visible to every token; in a decoder it comes first, so
causal attention lets every real token see it), extends ``token_type_ids`` with zeros and shifts
explicit ``position_ids`` by p, and calls the backbone with ``inputs_embeds``. Its output drops
the p prompt positions again, so ``last_hidden_state`` (and every ``hidden_states`` entry) lines
up with ``input_ids``: task heads that pick a token by index (GPT-2 / LLaMA sequence
classification: the last non-pad token), LM heads and their labels, and T5's decoder (whose
cross-attention mask is the caller's) all work unchanged. BERT's pooler is recomputed from the
real [CLS] position.

KV cache / ``generate()``: the prompt goes in front only when the cache is empty (prefill, or no
cache); the cache then holds the p prompt positions, so later calls (new tokens only) are not
prompted again, get the p prompt columns prepended to their attention mask and ``position_ids``
shifted by p, and return their positions unstripped. So greedy ``generate`` with and without
``use_cache`` (chunked prefill too) gives the same tokens, and its output is ``input_ids`` + new
tokens as usual. Not supported (a clear error): static / compiled caches (4-D masks) and
restarting ``generate`` from a cache it returned.

The prompt changes the model's outputs only through attention to it: masking its columns out of
the attention mask gives the original model's outputs wherever positions are relative (rotary
LLaMA-family models) — a test checks exactly that.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from .adapter import AdapterModule

INITS = ("vocab", "random")


class SoftPromptBackbone(AdapterModule):
    """A frozen backbone behind ``n_tokens`` trainable input vectors (parameter ``soft_prompt``, (p, d)).
    ``base_layer`` is the backbone (held as ``backbone``); it cannot be merged (``merge_error``)."""

    def __init__(self, backbone: nn.Module, n_tokens: int = 20, init: str = "vocab",
                 init_token_ids: list[int] | None = None, seed: int = 0, dtype: torch.dtype | None = torch.float32,
                 max_positions: int | None = None):
        super().__init__()
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
            raise ValueError(f"soft prompt: n_tokens must be a positive int, got {n_tokens!r}")
        if init not in INITS:
            raise ValueError(f"soft prompt: init must be one of {', '.join(INITS)}, got {init!r}")
        emb = backbone.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"soft prompt: {type(backbone).__name__}'s input embeddings are a {type(emb).__name__}, "
                            "not an nn.Embedding")
        self.backbone = backbone
        self.n_tokens = n_tokens
        self.max_positions = max_positions
        w = emb.weight.detach()
        gen = torch.Generator().manual_seed(seed)
        if init_token_ids is not None:
            ids = torch.as_tensor(list(init_token_ids), dtype=torch.long)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= w.shape[0]:
                raise ValueError(f"soft prompt: init_token_ids must be token ids in [0, {w.shape[0]}), "
                                 f"got {list(init_token_ids)[:8]}")
            ids = ids.repeat(n_tokens // ids.numel() + 1)[:n_tokens]          # cycle through them
            init_w = w[ids.to(w.device)]
        elif init == "vocab":   # embeddings of random vocabulary tokens (Lester et al.'s best init)
            init_w = w[torch.randint(0, w.shape[0], (n_tokens,), generator=gen).to(w.device)]
        else:                   # random, with the embedding table's scale
            init_w = torch.randn(n_tokens, w.shape[1], generator=gen).to(w.device) * w.float().std()
        self.soft_prompt = nn.Parameter(init_w.to(dtype or w.dtype).clone())

    @property
    def base_layer(self) -> nn.Module:
        return self.backbone

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "soft_prompt", self.soft_prompt

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    @property
    def main_input_name(self) -> str:
        """What ``generate`` feeds an encoder-decoder model's encoder (T5: "input_ids")."""
        return getattr(self.backbone, "main_input_name", "input_ids")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, return_dict=None, past_key_values=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("soft prompt: pass exactly one of input_ids and inputs_embeds")
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, p = embeds.shape[0], embeds.shape[1], self.n_tokens
        past = _cached_length(past_key_values)
        prefill = past == 0         # the prompt goes in front; a non-empty cache already holds it
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"soft prompt: attention_mask must be (batch, tokens), got a {attention_mask.dim()}-D "
                             "mask (as generate builds for a static / compiled cache); use the default dynamic cache")
        if not prefill and attention_mask is not None and attention_mask.shape[1] + p != past + s:
            raise ValueError(f"soft prompt: the cache holds {past} positions ({p} of them the prompt) and {s} more "
                             f"come, so attention_mask must cover {past + s - p} tokens, not "
                             f"{attention_mask.shape[1]}; pass the mask of all tokens so far (restarting generate() "
                             "from a cache it returned is not supported: generate from the full input_ids without "
                             "past_key_values)")
        total = past + s + (p if prefill else 0)
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"soft prompt: {p} prompt tokens + {total - p} input tokens exceed the model's "
                             f"{self.max_positions} positions; shorten the inputs (max_length <= "
                             f"{self.max_positions - p}, generated tokens included) or use fewer prompt tokens")
        if prefill:
            prompt = self.soft_prompt.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)
            embeds = torch.cat([prompt, embeds], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(b, p), token_type_ids], dim=1)
        if attention_mask is not None:      # the mask always covers the prompt's (cached) positions
            attention_mask = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
        if position_ids is not None:        # the prompt takes positions 0..p-1, the tokens follow
            shifted = position_ids + p
            if prefill:
                pre = torch.arange(p, device=position_ids.device, dtype=position_ids.dtype)
                shifted = torch.cat([pre.expand(*position_ids.shape[:-1], p), shifted], dim=-1)
            position_ids = shifted
        extra = {}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        if position_ids is not None:
            extra["position_ids"] = position_ids
        if past_key_values is not None:
            extra["past_key_values"] = past_key_values
        out = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True, **extra, **kwargs)
        if prefill:
            out = self._strip(out, p)
        return out if return_dict is not False else out.to_tuple()

    def _strip(self, out, p: int):
        """Drop the prompt positions from the hidden states (and recompute BERT's pooler)."""
        out.last_hidden_state = out.last_hidden_state[:, p:]
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h[:, p:] for h in out.hidden_states)
        pooler = getattr(self.backbone, "pooler", None)
        if getattr(out, "pooler_output", None) is not None and pooler is not None:
            out.pooler_output = pooler(out.last_hidden_state)
        return out

    # why merge() (AdapterModule's: it raises this) and core.merge() refuse this module
    merge_error = ("a soft prompt adds input vectors and cannot be folded into weights; keep the patched model for "
                   "inference, or unpatch it")

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, d={self.soft_prompt.shape[1]}"


def _cached_length(cache) -> int:
    """Positions a KV cache holds (0 for none)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"soft prompt: past_key_values must be a transformers Cache (e.g. DynamicCache), "
                        f"got {type(cache).__name__}")
    return int(cache.get_seq_length())
