"""The ladder side-network methods: "lst" (Sung et al. 2022) and "klst" (k stacked ladders with a
per-token cross-attention; the kernel is ops/ladder_cross_attention.py).

The backbone child of the task model (``model.bert`` / ``.roberta`` / ``.distilbert`` /
``.transformer`` / ``.model``, i.e. ``model.base_model_prefix``) is replaced by a ``LadderBackbone``
holding the original backbone (frozen, run under no_grad) and the trainable side network; the task
head (classifier / score / lm_head) reads the side network's output through the backbone's own
output type, so the model's forward signature, outputs and loss are unchanged. ``unpatch`` puts the
original backbone back (through the core's replace / restore); ``merge`` is an error.

What is architecture-specific (where the layers are, the side blocks' options, each family's block
weights in one canonical form for the pruned initialisation) is on the family's record in
architectures.py: ``Family.side_layout``, ``Family.side_block`` and ``Family.positions``.
The pruned initialisation ranks the units by L1 magnitude (``init="prune"``) or by Fisher
information on training batches (``init="fisher"``: ladder_fisher.py), then slices the same way.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..modules.ladder import LadderBackbone, LadderSideNetwork, l1_scores, select_units
from ..modules.ladder_seq2seq import LadderDecoder, LadderEncoder, SideDecoderBlock
from .architectures import FAMILIES, head_dim, model_type_of
from .core import PatchContext
from .ladder_fisher import unit_fisher_scores
from .options import float_dtype
from .registry import register_method

INITS = ("prune", "fisher", "random")


def _supported() -> str:
    """The families with side networks, for messages: "a (A, B), b and c"."""
    names = [f"{f.name} ({f.models})" if f.models else f.name for f in FAMILIES if f.side_layout is not None]
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def _side_network(ctx: PatchContext, r, k, layers, init, dropout, side_dtype, batches=None):
    model = ctx.model
    fam = ctx.family
    if fam is None or fam.side_layout is None:
        raise ValueError(f"ladder side networks support the {_supported()} families; "
                         f"model_type {model_type_of(model)!r} is not one of them")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "fisher" and batches is None:
        raise ValueError("init='fisher' ranks the backbone's units by Fisher information on training batches: pass "
                         "batches=[{'input_ids': ..., 'attention_mask': ..., 'labels': ...}, ...] (a few, e.g. 8)")
    if init != "fisher" and batches is not None:
        raise ValueError(f"batches is only used by init='fisher' (got init={init!r}); drop it or set init='fisher'")
    if batches is not None and (isinstance(batches, (Mapping, str)) or not isinstance(batches, Iterable)):
        raise TypeError(f"batches must be an iterable of dicts of model inputs with labels, got "
                        f"{type(batches).__name__}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if fam.encoder_decoder:
        return _seq2seq_side_networks(ctx, r, k, layers, init, dropout, side_dtype, batches)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(f"patch(..., 'lst'/'klst') needs a task model with a backbone child (e.g. "
                         f"{type(model).__name__.replace('Model', '')}ForSequenceClassification / ...ForCausalLM); "
                         f"{type(model).__name__} has no '{prefix}' child")
    fisher = None
    if init == "fisher":
        fisher = lambda mods, ids, canonical: unit_fisher_scores(model, mods, ids, canonical, batches)
    side, lay, _ = _build_side(fam, model.config, backbone, r, k, layers, init, dropout, side_dtype, fisher)
    if init == "fisher":   # a load re-creates the shapes (any init does); the weights come from the file
        ctx.recorded_options.update(init="prune", batches=None)
    ctx.replace(prefix, LadderBackbone(backbone, side, decoder=lay.causal))
    ctx.train(side.parameters())


def _build_side(fam, cfg, backbone, r, k, layers, init, dropout, side_dtype, fisher=None, **side_kwargs):
    """One side network beside ``backbone`` (a backbone, or one stack of an encoder-decoder), its
    blocks cut from the backbone's by ``init``; ``fisher(mods, side_ids, canonical)`` gives the Fisher
    scores for init="fisher". Returns (side network, the family's SideLayout, kept hidden dims or None)."""
    lay = fam.side_layout(backbone, cfg)
    mods, fnorm, rope = lay.layers, lay.final_norm, fam.positions == "rotary"
    fnorm_kind = lay.block["norm"] if fnorm is not None else None
    blk = dict(lay.block, rope=True) if rope else lay.block
    d, h, L = cfg.hidden_size, cfg.num_attention_heads, len(mods)
    hd = head_dim(cfg)
    p0 = next(backbone.parameters())
    bias = lay.relative_bias
    side = LadderSideNetwork(d, L, h, r=r, k=k, layers=layers, causal=lay.causal, final_norm=fnorm_kind,
                             dropout=dropout, block=dict(blk, head_dim=hd, d_ff=lay.d_ff),
                             position_bias=(None if bias is None else
                                            {"num_buckets": bias["table"].shape[0],
                                             "max_distance": bias["max_distance"]}), **side_kwargs)
    side.to(device=p0.device)
    d_idx = None
    if init in ("prune", "fisher"):
        canonical = lambda block: fam.side_block(block, cfg)
        scores = fisher(mods, side.layers, canonical) if init == "fisher" else None
        with torch.no_grad():
            weights = [canonical(mods[i - 1]) for i in side.layers]
            d_idx, per_block = select_units(*(scores or l1_scores(weights)), h, hd, side.d_s, hd // r,
                                            side.blocks[0].fin.out_features, rope=rope)
            inv_freq = getattr(getattr(backbone, "rotary_emb", None), "inv_freq", None)
            for blkmod, w, (hd_idx, ff_idx, freq) in zip(side.blocks, weights, per_block):
                blkmod.load_pruned({n: tuple(t.float() if t is not None else None for t in v) for n, v in w.items()},
                                   d_idx, hd_idx, ff_idx,
                                   inv_freq[freq].float() if (freq is not None and inv_freq is not None) else None)
            if side.final_norm is not None:
                side.final_norm.weight.copy_(fnorm.weight[d_idx])
                if getattr(side.final_norm, "bias", None) is not None and getattr(fnorm, "bias", None) is not None:
                    side.final_norm.bias.copy_(fnorm.bias[d_idx])
            if side.rel_bias is not None:   # the side keeps every head: the backbone's whole table
                side.rel_bias.weight.copy_(bias["table"])
            side.init_selection(d_idx)
    side.to(dtype=float_dtype(side_dtype, "side_dtype") or p0.dtype)
    return side, lay, d_idx


def _seq2seq_side_networks(ctx: PatchContext, r, k, layers, init, dropout, side_dtype, batches):
    """Encoder-decoder (T5): an encoder side network (no upsample: its output is the decoder side's
    memory) and a decoder side network whose blocks cross-attend to it (modules/ladder_seq2seq.py).
    init="fisher" scores each stack's units in its own pass over the batches (two passes in all)."""
    model = ctx.model
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    root, at = (model, "") if hasattr(model, "decoder") else (inner, f"{prefix}.")
    if not (isinstance(root, nn.Module) and isinstance(getattr(root, "encoder", None), nn.Module)
            and isinstance(getattr(root, "decoder", None), nn.Module)):
        raise ValueError(f"ladder side networks on {model_type_of(model)} need the encoder and the decoder (e.g. "
                         f"T5ForConditionalGeneration); {type(model).__name__} has no decoder")
    fam, cfg = ctx.family, model.config
    enc, dec = root.encoder, root.decoder
    if layers is not None and len(dec.block) != len(enc.block):
        raise ValueError(f"layers=... names backbone layer ids of both stacks, but the encoder has {len(enc.block)} "
                         f"and the decoder {len(dec.block)} blocks; leave layers=None (every layer)")
    enc_fisher = dec_fisher = None
    cross_scores: list = []
    if init == "fisher":
        batches = list(batches)      # read twice
        enc_fisher = lambda mods, ids, canonical: unit_fisher_scores(model, mods, ids, canonical, batches)

        def dec_fisher(mods, ids, canonical):
            *scores, cross = unit_fisher_scores(model, mods, ids, canonical, batches, with_cross=True)
            cross_scores.extend(cross)
            return scores
    enc_side, _, enc_idx = _build_side(fam, cfg, enc, r, k, layers, init, dropout, side_dtype, enc_fisher,
                                       upsample=False)
    dec_side, dec_lay, dec_idx = _build_side(fam, cfg, dec, r, k, layers, init, dropout, side_dtype, dec_fisher,
                                             block_cls=SideDecoderBlock)
    if init in ("prune", "fisher"):   # cross-attention: q / o on the decoder side's dims, k / v on the encoder's
        h, hd, dev = cfg.num_attention_heads, head_dim(cfg), dec_idx.device
        with torch.no_grad():
            for n_blk, (blkmod, i) in enumerate(zip(dec_side.blocks, dec_side.layers)):
                w = {n: tuple(t.float() if t is not None else None for t in v)
                     for n, v in fam.side_block(dec_lay.layers[i - 1], cfg).items()}
                # each attention column's Fisher score, or its L1 (q, k, v rows, o columns), summed over the
                # heads: the same hd // r dims of every head, as select_units keeps them for self-attention
                imp = (cross_scores[n_blk] if cross_scores else
                       sum(w[n][0].abs().sum(1) for n in ("xq", "xk", "xv")) + w["xo"][0].abs().sum(0))
                within = torch.topk(imp.view(h, hd).sum(0), hd // r).indices.sort().values
                hd_idx = (torch.arange(h, device=dev)[:, None] * hd + within[None, :]).reshape(-1)
                blkmod.load_pruned_cross(w, dec_idx, enc_idx, hd_idx)
    if init == "fisher":   # as _side_network: a load re-creates the shapes, the weights come from the file
        ctx.recorded_options.update(init="prune", batches=None)
    ctx.replace(f"{at}encoder", LadderEncoder(enc, enc_side))
    ctx.replace(f"{at}decoder", LadderDecoder(dec, dec_side, d=cfg.hidden_size, memory_width=enc_side.d_s))
    ctx.train([*enc_side.parameters(), *dec_side.parameters()])


@register_method("lst", "LST (Sung et al. 2022): a gated ladder side network of width d/r beside a frozen, "
                        "no-autograd backbone")
def lst(ctx: PatchContext, *, r: int = 8, layers: Sequence[int] | None = None, init: str = "prune",
        dropout: float = 0.0, side_dtype: str | torch.dtype | None = None,
        batches: Iterable[Mapping] | None = None) -> None:
    """Side layer i: s <- mu_i s + (1 - mu_i) C_i, then a side transformer block. ``layers``: backbone
    layer ids (1..L) that get a side layer (default all); ``init="prune"`` cuts the side blocks from
    the backbone's (L1 magnitude), ``init="fisher"`` likewise but ranks the units by Fisher
    information (squared mask gradients, ladder_fisher.py) on ``batches`` (an iterable of model-input
    dicts with labels, needed by and only by "fisher"; the patch records init="prune" without the
    batches, so a load needs none), "random" leaves them at default init; ``side_dtype`` defaults to
    the backbone's dtype. On T5: an encoder and a decoder side network (the decoder side cross-attends
    to the encoder side), T5-style relative position bias (the backbone's table copied by "prune" /
    "fisher", zeros for "random"); ``layers`` then applies to both stacks (same depth needed)."""
    _side_network(ctx, r, None, layers, init, dropout, side_dtype, batches)


@register_method("klst", "k-LST: side state cross-attends per token to the k stacked ladder features around "
                         "each layer (fused Triton kernel)")
def klst(ctx: PatchContext, *, k: int = 3, r: int = 8, layers: Sequence[int] | None = None, init: str = "prune",
         dropout: float = 0.0, side_dtype: str | torch.dtype | None = None,
         batches: Iterable[Mapping] | None = None) -> None:
    """Side layer i: s <- s + CrossAttn(s; C_(i-k//2) .. C_(i+k//2), clipped to 0..L), then a side block.
    k must be odd. Other options (init="fisher" with batches) as "lst"."""
    _side_network(ctx, r, k, layers, init, dropout, side_dtype, batches)
