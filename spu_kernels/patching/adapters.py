"""Adapter management as PEFT users know it: several named adapters on one model, switching,
``disable_adapter`` and ``merge_adapter`` / ``unmerge_adapter``.

The ACTIVE adapter is the ordinary patch state (core.py's ``PatchState`` on the model), so
``summary``, ``save_adapter``, ``merge`` and ``unpatch`` act on it unchanged. The first ``patch``
is the adapter "default". Inactive adapters are kept aside, in ``AdapterSet`` on the model: their
modules (with their tensors) and the requires_grad flags they had, not copies of the model. While
an adapter is inactive the model holds the original modules where it had its own, with the
original weights (``AdapterModule.detach_base``: SiVA puts W back and keeps W_res on the CPU), so
switching is exact, several adapters may wrap the same layer, and ``unpatch`` only needs to undo
the active one.

Only methods whose modules are all ``switchable`` take part (lora, siva, siva_kv, ia3, krona);
"lst" / "klst" (a side network reading the backbone), "prompt" / ``soft_prompt=`` (the backbone is
wrapped whole) and "last_n" / "bitfit" (they train the model's own weights: there is nothing to
put aside) are refused with a clear error. The task head and ``trainable_modules`` are the model's
own modules: every adapter that trains them trains the same ones (PEFT's ``modules_to_save`` keeps
one copy per adapter instead), and ``disable_adapter`` turns the adapters off, not them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.nn as nn

from ..modules.adapter import AdapterModule
from .core import _STATE_ATTR, ADAPTERS_ATTR, PatchState, _build_state, _state, _undo, patch, unpatch
from .unwrap import unwrap_model

DEFAULT_ADAPTER = "default"


@dataclass
class StoredAdapter:
    """An inactive adapter: its patch state and the requires_grad flag of every model parameter
    while it was active (restored when it is activated again)."""
    state: PatchState
    flags: list[tuple[nn.Parameter, bool]]


@dataclass
class AdapterSet:
    active: str
    names: list[str]
    inactive: dict[str, StoredAdapter] = field(default_factory=dict)


def _adapters(model: nn.Module, what: str) -> tuple[nn.Module, PatchState, AdapterSet]:
    inner = unwrap_model(model)
    state = _state(inner, what)
    aset = inner.__dict__.get(ADAPTERS_ATTR)
    if aset is None:
        aset = AdapterSet(DEFAULT_ADAPTER, [DEFAULT_ADAPTER])
        inner.__dict__[ADAPTERS_ATTR] = aset
    return inner, state, aset


def _modules(state: PatchState) -> list[AdapterModule]:
    return [rep.new for rep in state.replacements]


def _check_switchable(state: PatchState, what: str, name: str) -> None:
    if not state.replacements:
        raise ValueError(f"spu_kernels.{what}: adapter {name!r} ({state.method}) replaces no module: it trains the "
                         "model's own weights in place, so there is no adapter to put aside or turn off. Named "
                         "adapters work with lora, siva, siva_kv, ia3 and krona")
    for rep in state.replacements:
        mod = rep.new
        if not (isinstance(mod, AdapterModule) and mod.switchable):
            raise ValueError(f"spu_kernels.{what}: adapter {name!r} ({state.method}) has a {type(mod).__name__} at "
                             f"{rep.name!r}, which cannot be switched, disabled or merged-and-unmerged (named "
                             "adapters work with lora, siva, siva_kv, ia3 and krona; not lst, klst, prompt or "
                             "soft_prompt=)")
        if mod.detach_error:
            raise ValueError(f"spu_kernels.{what}: adapter {name!r} at {rep.name!r}: {mod.detach_error}")


def _check_idle(state: PatchState, what: str) -> None:
    """Refuse while merged or inside disable_adapter: the base weights are not the adapter's."""
    mods = _modules(state)
    if any(getattr(m, "merged", False) for m in mods):
        raise RuntimeError(f"spu_kernels.{what}: the active adapter is merged (spu_kernels.merge_adapter); call "
                           "spu_kernels.unmerge_adapter(model) first")
    if any(not getattr(m, "enabled", True) for m in mods):
        raise RuntimeError(f"spu_kernels.{what} inside spu_kernels.disable_adapter(model): leave the with block first")


