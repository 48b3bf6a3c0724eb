"""patch / unpatch / merge: replace modules of a model in place, and undo it exactly.

The core knows nothing about kernels: methods (registered in registry.py) decide which modules
to replace with what, and which parameters train. The core checks options, freezes everything
else (keeping the task head trainable unless told otherwise), rolls back if a method fails half
way, records what it needs to restore the original modules and requires_grad flags bit for bit,
and logs a summary. What it needs of a replacing module is the contract of
``modules.adapter.AdapterModule`` (restore, merge, merge_error). Shared options other than its
own (``soft_prompt``) come from the method file that registered them (registry.py).
Several named adapters, ``disable_adapter`` and ``merge_adapter`` live in adapters.py: the active
adapter is this patch state, so everything here acts on it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch.nn as nn

from ..modules.adapter import AdapterModule
from ..modules.lowrank_base import WrappedLinear, is_linear_like, linear_dims
from .architectures import (
    HEAD_NAMES,
    Family,
    family_of,
    model_type_of,
    name_matches,
    role_targets,
    supported_model_types,
)
from .hf_hooks import install_save_pretrained, refuse_peft, remove_save_pretrained
from .registry import SHARED_OPTION_NAMES, get_method, shared_option_handler
from .unwrap import unwrap_model

log = logging.getLogger("spu_kernels")
_STATE_ATTR = "_spu_patch"
#: the inactive named adapters (patching/adapters.py); unpatch and merge drop them
ADAPTERS_ATTR = "_spu_adapters"
#: what may not run while an adapter is merged in (merge_adapter): the weights would be stale
_REFUSED_WHILE_MERGED = ("save_adapter", "adapter_state_dict", "load_adapter", "save_pretrained", "to_peft")


@dataclass
class Replacement:
    name: str
    parent: nn.Module
    attr: str
    original: nn.Module
    new: nn.Module


@dataclass
class Target:
    """A module a method may replace; ``thirds`` names the q/k/v thirds of a fused layer (0, 1, 2)."""
    name: str
    module: nn.Module
    thirds: tuple[int, ...] | None = None

    def out_slices(self) -> list[tuple[int, int]] | None:
        if self.thirds is None:
            return None
        d = linear_dims(self.module)[1] // 3
        return [(i * d, (i + 1) * d) for i in self.thirds]


@dataclass
class PatchSummary:
    method: str
    model: str
    replaced: list[str]
    trainable_params: int
    total_params: int
    options: dict = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(1, self.total_params)

    def __str__(self) -> str:
        mods = ", ".join(self.replaced[:4]) + (f", ... ({len(self.replaced)} in all)" if len(self.replaced) > 4 else "")
        return (f"spu_kernels.patch({self.method!r}) on {self.model}: trainable {self.trainable_params:,} / "
                f"{self.total_params:,} params ({self.trainable_percent:.3f}%); "
                f"replaced {len(self.replaced)} modules" + (f": {mods}" if self.replaced else ""))


@dataclass
class PatchState:
    method: str
    options: dict
    replacements: list[Replacement]
    requires_grad_before: list[tuple[nn.Parameter, bool]]
    summary: PatchSummary
    #: PatchContext.on_undo: run by unpatch and merge
    on_undo: list[Callable[[], None]] = field(default_factory=list)


class PatchContext:
    """What a method sees: the model, its family, target lookup, replace() and train()."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family: Family | None = family_of(model)
        self.replacements: list[Replacement] = []
        self.trainable: list[nn.Parameter] = []
        #: run once the whole patch has succeeded (e.g. dropping what only a rollback needs)
        self.on_success: list[Callable[[], None]] = []
        #: run by unpatch, merge and a rollback: undo what is no module replacement (e.g. gradient hooks)
        self.on_undo: list[Callable[[], None]] = []
        #: options recorded in place of the given ones (what save / load re-run; e.g. not the batches an
        #: initialisation consumed)
        self.recorded_options: dict = {}

    def find_targets(self, target_modules: str | Sequence[str] | None,
                     roles: tuple[str, ...] = ("query", "value"), embeddings: bool = False) -> list[Target]:
        """The linear layers to adapt: ``target_modules`` (names, matched at the end of the
        qualified name; or one regex matched against the whole name), else the family's modules
        for ``roles``; also ``nn.Embedding`` layers where the method takes them (``embeddings``).
        Task-head modules never match. Raises when nothing matches."""
        if target_modules is None:
            if self.family is None:
                raise ValueError(f"no default target modules for model_type {model_type_of(self.model)!r} "
                                 f"(defaults exist for {', '.join(supported_model_types())}); pass "
                                 f"target_modules=[...], e.g. {self._linear_suffixes()[:6]}")
            specs = role_targets(self.family, roles)
            match = lambda name, pat: name_matches(name, pat)
        elif isinstance(target_modules, str):
            specs = [(target_modules, None)]
            match = lambda name, pat: re.fullmatch(pat, name) is not None
        else:
            if not all(isinstance(t, str) and t for t in target_modules):
                raise TypeError(f"target_modules must be a list of module names or one regex string, "
                                f"got {target_modules!r}")
            specs = [(re.escape(t), None) for t in target_modules]
            match = lambda name, pat: name_matches(name, pat)
        found = []
        for name, mod in self.model.named_modules():
            if not name or name.split(".")[0] in HEAD_NAMES:
                continue
            for pat, thirds in specs:
                if match(name, pat):
                    if not (is_linear_like(mod) or (embeddings and isinstance(mod, nn.Embedding))):
                        kinds = "nn.Linear, transformers Conv1D" + (" and nn.Embedding" if embeddings else "")
                        hint = ("; of the methods only lora adapts nn.Embedding" if isinstance(mod, nn.Embedding)
                                else " (name the linear layers inside it)")
                        raise TypeError(f"target module {name!r} is a {type(mod).__name__}; only {kinds} layers "
                                        f"can be adapted{hint}")
                    found.append(Target(name, mod, thirds))
                    break
        if not found:
            wanted = target_modules if target_modules is not None else [p for p, _ in specs]
            example = next(iter(self._linear_names()), "")
            hint = (f" (a string is a regex matched against the full module name, e.g. {example!r}; "
                    f"to match name endings pass a list: target_modules=[{target_modules!r}])"
                    if isinstance(target_modules, str) else "")
            raise ValueError(f"no module of this {model_type_of(self.model)} model matched target_modules={wanted!r}"
                             f"{hint}; its linear layers end with: {self._linear_suffixes()[:12]}")
        return found

    def _linear_names(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if is_linear_like(m) and n.split(".")[0] not in HEAD_NAMES]

    def _linear_suffixes(self) -> list[str]:
        seen: list[str] = []
        for name, mod in self.model.named_modules():
            if is_linear_like(mod):
                tail = ".".join(p for p in name.split(".")[-2:] if not p.isdigit())
                if tail not in seen:
                    seen.append(tail)
        return seen

    def replace(self, name: str, new: nn.Module) -> None:
        """Put ``new`` in the place of the module ``name``. ``new`` should be an ``AdapterModule``
        (its ``restore`` / ``merge`` serve unpatch / merge); another module is put back as the
        original on unpatch, and refused by merge."""
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        original = getattr(parent, attr)
        new.train(original.training)   # a model in eval() stays in eval (dropout off)
        setattr(parent, attr, new)
        self.replacements.append(Replacement(name, parent, attr, original, new))

    def train(self, params: Iterable[nn.Parameter]) -> None:
        self.trainable.extend(params)


