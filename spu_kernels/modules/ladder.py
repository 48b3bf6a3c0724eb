"""Ladder side networks: LST (Sung et al. 2022) and k-LST.

The frozen backbone runs without autograd; its hidden states h_0 … h_L (embedding output and each
layer's output) feed trainable *ladders* C_j = D_j(h_j) of width d_s = d / r. A side network of width
d_s carries a state s (s = C_0 at the start) through side layers i (1-based backbone layer ids):
  * LST:   s ← μ_i s + (1 − μ_i) C_i, μ_i = sigmoid(α_i / 0.1), α_i = 0 at the start;
  * k-LST: s ← s + W_o · CrossAttn(W_q s; C_{i−⌊k/2⌋ … i+⌊k/2⌋}) (window clipped at 0 and L),
           attention per token over the stacked ladder features (ops/ladder_cross_attention.py);
then a side transformer block (self-attention over the sequence + FFN, width d_s, the backbone's
head count). The final state is (normed and) upsampled to d for the task head.

``LadderSideNetwork`` is architecture-agnostic: the patch method (patching/ladder_methods.py) tells
it the block type (pre/post norm, LayerNorm/RMSNorm, activation, gated FFN, rotary) and may load
pruned backbone weights into it (``select_units`` of L1 or Fisher scores / ``SideBlock.load_pruned``).
``LadderBackbone`` wraps a Hugging Face backbone: frozen pass under ``torch.no_grad()``, side network,
and the backbone's own output type with ``last_hidden_state`` (and the pooler output) recomputed.
Encoder-decoder backbones (T5): modules/ladder_seq2seq.py builds on these (``RelativePositionBias``,
``upsample=False``, ``block_cls``).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.ladder_cross_attention import ladder_cross_attention
from .adapter import AdapterModule

GATE_TEMPERATURE = 0.1


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def load_slice(lin: nn.Linear, W: torch.Tensor, b: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """``lin`` := the (rows, cols) slice of the full-size weight W (nn.Linear layout) and b[rows]
    (a zero bias where the backbone's layer has none). Under no_grad: a pruned initialisation."""
    lin.weight.copy_(W[rows][:, cols])
    if b is not None:
        lin.bias.copy_(b[rows])
    else:
        lin.bias.zero_()


class SideBlock(nn.Module):
    """A transformer block of width d: multi-head self-attention (inner width h·d_h) and an FFN,
    pre- or post-norm, LayerNorm or RMSNorm, plain or gated (SwiGLU-style) FFN, optional rotary.
    ``attn_scale``: the attention logits' scale (None: 1/sqrt(head_dim); T5: 1.0, its weights absorb it).
    ``mask`` may be a bool mask or an additive float mask (a relative position bias rides in it)."""

    def __init__(self, d: int, num_heads: int, head_dim: int, d_ff: int, *, act: Callable, pre_norm: bool,
                 norm: str = "layer", eps: float = 1e-5, glu: bool = False, rope: bool = False,
                 dropout: float = 0.0, attn_scale: float | None = None):
        super().__init__()
        self.h, self.dh, self.pre_norm, self.dropout, self.act = num_heads, head_dim, pre_norm, dropout, act
        self.attn_scale = attn_scale
        inner = num_heads * head_dim
        norm_cls = (lambda: nn.LayerNorm(d, eps=eps)) if norm == "layer" else (lambda: nn.RMSNorm(d, eps=eps))
        self.ln1, self.ln2 = norm_cls(), norm_cls()
        self.q, self.k, self.v = nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner)
        self.o = nn.Linear(inner, d)
        self.fin = nn.Linear(d, d_ff)
        self.gate = nn.Linear(d, d_ff) if glu else None
        self.fout = nn.Linear(d_ff, d)
        if rope:
            if head_dim % 2:
                raise ValueError(f"rotary side attention needs an even side head dim, got {head_dim}")
            self.register_buffer("inv_freq", 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
        else:
            self.inv_freq = None

    def _attn(self, x, mask, is_causal):
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, self.h, self.dh).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.inv_freq is not None:
            ang = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq.float()[None, :]
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(q.dtype), ang.sin().to(q.dtype)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)      # an additive mask under autocast: SDPA wants the query's dtype
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.attn_scale)
        return self.o(y.transpose(1, 2).reshape(b, s, self.h * self.dh))

    def _ffn(self, x):
        u = self.fin(x)
        u = self.act(self.gate(x)) * u if self.gate is not None else self.act(u)
        return self.fout(u)

    def forward(self, x, mask=None, is_causal=False):
        drop = lambda t: F.dropout(t, self.dropout, self.training)
        if self.pre_norm:
            x = x + drop(self._attn(self.ln1(x), mask, is_causal))
            return x + drop(self._ffn(self.ln2(x)))
        x = self.ln1(x + drop(self._attn(x, mask, is_causal)))
        return self.ln2(x + drop(self._ffn(x)))

    @torch.no_grad()
    def load_pruned(self, w: dict, d_idx: torch.Tensor, hd_idx: torch.Tensor, ff_idx: torch.Tensor,
                    inv_freq: torch.Tensor | None = None) -> None:
        """Copy the backbone block's weights ``w`` (full size, nn.Linear layout: "q", "k", "v", "o",
        "fin", "fout", optional "gate" -> (W, b or None); "ln1", "ln2" -> (weight, bias or None))
        restricted to hidden dims ``d_idx``, attention columns ``hd_idx`` and FFN units ``ff_idx``."""
        for name in ("q", "k", "v"):
            load_slice(getattr(self, name), *w[name], hd_idx, d_idx)
        load_slice(self.o, *w["o"], d_idx, hd_idx)
        load_slice(self.fin, *w["fin"], ff_idx, d_idx)
        if self.gate is not None:
            load_slice(self.gate, *w["gate"], ff_idx, d_idx)
        load_slice(self.fout, *w["fout"], d_idx, ff_idx)
        for name in ("ln1", "ln2"):
            weight, bias = w[name]
            ln = getattr(self, name)
            ln.weight.copy_(weight[d_idx])
            if getattr(ln, "bias", None) is not None:
                ln.bias.copy_(bias[d_idx] if bias is not None else torch.zeros_like(ln.bias))
        if inv_freq is not None and self.inv_freq is not None:
            self.inv_freq.copy_(inv_freq)


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    return torch.topk(score.float(), n).indices.sort().values