def _flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def _set_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, f in flags:
        p.requires_grad_(f)


def _detach(state: PatchState) -> None:
    """Put the original modules (and weights) back; the adapter's modules stay usable."""
    for rep in reversed(state.replacements):
        rep.new.detach_base()
        setattr(rep.parent, rep.attr, rep.original)


def _attach(state: PatchState, model: nn.Module) -> None:
    """Put the adapter's modules back, following what was done to the model while they were
    aside: model.train() / eval() and moves to another device (model.to("cuda"))."""
    for rep in state.replacements:
        rep.new.train(rep.original.training)
        here = next(rep.original.parameters(), None)
        here = here if here is not None else next(model.parameters(), None)
        if here is not None and any(p.device != here.device for p in rep.new.parameters()):
            rep.new.to(here.device)
        setattr(rep.parent, rep.attr, rep.new)
        rep.new.attach_base()


def _make_active(inner: nn.Module, state: PatchState) -> None:
    inner.__dict__[_STATE_ATTR] = state
    inner.__dict__["spu_summary"] = state.summary


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
    return name


def add_adapter(model: nn.Module, adapter_name: str, method: str, *, train_head: bool = True,
                trainable_modules: list[str] | None = None, soft_prompt: int | dict | None = None,
                **options: Any) -> nn.Module:
    """Add adapter ``adapter_name`` (``method`` with ``options``, as ``patch`` takes them) beside
    the model's adapters; the active one stays active (as PEFT's ``add_adapter``): use
    ``set_adapter`` to switch. On an unpatched model this is ``patch`` with that name. On any
    error the model is left as it was."""
    _check_name(adapter_name)
    if options.get("keep_original") is False:   # SiVA without W could be neither put aside nor rolled back
        raise ValueError(f"spu_kernels.add_adapter: adapter {adapter_name!r} with keep_original=False could not be "
                         "put aside (the original weight W would be gone); use keep_original=True")
    inner = unwrap_model(model)
    if getattr(inner, _STATE_ATTR, None) is None:
        patch(inner, method, train_head=train_head, trainable_modules=trainable_modules, soft_prompt=soft_prompt,
              **options)
        try:
            _check_switchable(_state(inner, "add_adapter"), "add_adapter", adapter_name)
        except BaseException:
            unpatch(inner)
            raise
        inner.__dict__[ADAPTERS_ATTR] = AdapterSet(adapter_name, [adapter_name])
        return model
    inner, cur, aset = _adapters(inner, "add_adapter")
    if adapter_name in aset.names:
        raise ValueError(f"spu_kernels.add_adapter: the model already has an adapter named {adapter_name!r} "
                         f"(adapters: {aset.names}); pick another name or delete_adapter it first")
    _check_switchable(cur, "add_adapter", aset.active)
    _check_idle(cur, "add_adapter")
    cur_flags = _flags(inner)
    _detach(cur)
    del inner.__dict__[_STATE_ATTR]
    new = None
    try:
        new = _build_state(inner, method, train_head, trainable_modules, soft_prompt, options)
        _check_switchable(new, "add_adapter", adapter_name)
    except BaseException:
        if new is not None:
            _undo(inner, new.replacements, new.requires_grad_before, new.on_undo)
        _attach(cur, inner)
        _set_flags(cur_flags)
        inner.__dict__[_STATE_ATTR] = cur
        raise
    new.requires_grad_before = cur.requires_grad_before   # unpatch restores the flags from before the first patch
    stored = StoredAdapter(new, _flags(inner))
    _detach(new)
    _attach(cur, inner)
    _set_flags(cur_flags)
    inner.__dict__[_STATE_ATTR] = cur
    aset.inactive[adapter_name] = stored
    aset.names.append(adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active adapter: its modules go in, the others' come out (exact:
    switching a -> b -> a gives bit-identical outputs), and the requires_grad flags become the
    ones it had when it was last active (at first: what its patch set)."""
    _check_name(adapter_name)
    inner, cur, aset = _adapters(model, "set_adapter")
    if adapter_name not in aset.names:
        raise ValueError(f"spu_kernels.set_adapter: no adapter named {adapter_name!r}; the model has {aset.names}")
    if adapter_name == aset.active:
        return model
    _check_switchable(cur, "set_adapter", aset.active)
    _check_idle(cur, "set_adapter")
    target = aset.inactive.pop(adapter_name)
    aside = StoredAdapter(cur, _flags(inner))
    _detach(cur)
    _attach(target.state, inner)
    _set_flags(target.flags)
    _make_active(inner, target.state)
    aset.inactive[aset.active] = aside
    aset.active = adapter_name
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Drop the inactive adapter ``adapter_name`` (its modules and tensors). The active adapter
    cannot be deleted (as in PEFT): ``set_adapter`` to another first, or ``unpatch`` to remove all."""
    _check_name(adapter_name)
    inner, _, aset = _adapters(model, "delete_adapter")
    if adapter_name not in aset.names:
        raise ValueError(f"spu_kernels.delete_adapter: no adapter named {adapter_name!r}; the model has {aset.names}")
    if adapter_name == aset.active:
        others = [n for n in aset.names if n != adapter_name]
        hint = f"spu_kernels.set_adapter(model, {others[0]!r}) first" if others else "spu_kernels.unpatch(model)"
        raise ValueError(f"spu_kernels.delete_adapter: {adapter_name!r} is the active adapter and cannot be deleted; "
                         f"switch to another with {hint} (unpatch removes every adapter)")
    del aset.inactive[adapter_name]
    aset.names.remove(adapter_name)
    return model


