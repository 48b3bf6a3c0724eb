"""Prefix tuning (Li & Liang 2021): trainable keys and values prepended in every attention.

``PrefixAttention`` wraps one attention module (BertSelfAttention / RobertaSelfAttention,
DistilBertSelfAttention, GPT2Attention, LlamaAttention / MistralAttention / Qwen2Attention,
T5Attention: encoder self-, decoder self- and decoder cross-attention) and owns its layer's prefix:
``prefix_key`` and ``prefix_value``, each (p, kv_heads, head_dim). It calls the wrapped module
with ``past_key_values`` replaced by a view of the real cache (``_PrefixView``) whose ``update``
stores the layer's new keys / values in the real cache (when there is one) and returns
``[P_k; K]`` and ``[P_v; V]``: the attention then computes
``softmax(q [P_k; K]^T * scale + bias + mask) [P_v; V]``. The keys arrive at ``update`` already
rotated (RoPE), so the prefix keys carry no position and the tokens' positions do not shift.
The attention mask gets p leading "attend" columns (True / 0.0), and where the model leaves
the mask to SDPA's ``is_causal`` (None), an explicit causal mask with the prefix columns open
is built, so every token sees the whole prefix.

DistilBERT's attention takes no cache: the wrapper runs its forward (``_distilbert_attention``, the
same projections and attention function) with the keys / values through the same ``update``.
T5's relative position bias: the view's ``get_seq_length`` counts the prefix, so T5Attention's own
``compute_bias`` places the prefix at positions 0..p-1 before the tokens (which keep their relative
positions): the bias PEFT's T5 prefix tuning gets from a cache that holds the prefix. T5's
cross-attention has no position bias; its cache (``EncoderDecoderCache.cross_attention_cache``)
stores ``[P_k; K_enc]`` once and is reused as is by later decoding steps.

``reparam=True`` (the paper's reparameterisation): one ``PrefixEncoder`` per model computes every
layer's prefix as tanh(E W1^T + b1) W2^T + b2 from an embedding E (p, d); layer l's wrapper uses
only its rows of W2 / b2. The encoder is a submodule of the first wrapper only (the others hold a
plain reference), so its parameters are saved and trained once. ``fold`` (``spu_kernels.fold_prefix``)
replaces it by plain prefixes holding its output: the same forward, without p·d·h extra flops per
layer and forward.

``init_token_ids`` (patching/prefix_methods.py) sets each layer's prefix to the keys / values the
frozen model computes for real tokens: the wrapper then runs in recording mode (``_recording``).

The real self-attention cache never holds the prefix: cache lengths, position ids, ``generate()``
with or without a (dynamic) cache and the caller's attention mask are exactly those of the original
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
    (if any) and returns the layer's keys / values with the prefix in front; ``get_seq_length``
    counts the prefix (T5's relative position bias: the prefix sits before the tokens). With
    ``owner`` (T5 cross-attention: the ``EncoderDecoderCache``), the cache stores the keys /
    values with the prefix and is marked filled, so later steps reuse them as they are."""

    def __init__(self, inner: Any, key: torch.Tensor, value: torch.Tensor, owner: Any = None):
        self.inner, self.key, self.value, self.owner = inner, key, value, owner

    def _prefixed(self, key_states: torch.Tensor, value_states: torch.Tensor):
        b = key_states.shape[0]
        pk = self.key.to(key_states.dtype).expand(b, -1, -1, -1)
        pv = self.value.to(value_states.dtype).expand(b, -1, -1, -1)
        return torch.cat([pk, key_states], dim=2), torch.cat([pv, value_states], dim=2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.owner is not None:          # cross-attention: cache [P; K] once
            key_states, value_states = self._prefixed(key_states, value_states)
            if self.inner is not None:
                key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
                self.owner.is_updated[layer_idx] = True
            return key_states, value_states
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return self._prefixed(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        past = self.inner.get_seq_length(layer_idx) if self.inner is not None else 0
        return past + self.key.shape[2]


class _Recorder:
    """``past_key_values`` while ``PrefixAttention._recording`` is a list: keeps the layer's keys /
    values there and returns them unchanged (no prefix)."""

    def __init__(self, sink: list):
        self.sink = sink

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.sink.append((key_states.detach(), value_states.detach()))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _distilbert_attention(attn: nn.Module, hidden_states: torch.Tensor, past_key_values: Any,
                          attention_mask: torch.Tensor | None = None, **kwargs):
    """DistilBertSelfAttention.forward (transformers 5) with its keys / values passed through
    ``past_key_values.update`` (DistilBERT's attention has no cache argument of its own)."""
    from transformers.models.distilbert.modeling_distilbert import ALL_ATTENTION_FUNCTIONS, eager_attention_forward
    shape = (*hidden_states.shape[:-1], -1, attn.attention_head_size)
    query = attn.q_lin(hidden_states).view(shape).transpose(1, 2)
    key = attn.k_lin(hidden_states).view(shape).transpose(1, 2)
    value = attn.v_lin(hidden_states).view(shape).transpose(1, 2)
    key, value = past_key_values.update(key, value, 0)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, weights = interface(attn, query, key, value, attention_mask, dropout=attn.dropout.p if attn.training else 0.0,
                             scaling=attn.scaling, **kwargs)
    return attn.out_lin(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


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

    @torch.no_grad()
    def fold(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """reparam -> plain prefix: ``prefix_key`` / ``prefix_value`` (trainable) become ``key`` /
        ``value``, this layer's ``prefix()`` (the MLP's output), and the encoder (or the reference
        to it) is dropped."""
        if self.owns_encoder:
            del self._modules["encoder"]
        self.encoder, self.owns_encoder = None, False
        self.prefix_key = nn.Parameter(key.detach().clone())
        self.prefix_value = nn.Parameter(value.detach().clone())

    _recording: list | None = None

    def _call(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        if type(self.base_layer).__name__ == "DistilBertSelfAttention":
            return _distilbert_attention(self.base_layer, hidden_states, past_key_values, *args, **kwargs)
        return self.base_layer(hidden_states, *args, past_key_values=past_key_values, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self._recording is not None:     # the plain attention, its keys / values kept (init from tokens)
            kwargs.pop("past_key_values", None)
            return self._call(hidden_states, *args, past_key_values=_Recorder(self._recording), **kwargs)
        if self.bypassed():
            return self.base_forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(f"prefix tuning: {type(self.base_layer).__name__} was called with positional arguments "
                            "after hidden_states; this transformers version is not supported (pass them by name)")
        mask_name = "mask" if "mask" in kwargs else "attention_mask"        # T5Attention calls it ``mask``
        attention_mask = kwargs.pop(mask_name, None)
        past_key_values = kwargs.pop("past_key_values", None)
        p = self.n_tokens
        layer_idx = getattr(self.base_layer, "layer_idx", None)
        pk, pv = self.prefix()
        key = pk.permute(1, 0, 2).unsqueeze(0)        # (1, kv_heads, p, head_dim)
        value = pv.permute(1, 0, 2).unsqueeze(0)
        if kwargs.get("key_value_states") is not None:      # T5 cross-attention
            cross = getattr(past_key_values, "cross_attention_cache", None)
            if cross is not None and past_key_values.is_updated.get(layer_idx):
                view = past_key_values          # its cross-attention cache already holds [P; K_enc]
            else:
                view = _PrefixView(cross, key, value, owner=past_key_values if cross is not None else None)
            inner = None
        else:
            inner = getattr(past_key_values, "self_attention_cache", past_key_values)   # EncoderDecoderCache
            view = _PrefixView(inner, key, value)
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
            past = int(inner.get_seq_length(layer_idx)) if inner is not None else 0
            k = torch.arange(past + q, device=hidden_states.device)
            causal = k[None, :] <= (torch.arange(q, device=hidden_states.device) + past)[:, None]
            attention_mask = torch.cat([causal.new_ones(q, p), causal], dim=-1)[None, None]
        kwargs[mask_name] = attention_mask
        return self._call(hidden_states, past_key_values=view, **kwargs)

    # why merge() (AdapterModule's: it raises this) and core.merge() refuse this module
    merge_error = ("prefix tuning adds attention keys / values, which cannot be folded into weights; keep the "
                   "patched model for inference, or unpatch it")

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, layer={self.layer}, reparam={self.encoder is not None}"