def l1_scores(blocks: Sequence[dict]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Weight-magnitude (L1) importance of the structural units: (hidden dims (d,), per block the
    attention columns (h·d_h,) and the FFN units (d_ff,)) of the blocks' canonical weights."""
    d = blocks[0]["o"][0].shape[0]
    imp_d = torch.zeros(d, device=blocks[0]["o"][0].device)
    imp_hd, imp_ff = [], []
    for w in blocks:
        for name in ("q", "k", "v", "fin") + (("gate",) if "gate" in w else ()):
            imp_d += w[name][0].abs().float().sum(0)
        for name in ("o", "fout"):
            imp_d += w[name][0].abs().float().sum(1)
        imp_hd.append(sum(w[n][0].abs().float().sum(1) for n in ("q", "k", "v")) + w["o"][0].abs().float().sum(0))
        ff = w["fin"][0].abs().float().sum(1) + w["fout"][0].abs().float().sum(0)
        if "gate" in w:
            ff += w["gate"][0].abs().float().sum(1)
        imp_ff.append(ff)
    return imp_d, imp_hd, imp_ff


def select_units(imp_d: torch.Tensor, imp_hd: Sequence[torch.Tensor], imp_ff: Sequence[torch.Tensor],
                 num_heads: int, head_dim: int, d_s: int, dh_s: int, ff_s: int, rope: bool = False):
    """The kept units, given importance scores (``l1_scores`` or the Fisher scores of
    patching/ladder_fisher.py). Returns (d_idx, [(hd_idx, ff_idx, freq_idx)] per block): the d_s
    top hidden dims for the whole side network (the residual stream is shared), per block the same
    dh_s dims inside every head (a dim's score summed over the heads; rotary: dh_s/2 frequency
    pairs (f, f + d_h/2), kept in the rotate-half order) and the ff_s top FFN units."""
    d_idx = _top(imp_d, d_s)
    dev = d_idx.device
    per_block = []
    for hd_score, ff_score in zip(imp_hd, imp_ff):
        imp_e = hd_score.float().view(num_heads, head_dim).sum(0)      # (head_dim,): shared by the heads
        freq = None
        if rope:
            half = head_dim // 2
            freq = _top(imp_e[:half] + imp_e[half:], dh_s // 2)
            within = torch.cat((freq, freq + half))
        else:
            within = _top(imp_e, dh_s)
        hd_idx = (torch.arange(num_heads, device=dev)[:, None] * head_dim + within[None, :]).reshape(-1)
        per_block.append((hd_idx, _top(ff_score, ff_s), freq))
    return d_idx, per_block


class RelativePositionBias(nn.Module):
    """T5-style learned relative position bias: a (num_buckets, heads) table indexed by the bucket of
    key position − query position (exact for small distances, log-spaced up to ``max_distance``;
    bidirectional: separate buckets for keys after the query). ``forward(q_len, k_len)`` -> (1, heads,
    q_len, k_len) in the table's dtype, added to the attention logits. Zeros at the start (no
    position information) unless the patch copies a backbone's table into ``weight``."""

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, num_heads))

    def buckets(self, rel: torch.Tensor) -> torch.Tensor:
        """The bucket (int64) of each relative position ``rel`` (key − query), as T5 computes it."""
        n, out = self.num_buckets, torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            out = out + (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = -rel.clamp(max=0)
        exact = n // 2
        far = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                       * (n - exact)).long()
        return out + torch.where(rel < exact, rel, far.clamp(max=n - 1))

    def forward(self, q_len: int, k_len: int, device=None) -> torch.Tensor:
        device = device if device is not None else self.weight.device
        rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        return self.weight[self.buckets(rel)].permute(2, 0, 1).unsqueeze(0)