def active_adapter(model: nn.Module) -> str:
    """The name of the active adapter ("default" for a plain ``patch``)."""
    return _adapters(model, "active_adapter")[2].active


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(_adapters(model, "list_adapters")[2].names)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with spu_kernels.disable_adapter(model):`` the model computes the original model's
    outputs, bit for bit (SiVA: with the original W, so it needs ``keep_original=True``); the
    adapter is back on exit, also on an exception. The task head and ``trainable_modules`` train
    in place and stay as they are."""
    inner, state, aset = _adapters(model, "disable_adapter")
    _check_switchable(state, "disable_adapter", aset.active)
    _check_idle(state, "disable_adapter")
    mods = _modules(state)
    for m in mods:
        m.detach_base()
        m.enabled = False
    try:
        yield model
    finally:
        if getattr(inner, _STATE_ATTR, None) is state:   # not unpatched / switched inside the block
            for m in mods:
                m.enabled = True
                m.attach_base()


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights, keeping its modules (PEFT's
    ``merge_adapter``): forward then runs the plain layers, equal to the adapted model's outputs
    to the weight dtype's rounding. A CPU copy of each weight merged is kept, so
    ``unmerge_adapter`` restores it bit for bit. While merged, training, saving, loading,
    switching and disabling raise; ``merge`` and ``unpatch`` work (they unmerge first)."""
    _, state, aset = _adapters(model, "merge_adapter")
    _check_switchable(state, "merge_adapter", aset.active)
    mods = _modules(state)
    if any(not m.enabled for m in mods):
        raise RuntimeError("spu_kernels.merge_adapter inside spu_kernels.disable_adapter(model): leave the with "
                           "block first")
    for m in mods:
        if m.merge_error:
            raise RuntimeError(f"spu_kernels.merge_adapter: {m.merge_error}")
    done = []
    try:
        for m in mods:
            m.merge_in_place()
            done.append(m)
    except BaseException:
        for m in reversed(done):
            m.unmerge()
        raise
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo ``merge_adapter``: the base weights get their pre-merge bits back (a no-op when not
    merged)."""
    state = _state(unwrap_model(model), "unmerge_adapter")
    for m in reversed(_modules(state)):
        if isinstance(m, AdapterModule):
            m.unmerge()
    return model
