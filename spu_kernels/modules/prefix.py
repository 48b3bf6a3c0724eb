"""Prefix tuning (Li & Liang 2021): trainable keys and values prepended in every self-attention.

``PrefixAttention`` wraps one self-attention module (BertSelfAttention / RobertaSelfAttention,
GPT2Attention, LlamaAttention / MistralAttention / Qwen2Attention) and owns its layer's prefix:
``prefix_key`` and ``prefix_value``, each (p, kv_heads, head_dim). It calls the wrapped module
with ``past_key_values`` replaced by a view of the real cache (``_PrefixView``) whose ``update``
stores the layer's new keys / values in the real cache (when there is one) and returns
``[P_k; K]`` and ``[P_v; V]``: the attention then computes
``softmax(q [P_k; K]^T * scale + mask) [P_v; V]``. The keys arrive at ``update`` already
rotated (RoPE), so the prefix keys carry no position and the tokens' positions do not shift.
The attention mask gets p leading "attend" columns (True / 0.0), and where the model leaves
the mask to SDPA's ``is_causal`` (None), an explicit causal mask with the prefix columns open
is built, so every token sees the whole prefix.

``reparam=True`` (the paper's reparameterisation): one ``PrefixEncoder`` per model computes every
layer's prefix as tanh(E W1^T + b1) W2^T + b2 from an embedding E (p, d); layer l's wrapper uses
only its rows of W2 / b2. The encoder is a submodule of the first wrapper only (the others hold a
plain reference), so its parameters are saved and trained once. It is not folded into plain
prefixes: it stays (p·d·h extra flops per layer and forward).

``init_token_ids`` (patching/prefix_methods.py) sets each layer's prefix to the keys / values the
frozen model computes for real tokens: the wrapper then runs in recording mode (``_recording``).

The real cache never holds the prefix: cache lengths, position ids, ``generate()`` with or
without a (dynamic) cache and the caller's attention mask are exactly those of the original
model. For backward the attention saves [P_k; K] and [P_v; V] (p more columns than without the
prefix) as it saves K and V; the wrapper itself saves nothing else (with ``reparam``, autograd
keeps the MLP's (p, h) hidden activation per layer). Flash / flex attention (masks that are not
4-D tensors) are refused.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from .adapter import AdapterModule


class _PrefixView:
    """What the wrapped attention sees as ``past_key_values``: ``update`` goes to the real cache
    (if any) and returns the layer's keys / values with the prefix in front."""

    def __init__(self, inner: Any, key: torch.Tensor, value: torch.Tensor):
        self.inner, self.key, self.value = inner, key, value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        b = key_states.shape[0]
        pk = self.key.to(key_states.dtype).expand(b, -1, -1, -1)
        pv = self.value.to(value_states.dtype).expand(b, -1, -1, -1)
        return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)


class _Recorder:
    """``past_key_values`` while ``PrefixAttention._recording`` is a list: keeps the layer's keys /
    values there and returns them unchanged (no prefix)."""

    def __init__(self, sink: list):
        self.sink = sink

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.sink.append((key_states.detach(), value_states.detach()))
        return key_states, value_states


