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
        why = (" (encoder-decoder: the side network would need its own decoder with cross-attention; not built)"
               if fam is not None and fam.encoder_decoder else "")
        raise ValueError(f"ladder side networks support the {_supported()} families; "
                         f"model_type {model_type_of(model)!r} is not one of them{why}")
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
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(f"patch(..., 'lst'/'klst') needs a task model with a backbone child (e.g. "
                         f"{type(model).__name__.replace('Model', '')}ForSequenceClassification / ...ForCausalLM); "
                         f"{type(model).__name__} has no '{prefix}' child")
    cfg = model.config
    lay = fam.side_layout(backbone, cfg)
    mods, fnorm, rope = lay.layers, lay.final_norm, fam.positions == "rotary"
    fnorm_kind = lay.block["norm"] if fnorm is not None else None
    blk = dict(lay.block, rope=True) if rope else lay.block
    d, h, L = cfg.hidden_size, cfg.num_attention_heads, len(mods)
    hd = head_dim(cfg)
    p0 = next(backbone.parameters())
    side = LadderSideNetwork(d, L, h, r=r, k=k, layers=layers, causal=lay.causal, final_norm=fnorm_kind,
                             dropout=dropout, block=dict(blk, head_dim=hd, d_ff=lay.d_ff))
    side.to(device=p0.device)
    if init in ("prune", "fisher"):
        canonical = lambda block: fam.side_block(block, cfg)
        scores = (unit_fisher_scores(model, mods, side.layers, canonical, batches) if init == "fisher" else None)
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
            side.init_selection(d_idx)
    side.to(dtype=float_dtype(side_dtype, "side_dtype") or p0.dtype)
    if init == "fisher":   # a load re-creates the shapes (any init does); the weights come from the file
        ctx.recorded_options.update(init="prune", batches=None)
    wrapper = LadderBackbone(backbone, side, decoder=lay.causal)
    ctx.replace(prefix, wrapper)
    ctx.train(side.parameters())


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
    the backbone's dtype."""
    _side_network(ctx, r, None, layers, init, dropout, side_dtype, batches)


@register_method("klst", "k-LST: side state cross-attends per token to the k stacked ladder features around "
                         "each layer (fused Triton kernel)")
def klst(ctx: PatchContext, *, k: int = 3, r: int = 8, layers: Sequence[int] | None = None, init: str = "prune",
         dropout: float = 0.0, side_dtype: str | torch.dtype | None = None,
         batches: Iterable[Mapping] | None = None) -> None:
    """Side layer i: s <- s + CrossAttn(s; C_(i-k//2) .. C_(i+k//2), clipped to 0..L), then a side block.
    k must be odd. Other options (init="fisher" with batches) as "lst"."""
    _side_network(ctx, r, k, layers, init, dropout, side_dtype, batches)