def _check_options(spec, options: dict) -> None:
    allowed = spec.option_names()
    for key in options:
        if key not in allowed:
            raise TypeError(f"patch(..., {spec.name!r}): unknown option {key!r}; {spec.name} takes "
                            f"{', '.join(allowed + list(SHARED_OPTION_NAMES))}")


def _undo(model: nn.Module, replacements: list[Replacement], flags: list[tuple[nn.Parameter, bool]],
          on_undo: Sequence[Callable[[], None]] = ()) -> None:
    for done in reversed(on_undo):
        done()
    for rep in reversed(replacements):
        if isinstance(rep.new, AdapterModule):
            rep.new.unmerge()
            rep.new.restore()
        setattr(rep.parent, rep.attr, rep.original)
    for p, flag in flags:
        p.requires_grad_(flag)


def _trainable_modules(model: nn.Module, replacements: list[Replacement], names: Sequence[str],
                       method: str) -> list[nn.Module]:
    """The modules ``trainable_modules`` names, checked before any flag changes: each name must
    match, and none may hold an adapted layer's frozen base weight (the op refuses a base weight
    that requires grad)."""
    frozen = {id(rep.new.base_layer.weight): rep.name for rep in replacements
              if isinstance(rep.new, WrappedLinear) or isinstance(getattr(rep.new, "base_layer", None), nn.Embedding)}
    out = []
    for t in names:
        mods = [(n, m) for n, m in model.named_modules() if n and name_matches(n, re.escape(t))]
        if not mods:
            raise ValueError(f"trainable_modules: no module name ends with {t!r}")
        for n, m in mods:
            hit = next((frozen[id(p)] for p in m.parameters() if id(p) in frozen), None)
            if hit is not None:
                raise ValueError(f"trainable_modules: {t!r} matches {n!r}, which holds the base weight of the "
                                 f"{method}-adapted layer {hit!r}; that weight must stay frozen (the adapter "
                                 f"trains instead). Name other modules, or leave {hit!r} out of target_modules "
                                 "to train it fully")
            out.append(m)
    return out