class LadderCrossAttention(nn.Module):
    """k-LST's per-layer cross-attention: s (B, S, d_s) queries the k stacked ladder features
    (k, B·S, d_s) of the same tokens; W_k, W_v are fused into the kernel (no bias: see the op)."""

    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.h = num_heads
        self.q = nn.Linear(d, d)
        self.w_k = nn.Parameter(torch.empty(d, d))
        self.w_v = nn.Parameter(torch.empty(d, d))
        self.o = nn.Linear(d, d)
        with torch.no_grad():   # start as s + (attention-weighted mean of the window's ladders)
            nn.init.kaiming_uniform_(self.w_k, a=math.sqrt(5))
            self.w_v.copy_(torch.eye(d))
            self.o.weight.copy_(torch.eye(d))
            self.o.bias.zero_()

    def forward(self, s: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        b, n, d = s.shape
        q = self.q(s).view(b * n, self.h, d // self.h)
        out = ladder_cross_attention(q, stack, self.w_k, self.w_v)
        return self.o(out.view(b, n, d))


class LadderSideNetwork(nn.Module):
    """The side network: ladders D_j, LST gates or k-LST cross-attentions, side blocks, final norm
    and upsample. ``forward(hidden_states, attention_mask)`` -> (B, S, d) in the hidden states' dtype.

    Args:
        d: backbone width; num_layers: L; num_heads: backbone (and side) head count.
        r: reduction factor, d_s = d / r. k: None for LST, else the odd window size of k-LST.
        layers: the side layers (backbone layer ids in 1..L); default all.
        block: keyword arguments of ``SideBlock`` (act, pre_norm, norm, eps, glu, rope) plus
            ``head_dim`` (backbone head dim) and ``d_ff`` (backbone FFN width).
        causal: decoder (causal) side self-attention. final_norm: "layer", "rms" or None.
        position_bias: None, or ``RelativePositionBias`` options (num_buckets, max_distance): one
            learned bias table shared by the side blocks' self-attention (T5), bidirectional unless causal.
        upsample: False leaves out ``up``: forward then returns the final side state (B, S, d_s)
            (an encoder side network feeding a decoder side network's cross-attention).
        block_cls: the side block class (``SideBlock`` or a subclass; extra forward keyword
            arguments of ``forward`` are handed to every block).
    """

    def __init__(self, d: int, num_layers: int, num_heads: int, *, r: int, k: int | None = None,
                 layers: Sequence[int] | None = None, block: dict, causal: bool = False,
                 final_norm: str | None = None, dropout: float = 0.0, position_bias: dict | None = None,
                 upsample: bool = True, block_cls: type[SideBlock] = SideBlock):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or d % r:
            raise ValueError(f"r must be a positive int dividing the hidden size {d}, got {r!r}")
        d_s = d // r
        if d_s % num_heads:
            raise ValueError(f"d/r = {d_s} must be a multiple of the head count {num_heads} (the side network keeps "
                             f"the backbone's heads); choose r so that {d} / r is, e.g. r = "
                             f"{[x for x in range(2, 65) if d % x == 0 and (d // x) % num_heads == 0][:4]}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0):
            raise ValueError(f"k must be an odd int >= 1 (the window C_(i-k//2) .. C_(i+k//2) is centred on "
                             f"layer i), got {k!r}")
        layers = list(range(1, num_layers + 1)) if layers is None else list(layers)
        if not layers or any(not isinstance(i, int) or isinstance(i, bool) or not 1 <= i <= num_layers
                             for i in layers) or sorted(set(layers)) != layers:
            raise ValueError(f"layers must be a non-empty increasing list of backbone layer ids in 1..{num_layers}, "
                             f"got {layers!r}")
        block = dict(block)
        head_dim, d_ff = block.pop("head_dim"), block.pop("d_ff")
        dh_s = head_dim // r
        if dh_s < 1 or head_dim % r:
            raise ValueError(f"r={r} must divide the backbone head dim {head_dim}")
        self.d, self.d_s, self.h, self.k, self.causal = d, d_s, num_heads, k, causal
        self.num_layers, self.layers = num_layers, layers
        self.windows = [(max(0, i - k // 2), min(num_layers, i + k // 2)) if k else (i, i) for i in layers]
        self.ladder_ids = sorted({0, *(j for lo, hi in self.windows for j in range(lo, hi + 1))})
        self._pos = {j: n for n, j in enumerate(self.ladder_ids)}   # ladder id -> row of the ladder stack
        n = len(self.ladder_ids)
        self.down_weight = nn.Parameter(torch.empty(n, d_s, d))
        self.down_bias = nn.Parameter(torch.zeros(n, d_s))
        for i in range(n):
            nn.init.kaiming_uniform_(self.down_weight[i], a=math.sqrt(5))
        if k is None:
            self.gate_alpha = nn.Parameter(torch.zeros(len(layers)))
            self.cross = None
        else:
            self.gate_alpha = None
            self.cross = nn.ModuleList(LadderCrossAttention(d_s, num_heads) for _ in layers)
        self.blocks = nn.ModuleList(block_cls(d_s, num_heads, dh_s, max(1, d_ff // r), dropout=dropout, **block)
                                    for _ in layers)
        norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, None: None}[final_norm]
        self.final_norm = norm(d_s, eps=block.get("eps", 1e-5)) if norm else None
        self.rel_bias = (RelativePositionBias(num_heads, bidirectional=not causal, **position_bias)
                         if position_bias is not None else None)
        self.up = nn.Linear(d_s, d) if upsample else None

    @torch.no_grad()
    def init_selection(self, d_idx: torch.Tensor) -> None:
        """Ladders start as the selection of the kept hidden dims (C_j = h_j[:, d_idx]) and the
        upsample as its transpose: the pruned side blocks see the coordinates they were cut from."""
        self.down_weight.zero_()
        self.down_weight[:, torch.arange(self.d_s), d_idx] = 1.0
        self.down_bias.zero_()
        if self.up is not None:
            self.up.weight.zero_()
            self.up.weight[d_idx, torch.arange(self.d_s)] = 1.0
            self.up.bias.zero_()

    def _mask(self, attention_mask, b, s, device):
        """SDPA arguments: (bool mask (B, 1, S, S) or None, is_causal); with a relative position bias
        an additive float mask (B or 1, heads, S, S): the bias, and the dtype's minimum where masked."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise NotImplementedError("the ladder side network takes a (batch, seq) padding mask; got a "
                                      f"{attention_mask.dim()}-d attention_mask")
        if attention_mask is None and self.rel_bias is None:
            return None, self.causal
        keep = torch.ones(1, 1, s, s, dtype=torch.bool, device=device)
        if attention_mask is not None:
            keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :].expand(b, 1, s, s)
        if self.causal:
            keep = keep & torch.ones(s, s, dtype=torch.bool, device=device).tril()
        # a token always sees itself: fully padded rows stay finite (their outputs are ignored anyway)
        keep = keep | torch.eye(s, dtype=torch.bool, device=device)
        if self.rel_bias is None:
            return keep, False
        bias = self.rel_bias(s, s, device).to(self.down_weight.dtype)
        return bias.masked_fill(~keep, torch.finfo(bias.dtype).min), False

    def forward(self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None,
                **block_kwargs):
        if len(hidden_states) != self.num_layers + 1:
            raise ValueError(f"expected {self.num_layers + 1} hidden states (embeddings + {self.num_layers} layers), "
                             f"got {len(hidden_states)}")
        out_dtype = hidden_states[0].dtype
        b, s, d = hidden_states[0].shape
        dt = self.down_weight.dtype
        # one batched GEMM for every ladder: (n, B·S, d) @ (n, d, d_s); the stack is no-grad input
        stack = torch.stack([hidden_states[j].reshape(b * s, d) for j in self.ladder_ids]).to(dt)
        ladders = torch.baddbmm(self.down_bias.unsqueeze(1), stack, self.down_weight.transpose(1, 2))
        del stack
        mask, is_causal = self._mask(attention_mask, b, s, hidden_states[0].device)
        state = ladders[self._pos[0]].view(b, s, self.d_s)
        for n, (i, (lo, hi)) in enumerate(zip(self.layers, self.windows)):
            if self.cross is None:
                mu = torch.sigmoid(self.gate_alpha[n] / GATE_TEMPERATURE)
                state = mu * state + (1 - mu) * ladders[self._pos[i]].view(b, s, self.d_s)
            else:
                state = state + self.cross[n](state, ladders[self._pos[lo]:self._pos[hi] + 1])
            state = self.blocks[n](state, mask, is_causal, **block_kwargs)
        if self.final_norm is not None:
            state = self.final_norm(state)
        return self.up(state).to(out_dtype) if self.up is not None else state


def _install_output_capturing_hooks(backbone: nn.Module) -> None:
    """transformers (5.x) installs the hooks that collect ``output_hidden_states`` on the first call
    that asks for them, under a threading lock, which torch.compile cannot trace (fullgraph=True
    fails when that first call is compiled). The ladder always asks: install them now, eagerly."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:       # older transformers: nothing installed lazily
        return
    if hasattr(backbone, "config"):
        maybe_install_capturing_hooks(backbone)


class LadderBackbone(AdapterModule):
    """Stands in for a Hugging Face backbone (``model.roberta``, ``model.transformer``, ...): runs it
    frozen under ``torch.no_grad()`` with ``output_hidden_states``, feeds the side network, and returns
    the backbone's own output type with ``last_hidden_state`` = the side network's output (and
    ``pooler_output`` = the backbone's frozen pooler applied to it, where it has one). Unknown
    attributes resolve to the wrapped backbone, so the task model's helpers keep working.
    ``base_layer`` is the backbone, which it leaves untouched; what trains is the side network
    (``adapter_parameters``); it cannot be merged (``merge_error``)."""

    def __init__(self, backbone: nn.Module, side: LadderSideNetwork, *, decoder: bool = False):
        super().__init__()
        self.base_layer = backbone
        self.side = side
        self.decoder = decoder
        self._sig = inspect.signature(backbone.forward)
        _install_output_capturing_hooks(backbone)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.side.named_parameters(prefix="side")

    def _run_frozen(self, args, kwargs, **override):
        """The backbone's output (hidden states on, under no_grad; ``override`` replaces inputs) and
        ``get(name)``: the caller's argument ``name`` (positional or keyword), or None."""
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
        get = lambda name: bound.get(name, extra.get(name))
        if get("past_key_values") is not None:
            raise NotImplementedError("a ladder-patched model has no KV cache for its side network: run the full "
                                      "sequence (generate(..., use_cache=False)), or unpatch for cached decoding")
        if override:     # everything by name, so that an override cannot clash with a positional argument
            args, kwargs = (), {**{k: v for k, v in bound.items() if k != "kwargs"}, **extra}
        kwargs = {**kwargs, **override, "output_hidden_states": True, "return_dict": True}
        if self.decoder:
            kwargs["use_cache"] = False
        with torch.no_grad():
            return self.base_layer(*args, **kwargs), get

    def _output(self, out, y, get):
        """The backbone's output type with ``last_hidden_state`` = ``y`` (and the pooler output of it)."""
        fields = {k: v for k, v in out.items() if k not in ("last_hidden_state", "pooler_output", "hidden_states")}
        fields["last_hidden_state"] = y
        if out.get("pooler_output") is not None:
            fields["pooler_output"] = self.base_layer.pooler(y)
        if get("output_hidden_states"):
            fields["hidden_states"] = out.hidden_states
        new = type(out)(**fields)
        return new if get("return_dict") is not False else new.to_tuple()

    def forward(self, *args, **kwargs):
        out, get = self._run_frozen(args, kwargs)
        return self._output(out, self.side(out.hidden_states, get("attention_mask")), get)

    # why merge() (AdapterModule's: it raises this) and core.merge() refuse this module
    merge_error = ("a ladder side network cannot be merged into the backbone: it is a separate network that reads "
                   "the backbone's hidden states; keep the patched model, or unpatch() it")