class PrefixEncoder(nn.Module):
    """E (p, d) -> 2-layer tanh MLP of width h -> every layer's prefix keys and values:
    ``layer(l)`` is layer l's (2, p, kv_heads, head_dim)."""

    def __init__(self, n_tokens: int, d: int, hidden: int, layers: int, kv_heads: int, head_dim: int,
                 generator: torch.Generator, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.shape = (2, n_tokens, kv_heads, head_dim)
        self.rows = 2 * kv_heads * head_dim                                     # W2 rows per layer
        out = layers * self.rows

        def uniform(*shape, fan_in):    # nn.Linear's default init, from ``generator``
            return nn.Parameter(((torch.rand(shape, generator=generator) * 2 - 1) / fan_in ** 0.5)
                                .to(device=device, dtype=dtype))
        self.embedding = nn.Parameter(torch.randn(n_tokens, d, generator=generator).to(device=device, dtype=dtype))
        self.w1, self.b1 = uniform(hidden, d, fan_in=d), uniform(hidden, fan_in=d)
        self.w2, self.b2 = uniform(out, hidden, fan_in=hidden), uniform(out, fan_in=hidden)

    def layer(self, index: int) -> torch.Tensor:
        sl = slice(index * self.rows, (index + 1) * self.rows)
        hid = torch.tanh(torch.nn.functional.linear(self.embedding, self.w1, self.b1))
        out = torch.nn.functional.linear(hid, self.w2[sl], self.b2[sl])        # (p, 2 * kv_heads * head_dim)
        return out.view(self.shape[1], 2, *self.shape[2:]).transpose(0, 1)


class PrefixAttention(AdapterModule):
    """A frozen self-attention module behind ``n_tokens`` trainable key / value vectors per head
    (parameters ``prefix_key``, ``prefix_value``: (p, kv_heads, head_dim)), or, given ``encoder``,
    behind layer ``layer`` of a shared ``PrefixEncoder`` (a submodule where ``owns_encoder``).
    Cannot be merged."""

    switchable = True

    def __init__(self, base_layer: nn.Module, n_tokens: int, kv_heads: int, head_dim: int, init_std: float = 0.02,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = torch.float32,
                 encoder: PrefixEncoder | None = None, layer: int = 0, owns_encoder: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.n_tokens = n_tokens
        self.layer = layer
        w = next(base_layer.parameters())
        shape = (n_tokens, kv_heads, head_dim)
        if encoder is not None:
            if owns_encoder:
                self.encoder = encoder
            else:       # a plain reference: the first layer's wrapper owns (saves, trains) it
                object.__setattr__(self, "encoder", encoder)
            self.owns_encoder = owns_encoder
            return
        self.encoder, self.owns_encoder = None, False
        self.prefix_key = nn.Parameter((torch.randn(shape, generator=generator) * init_std)
                                       .to(device=w.device, dtype=dtype or w.dtype))
        self.prefix_value = nn.Parameter((torch.randn(shape, generator=generator) * init_std)
                                         .to(device=w.device, dtype=dtype or w.dtype))

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        if self.encoder is None:
            yield "prefix_key", self.prefix_key
            yield "prefix_value", self.prefix_value
        elif self.owns_encoder:
            for name, p in self.encoder.named_parameters():
                yield f"encoder.{name}", p

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prefix keys and values, each (p, kv_heads, head_dim)."""
        if self.encoder is None:
            return self.prefix_key, self.prefix_value
        kv = self.encoder.layer(self.layer)
        return kv[0], kv[1]

    @torch.no_grad()
    def init_from(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Set the prefix to keys / values (1, kv_heads, p, head_dim) the attention computed for
        real tokens (what ``forward`` recorded while ``_recording`` was a list)."""
        self.prefix_key.copy_(keys[0].permute(1, 0, 2))
        self.prefix_value.copy_(values[0].permute(1, 0, 2))

    _recording: list | None = None

    def forward(self, hidden_states: torch.Tensor, *args, attention_mask=None, past_key_values=None, **kwargs):
        if self._recording is not None:     # the plain attention, its keys / values kept (init from tokens)
            return self.base_layer(hidden_states, *args, attention_mask=attention_mask,
                                   past_key_values=_Recorder(self._recording), **kwargs)
        if self.bypassed():
            return self.base_forward(hidden_states, *args, attention_mask=attention_mask,
                                     past_key_values=past_key_values, **kwargs)
        if args:
            raise TypeError(f"prefix tuning: {type(self.base_layer).__name__} was called with positional arguments "
                            "after hidden_states; this transformers version is not supported (pass them by name)")
        inner = getattr(past_key_values, "self_attention_cache", past_key_values)   # EncoderDecoderCache
        p = self.n_tokens
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
                raise ValueError(f"prefix tuning needs a 4-D tensor attention mask (eager / sdpa attention), got "
                                 f"{type(attention_mask).__name__}; load the model with attn_implementation='sdpa' "
                                 "or 'eager'")
            m = attention_mask
            pad = (m.new_ones if m.dtype == torch.bool else m.new_zeros)(*m.shape[:-1], p)
            attention_mask = torch.cat([pad, m], dim=-1)
        elif getattr(self.base_layer, "is_causal", False) and hidden_states.shape[1] > 1:
            q = hidden_states.shape[1]
            past = int(inner.get_seq_length(self.base_layer.layer_idx)) if inner is not None else 0
            k = torch.arange(past + q, device=hidden_states.device)
            causal = k[None, :] <= (torch.arange(q, device=hidden_states.device) + past)[:, None]
            attention_mask = torch.cat([causal.new_ones(q, p), causal], dim=-1)[None, None]
        pk, pv = self.prefix()
        key = pk.permute(1, 0, 2).unsqueeze(0)        # (1, kv_heads, p, head_dim)
        value = pv.permute(1, 0, 2).unsqueeze(0)
        return self.base_layer(hidden_states, attention_mask=attention_mask,
                               past_key_values=_PrefixView(inner, key, value), **kwargs)

    # why merge() (AdapterModule's: it raises this) and core.merge() refuse this module
    merge_error = ("prefix tuning adds attention keys / values, which cannot be folded into weights; keep the "
                   "patched model for inference, or unpatch it")

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, layer={self.layer}, reparam={self.encoder is not None}"
