"""FishMask (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks"): train only the
top-p fraction of the model's own weights, ranked by the empirical Fisher information.

``fisher_scores(model, batches)`` measures, for every floating parameter outside the task head
(embeddings included, as the paper ranks all of the model's parameters), the mean over the
batches of the squared gradient of the batch's loss, (∂L_b/∂θ)². This is the per-batch empirical
Fisher: one backward pass per batch, where the paper's per-example Fisher takes one per example
(pass batches of one example to get it exactly); it ranks by the squared mean gradient of each
batch instead of the mean of squared per-example gradients, and is far cheaper.

``patch(model, "fishmask", p=0.005, batches=...)`` keeps the top ``p`` fraction of those entries
(one global threshold over all ranked tensors; ties go to the earlier tensor, in
``named_parameters`` order, then the lower flat index). The mask is kept as sorted int64 flat
indices per tensor (8 bytes per selected entry: at p = 0.005 far below a bitmap's numel/8 bytes
per touched tensor). The tensors holding selected entries get requires_grad=True and a gradient
hook that zeroes their gradient outside the mask, so any optimiser without weight decay moves only
the selected entries; the full gradient of each touched tensor still exists during backward (the
hook's zeroed copy replaces it). ``MaskedAdamW(fishmask_masks(model), ...)`` (optim/masked_adamw.py)
is the optimiser to use: state for the selected entries only, and weight decay applied to them only
(a plain AdamW with weight_decay > 0 would decay every entry of a touched tensor).

Like last_n and bitfit, FishMask trains the model's own weights in place: ``unpatch`` and
``merge`` remove the hooks and restore the requires_grad flags, and the trained values stay
(there is nothing to fold in). The task head trains whole (``train_head``), outside the ranking.
The recorded options hold the mask (``mask``: name -> index list), not the batches or scores, so
``save_adapter`` / ``load_adapter`` and ``save_pretrained`` / ``from_pretrained`` re-patch with
the same mask. The adapter file is sparse (fishmask_format.py): per masked tensor the mask (indices
or a bitmap), the values at it and a digest of the base entries outside it, which ``patch`` records
here; loading scatters the values into the base model's tensors, bit-identical. There is no PEFT
equivalent (no PEFT files are written).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from .architectures import HEAD_NAMES
from .core import PatchContext, patch_state
from .fishmask_format import forget_base, record_base
from .model_modes import grads_only_for
from .registry import register_method
from .unwrap import unwrap_model


def ranked_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters FishMask ranks: every floating parameter outside the task head modules."""
    return [(n, p) for n, p in model.named_parameters()
            if p.is_floating_point() and n.split(".")[0] not in HEAD_NAMES]


def _loss_of(out: Any) -> torch.Tensor | None:
    return out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)


