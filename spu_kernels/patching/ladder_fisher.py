"""Fisher-information importance of a backbone's structural units, for the ladder side network's
``init="fisher"`` (LST, Sung et al. 2022, after Molchanov et al. 2019 / Liu et al. 2021).

A unit's importance is the squared gradient of the loss w.r.t. a mask m (= 1) on that unit,
summed over the given batches: F_u = sum_batches (dL/dm_u)^2. The units are those the L1 pruning
ranks (modules/ladder.py ``l1_scores``), so ``select_units`` slices the same structure:

* hidden dims (d,): one mask on the residual stream, multiplying every hidden state h_0 .. h_L
  (the input of the first layer and each layer's output; the ladders read them all);
* attention columns (h·d_h,) of each side layer's block: a mask on the unit's q, k and v outputs
  at once (what cutting the column removes). At m = 1, dL/dm_u = sum over the unit's rows of
  W ⊙ dL/dW (+ b ⊙ dL/db) for q, k, v, computed from the weight gradients in the family's
  canonical block form (``Family.side_block``), which makes this architecture-agnostic;
* FFN units (d_ff,): a mask on the activation feeding the down projection, i.e. the column of
  ``fout``: dL/dm_j = sum_i W_fout[i, j] dL/dW_fout[i, j];
* cross-attention columns (h·d_h,) of an encoder-decoder's decoder block (``with_cross``): as the
  attention columns, on the cross-attention's q, k and v outputs (canonical keys xq, xk, xv).

The model runs in eval mode (no dropout: deterministic given the batches); gradients are taken
with ``torch.autograd.grad`` (nothing is accumulated into ``.grad``); requires_grad flags and
training modes are restored afterwards.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .model_modes import grads_only_for


@contextmanager
def _swapped(module: nn.Module, grads: dict[nn.Parameter, torch.Tensor | None]):
    """Each parameter of ``module`` temporarily holds its gradient (zeros where it has none), so the
    family's canonical block form of the module reads the gradients in the weights' layout."""
    saved = [(p, p.data) for p in module.parameters()]
    try:
        for p, data in saved:
            g = grads.get(p)
            p.data = g if g is not None else torch.zeros_like(data)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _unit_grads(block: nn.Module, canonical: Callable[[nn.Module], dict], grads: dict):
    """(dL/dm per attention column (h·d_h,), dL/dm per FFN unit (d_ff,), dL/dm per cross-attention
    column (h·d_h,) or None where the block has none) of one block, at m = 1."""
    detached = lambda c: {n: tuple(t.detach() if t is not None else None for t in v) for n, v in c.items()}
    w = detached(canonical(block))
    with _swapped(block, grads):     # detach: the canonical form may hand back the parameters themselves
        g = detached(canonical(block))
    prod = lambda n, i: (w[n][i].float() * g[n][i].float()) if w[n][i] is not None else None
    columns = lambda names: sum(prod(n, 0).sum(1) + (prod(n, 1) if w[n][1] is not None else 0) for n in names)
    return columns(("q", "k", "v")), prod("fout", 0).sum(0), (columns(("xq", "xk", "xv")) if "xq" in w else None)


def _to(batch, device):
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must yield dicts of model inputs (with labels), got a {type(batch).__name__}")
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def unit_fisher_scores(model: nn.Module, layers: Sequence[nn.Module], side_ids: Sequence[int],
                  canonical: Callable[[nn.Module], dict], batches: Iterable[Mapping], with_cross: bool = False):
    """(imp_d (d,), [imp_hd (h·d_h,)], [imp_ff (d_ff,)]) for the side layers ``side_ids`` (1-based
    ids into ``layers``, the backbone's layer modules), from ``model(**batch).loss`` on each batch
    (model inputs with labels). ``canonical(block)``: the block's weights in canonical form.
    ``with_cross``: a fourth item, [imp_xhd (h·d_h,)] of the blocks' cross-attention (T5's decoder)."""
    params = list(dict.fromkeys(p for i in side_ids for p in layers[i - 1].parameters()))
    p0 = next(model.parameters())
    d = canonical(layers[side_ids[0] - 1])["o"][0].shape[0]
    mask = torch.ones(d, device=p0.device, dtype=p0.dtype, requires_grad=True)

    def masked(t):
        return t * mask if isinstance(t, torch.Tensor) and t.shape[-1:] == mask.shape else t

    def pre(_, args, kwargs):
        if args:
            return (masked(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise NotImplementedError(f"init='fisher': {type(layers[0]).__name__} is called without its hidden "
                                      "states as the first argument or hidden_states=; use init='prune'")
        return args, {**kwargs, "hidden_states": masked(kwargs["hidden_states"])}

    def post(_, args, out):
        return (masked(out[0]), *out[1:]) if isinstance(out, tuple) else masked(out)

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    imp_d, imp_hd, imp_ff, imp_x, n = torch.zeros(d, device=p0.device), None, None, None, 0
    try:
        with grads_only_for(model, params):
            for batch in batches:
                loss = getattr(model(**_to(batch, p0.device)), "loss", None)
                if loss is None:
                    raise ValueError("init='fisher': the model returned no loss for a batch; the batches must "
                                     "carry labels (e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...})")
                got = torch.autograd.grad(loss, [mask, *params], allow_unused=True)
                imp_d += got[0].float() ** 2
                gmap = dict(zip(params, got[1:]))
                units = [_unit_grads(layers[i - 1], canonical, gmap) for i in side_ids]
                imp_hd = [hd ** 2 + (imp_hd[k] if imp_hd else 0) for k, (hd, _, _) in enumerate(units)]
                imp_ff = [ff ** 2 + (imp_ff[k] if imp_ff else 0) for k, (_, ff, _) in enumerate(units)]
                if with_cross:
                    if any(x is None for _, _, x in units):
                        raise ValueError("with_cross: a side layer's block has no cross-attention (xq, xk, xv)")
                    imp_x = [x ** 2 + (imp_x[k] if imp_x else 0) for k, (_, _, x) in enumerate(units)]
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("init='fisher': batches was empty; pass a few training batches (the harness uses 8)")
    return (imp_d, imp_hd, imp_ff, imp_x) if with_cross else (imp_d, imp_hd, imp_ff)
