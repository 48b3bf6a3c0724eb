"""Ladder side networks on an encoder-decoder backbone (T5), as LST (Sung et al. 2022) builds them.

Two side networks (``LadderSideNetwork``, width d_s = d / r, T5-style relative position bias):
  * the encoder side reads the frozen encoder's hidden states h_0 … h_L like any side network and
    ends with its final norm (no upsample): its output M (B, S_enc, d_s) is the "memory";
  * the decoder side reads the frozen decoder's hidden states, its self-attention is causal, and
    each of its blocks (``SideDecoderBlock``) also cross-attends to M; its final state is upsampled
    to d and takes the place of the decoder's ``last_hidden_state`` (the LM head, and T5's
    d_model**-0.5 scaling before it, see it exactly as they see the unpatched decoder's output).
The frozen backbone is unchanged: its decoder still attends to its own encoder's output E.

The model's forward hands the encoder's ``last_hidden_state`` to the decoder as
``encoder_hidden_states`` and nothing else, so ``LadderEncoder`` returns [E ; M] (B, S_enc, d + d_s),
M cast to E's dtype, and ``LadderDecoder`` splits it again. Everything that carries encoder outputs
(``generate``'s ``encoder_outputs``, beam expansion, a caller's own ``encoder_outputs``) then carries
M along; ``encoder_last_hidden_state`` of the model's output is that concatenation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ladder import LadderBackbone, LadderSideNetwork, SideBlock, load_slice


class SideDecoderBlock(SideBlock):
    """A pre-norm ``SideBlock`` with a cross-attention sub-layer between self-attention and the FFN
    (T5's decoder block): x ← x + W_xo · Attn(W_xq norm(x); W_xk M, W_xv M), no position bias.
    ``forward(x, mask, is_causal, memory=M (B, S_enc, d), memory_mask=(B, S_enc) 1 = attend)``."""

    def __init__(self, d: int, num_heads: int, head_dim: int, d_ff: int, **kwargs):
        super().__init__(d, num_heads, head_dim, d_ff, **kwargs)
        if not self.pre_norm:
            raise ValueError("SideDecoderBlock is pre-norm (T5); got pre_norm=False")
        inner = num_heads * head_dim
        self.lnx = type(self.ln1)(d, eps=self.ln1.eps)
        self.xq, self.xk, self.xv = nn.Linear(d, inner), nn.Linear(d, inner), nn.Linear(d, inner)
        self.xo = nn.Linear(inner, d)

    def _cross(self, x, memory, memory_mask):
        b, s, _ = x.shape
        t = memory.shape[1]
        q = self.xq(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k, v = (f(memory).view(b, t, self.h, self.dh).transpose(1, 2) for f in (self.xk, self.xv))
        mask = None
        if memory_mask is not None:   # additive: a fully padded row stays finite (uniform), as T5's own mask
            keep = memory_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill(~keep, torch.finfo(q.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.xo(y.transpose(1, 2).reshape(b, s, self.h * self.dh))

    def forward(self, x, mask=None, is_causal=False, *, memory=None, memory_mask=None):
        if memory is None:
            raise ValueError("SideDecoderBlock needs the encoder side network's output (memory=...)")
        drop = lambda t: F.dropout(t, self.dropout, self.training)
        x = x + drop(self._attn(self.ln1(x), mask, is_causal))
        x = x + drop(self._cross(self.lnx(x), memory.to(x.dtype), memory_mask))
        return x + drop(self._ffn(self.ln2(x)))

    @torch.no_grad()
    def load_pruned_cross(self, w: dict, d_idx: torch.Tensor, mem_idx: torch.Tensor, hd_idx: torch.Tensor) -> None:
        """Copy the backbone block's cross-attention (``w``: "xq", "xk", "xv", "xo" -> (W, b or None),
        "lnx" -> (weight, bias or None), full size, nn.Linear layout) restricted to this side's hidden
        dims ``d_idx``, the encoder side's ``mem_idx`` (the memory's dims) and attention columns ``hd_idx``."""
        load_slice(self.xq, *w["xq"], hd_idx, d_idx)
        load_slice(self.xk, *w["xk"], hd_idx, mem_idx)
        load_slice(self.xv, *w["xv"], hd_idx, mem_idx)
        load_slice(self.xo, *w["xo"], d_idx, hd_idx)
        self.lnx.weight.copy_(w["lnx"][0][d_idx])


class LadderEncoder(LadderBackbone):
    """Stands in for the encoder stack: runs it frozen (no_grad), feeds the encoder side network and
    returns the stack's output type with ``last_hidden_state`` = [E ; M] (B, S, d + d_s)."""

    def forward(self, *args, **kwargs):
        out, get = self._run_frozen(args, kwargs)
        memory = self.side(out.hidden_states, get("attention_mask"))
        e = out.last_hidden_state
        return self._output(out, torch.cat((e, memory.to(e.dtype)), dim=-1), get)


class LadderDecoder(LadderBackbone):
    """Stands in for the decoder stack: splits ``encoder_hidden_states`` = [E ; M] (from
    ``LadderEncoder``), runs the frozen decoder over E (no_grad, no cache), and the decoder side
    network over its hidden states with cross-attention to M (``encoder_attention_mask`` masks it)."""

    def __init__(self, backbone: nn.Module, side: LadderSideNetwork, *, d: int, memory_width: int):
        super().__init__(backbone, side, decoder=True)
        self.d, self.memory_width = d, memory_width

    def forward(self, *args, **kwargs):
        bound = self._sig.bind_partial(*args, **kwargs).arguments
        enc = bound.get("encoder_hidden_states")
        if enc is None or enc.shape[-1] != self.d + self.memory_width:
            got = "none" if enc is None else f"width {enc.shape[-1]}"
            raise ValueError(f"the ladder-patched decoder needs the ladder-patched encoder's output [E ; M] of width "
                             f"d + d_s = {self.d} + {self.memory_width} as encoder_hidden_states (got {got}): run "
                             "the patched model's own encoder (model.get_encoder()), not the unpatched one")
        out, get = self._run_frozen(args, kwargs, encoder_hidden_states=enc[..., :self.d].contiguous())
        y = self.side(out.hidden_states, get("attention_mask"), memory=enc[..., self.d:],
                      memory_mask=get("encoder_attention_mask"))
        return self._output(out, y, get)