def fisher_scores(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Name -> mean over ``batches`` of (∂L/∂θ)² (fp32, the parameter's shape) for every parameter
    ``ranked_parameters`` names (see the module docstring for which and why per batch).

    ``batches``: model-input dicts with labels (``model(**batch).loss`` must be a scalar). The
    model runs in eval mode (dropout off: the ranking does not depend on a dropout draw).
    Gradients come from ``torch.autograd.grad``: ``.grad`` of every parameter is left alone, and
    the requires_grad flags and train/eval modes are restored. Memory: one fp32 tensor per ranked
    parameter (the model's size in fp32) beside a training step's."""
    model = unwrap_model(model)
    named = ranked_parameters(model)
    if not named:
        raise ValueError("fisher_scores: the model has no floating parameter outside its task head to rank")
    params = [p for _, p in named]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    count = 0
    with grads_only_for(model, params):
        for i, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise TypeError(f"fisher_scores: batch {i} is a {type(batch).__name__}; each batch must be a dict of "
                                "model inputs with labels, as model(**batch) takes it")
            loss = _loss_of(model(**batch))
            if loss is None or not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"fisher_scores: model(**batch) gave no scalar loss for batch {i}; the batches "
                                 f"need labels (keys: {sorted(batch)})")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fisher_scores: the loss of batch {i} is {loss.item()}, not finite")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().float().square())
            count += 1
    if count == 0:
        raise ValueError("fisher_scores: batches is empty; pass a few training batches (e.g. 8) with labels")
    return {n: a.div_(count) for (n, _), a in zip(named, acc)}


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"fishmask: p must be a fraction in (0, 1] (e.g. 0.005 trains 0.5% of the weights), got {p!r}")
    return float(p)


def select_top(scores: Mapping[str, torch.Tensor], names: list[str], p: float) -> dict[str, torch.Tensor]:
    """name -> sorted int64 flat indices of the global top-p entries of ``scores`` over ``names``
    (k = max(1, round(p · total)) entries; ties broken by position: earlier name, lower index)."""
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])
    k = min(flat.numel(), max(1, round(p * flat.numel())))
    kth = torch.kthvalue(flat, flat.numel() - k + 1).values           # the k-th largest score
    above = (flat > kth).nonzero().squeeze(1)
    ties = (flat == kth).nonzero().squeeze(1)[:k - above.numel()]     # nonzero is in index order
    chosen = torch.cat([above, ties]).sort().values
    out, start = {}, 0
    for n in names:
        numel = scores[n].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + numel], device=device)).tolist()
        out[n] = chosen[lo:hi] - start
        start += numel
    return out


def _checked_scores(scores, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise TypeError("fishmask: scores must be a non-empty dict name -> tensor (e.g. spu_kernels.fisher_scores)")
    for n, s in scores.items():
        if n not in shapes:
            raise ValueError(f"fishmask: scores names {n!r}, which is not a rankable parameter of this model (every "
                             f"floating parameter outside the task head, e.g. {next(iter(shapes))!r})")
        if not isinstance(s, torch.Tensor) or s.shape != shapes[n]:
            raise ValueError(f"fishmask: scores[{n!r}] must be a tensor of the parameter's shape {tuple(shapes[n])}, "
                             f"got {tuple(getattr(s, 'shape', ())) or type(s).__name__}")
        if not torch.isfinite(s).all():
            raise ValueError(f"fishmask: scores[{n!r}] holds NaN or infinite values")
    return dict(scores)


def _checked_mask(mask, numels: dict[str, int]) -> dict[str, torch.Tensor]:
    if not isinstance(mask, Mapping):
        raise TypeError("fishmask: mask must be a dict name -> flat indices (a list or an int64 tensor)")
    out = {}
    for n, idx in mask.items():
        if n not in numels:
            raise ValueError(f"fishmask: mask names {n!r}, which is not a rankable parameter of this model")
        t = torch.as_tensor(idx).reshape(-1)
        if t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool):
            raise TypeError(f"fishmask: mask[{n!r}] must hold integer flat indices, got {t.dtype}")
        t = t.to(torch.int64).sort().values
        if t.numel() and (int(t[0]) < 0 or int(t[-1]) >= numels[n]):
            raise ValueError(f"fishmask: mask[{n!r}] holds an index outside [0, {numels[n]})")
        if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
            raise ValueError(f"fishmask: mask[{n!r}] holds repeated indices")
        out[n] = t
    return out


def _zero_outside(idx: torch.Tensor, live: list[bool]):
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        if not live[0]:
            return None
        kept = torch.zeros_like(grad, memory_format=torch.contiguous_format)
        i = idx if idx.device == grad.device else idx.to(grad.device)
        kept.view(-1).index_copy_(0, i, grad.reshape(-1).index_select(0, i))
        return kept
    return hook


@register_method("fishmask", "FishMask (Sung et al. 2021): train the top-p fraction of the weights by Fisher "
                             "information")
def fishmask(ctx: PatchContext, *, p: float = 0.005, batches: Iterable | None = None,
             scores: Mapping[str, torch.Tensor] | None = None, mask: Mapping[str, Any] | None = None) -> None:
    """Give exactly one of ``batches`` (model-input dicts with labels: the Fisher ranking is
    measured on them, ``fisher_scores``), ``scores`` (name -> tensor: a ranking of your own, over
    the parameters it names only) or ``mask`` (name -> flat indices: the selection itself; ``p``
    is then unused). ``p``: the fraction of the ranked entries that train."""
    p = _check_p(p)
    given = [k for k, v in (("batches", batches), ("scores", scores), ("mask", mask)) if v is not None]
    if len(given) != 1:
        raise ValueError("fishmask: pass exactly one of batches= (a few training batches with labels, to rank by "
                         "Fisher information), scores= (name -> tensor) or mask= (name -> flat indices); got "
                         + (", ".join(given) if given else "none"))
    named = dict(ranked_parameters(ctx.model))
    if mask is not None:
        chosen = _checked_mask(mask, {n: t.numel() for n, t in named.items()})
    else:
        if batches is not None:
            if isinstance(batches, Mapping):
                raise TypeError("fishmask: batches must be an iterable of batches (dicts), not one dict; wrap it: "
                                "batches=[batch]")
            scores = fisher_scores(ctx.model, batches)
        scores = _checked_scores(scores, {n: t.shape for n, t in named.items()})
        chosen = select_top(scores, [n for n in named if n in scores], p)
    chosen = {n: idx for n, idx in chosen.items() if idx.numel()}
    if not chosen:
        raise ValueError("fishmask: the mask selects no entry; pass a non-empty mask")
    ctx.recorded_options.update(batches=None, scores=None, mask={n: idx.tolist() for n, idx in chosen.items()})
    live = [True]
    handles = []

    def remove_hooks() -> None:
        live[0] = False
        for h in handles:
            h.remove()
        handles.clear()

    ctx.on_undo.append(remove_hooks)
    ctx.on_undo.append(lambda: forget_base(ctx.model))
    record_base(ctx.model, {n: (named[n], idx) for n, idx in chosen.items()})   # for the sparse adapter file
    for n, idx in chosen.items():
        param = named[n]
        ctx.train([param])
        handles.append(param.register_hook(_zero_outside(idx.to(param.device), live)))


def fishmask_masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, int64 flat indices) for everything a fishmask patch trains: the masked tensors
    with their masks, and the others that train whole (the task head, ``trainable_modules``, a soft
    prompt) with all their indices: ``MaskedAdamW(fishmask_masks(model), lr=...)``."""
    inner = unwrap_model(model)
    state = patch_state(inner, "fishmask_masks")
    if state.method != "fishmask":
        raise ValueError(f"fishmask_masks: the model is patched with {state.method!r}, not 'fishmask'")
    mask = state.options["mask"]
    out = []
    for n, prm in inner.named_parameters():
        if prm.requires_grad:
            idx = (torch.as_tensor(mask[n], dtype=torch.int64, device=prm.device) if n in mask
                   else torch.arange(prm.numel(), device=prm.device))
            out.append((prm, idx))
    return out