def _prepare_shared(method: str, values: dict) -> list:
    """(handler, prepared value) for each shared option not the core's own that is set (not None),
    checked before the model changes."""
    out = []
    for name, value in values.items():
        if value is None:
            continue
        handler = shared_option_handler(name)
        if method in handler.excludes:
            raise ValueError(handler.excludes[method])
        out.append((handler, handler.prepare(value)))
    return out


def patch(model: nn.Module, method: str, *, train_head: bool = True,
          trainable_modules: Sequence[str] | None = None, soft_prompt: int | dict | None = None,
          **options: Any) -> nn.Module:
    """Apply ``method`` to ``model`` in place and return it.

    Everything but the method's adapters is frozen, except the task head (``classifier``,
    ``score``, ...) unless ``train_head=False``, and the modules named in ``trainable_modules``
    (matched at the end of their qualified names). ``soft_prompt=n`` (or a dict of the "prompt"
    method's options) adds a trainable soft prompt beside the method's adapters (prompt_methods.py
    registers it). ``spu_kernels.summary(model)`` (also ``model.spu_summary``) tells what was
    done; ``unpatch`` undoes it exactly, ``merge`` folds the adapters in. Method options: see
    ``spu_kernels.describe_method(name)``. The options every method takes (these keyword-only
    parameters) are ``registry.SHARED_OPTIONS``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    refuse_peft(model)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError(f"this model is already patched with {getattr(model, _STATE_ATTR).method!r}; "
                           "call spu_kernels.unpatch(model) (or merge) before patching again")
    state = _build_state(model, method, train_head, trainable_modules, soft_prompt, options)
    setattr(model, _STATE_ATTR, state)
    model.spu_summary = state.summary
    install_save_pretrained(model)
    log.info("%s", state.summary)
    return model


def _build_state(model: nn.Module, method: str, train_head: bool, trainable_modules: Sequence[str] | None,
                 soft_prompt: int | dict | None, options: dict) -> PatchState:
    """What ``patch`` does between its checks and recording the state (also adding a named
    adapter: patching/adapters.py): replace, freeze, roll back on error; returns the state."""
    spec = get_method(method)
    _check_options(spec, options)
    plugged = _prepare_shared(method, {"soft_prompt": soft_prompt})
    flags = [(p, p.requires_grad) for p in model.parameters()]
    ctx = PatchContext(model)
    try:
        spec.fn(ctx, **options)
        for handler, prepared in plugged:
            handler.apply(ctx, prepared)
        extra = _trainable_modules(model, ctx.replacements, trainable_modules or (), method)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in ctx.trainable:
            p.requires_grad_(True)
        if train_head:
            for name, child in model.named_children():
                if name in HEAD_NAMES:
                    child.requires_grad_(True)
        for m in extra:
            m.requires_grad_(True)
    except BaseException:
        _undo(model, ctx.replacements, flags, ctx.on_undo)
        raise
    for done in ctx.on_success:
        done()
    all_params = list(model.parameters())
    summary = PatchSummary(
        method=method, model=type(model).__name__, replaced=[r.name for r in ctx.replacements],
        trainable_params=sum(p.numel() for p in all_params if p.requires_grad),
        total_params=sum(p.numel() for p in all_params),
        options={**spec.defaults(), **options, **ctx.recorded_options, "train_head": train_head,
                 "trainable_modules": list(trainable_modules or []), "soft_prompt": soft_prompt})
    return PatchState(method, summary.options, ctx.replacements, flags, summary, ctx.on_undo)


def _state(model: nn.Module, what: str) -> PatchState:
    state = getattr(unwrap_model(model), _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"spu_kernels.{what}: this model is not patched (call spu_kernels.patch first)")
    if what in _REFUSED_WHILE_MERGED and any(getattr(r.new, "merged", False) for r in state.replacements):
        raise RuntimeError(f"spu_kernels.{what}: the adapter is merged into the base weights "
                           "(spu_kernels.merge_adapter); call spu_kernels.unmerge_adapter(model) first")
    return state


def _clear(model: nn.Module) -> None:
    """Drop the patch's records (unpatch, merge): its state, summary, save_pretrained hook, and the
    inactive named adapters (they left the base layers as they were; merge drops them, as PEFT does)."""
    model = unwrap_model(model)
    delattr(model, _STATE_ATTR)
    if "spu_summary" in model.__dict__:
        del model.__dict__["spu_summary"]
    remove_save_pretrained(model)
    model.__dict__.pop(ADAPTERS_ATTR, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules, weights and requires_grad flags: outputs are bit-identical
    to the model's before ``patch``. Every named adapter goes (adapters.py), merged or not."""
    state = _state(model, "unpatch")
    _undo(model, state.replacements, state.requires_grad_before, state.on_undo)
    _clear(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer's weight (for inference) and drop the patch: the
    model holds plain modules again, with the original requires_grad flags (PEFT's
    merge_and_unload: the active adapter is merged, inactive named adapters are dropped)."""
    state = _state(model, "merge")
    # every module must be mergeable before any is merged: merging writes into base weights in place
    for rep in state.replacements:
        if not isinstance(rep.new, AdapterModule):
            raise RuntimeError(f"{type(rep.new).__name__} at {rep.name} cannot be merged")
        if rep.new.merge_error:
            raise RuntimeError(rep.new.merge_error)
        if not rep.new.enabled:
            raise RuntimeError("spu_kernels.merge inside spu_kernels.disable_adapter(model): leave the with block "
                               "first")
    for rep in state.replacements:
        rep.new.unmerge()    # merge_adapter's fold is undone exactly, then done for good
        setattr(rep.parent, rep.attr, rep.new.merge())
    for done in reversed(state.on_undo):
        done()
    for p, flag in state.requires_grad_before:
        p.requires_grad_(flag)
    _clear(model)
    return model


def summary(model: nn.Module) -> PatchSummary:
    """What ``patch`` did to this model."""
    return _state(model, "summary").summary


def is_patched(model: nn.Module) -> bool:
    return getattr(unwrap_model(model), _STATE_ATTR, None) is not None


def patch_state(model: nn.Module, what: str = "patch_state") -> PatchState:
    return _state(model, what)

