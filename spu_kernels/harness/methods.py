"""The harness's method registry: name -> how to apply it to a model.

Adding a method to the harness is one line in ``METHODS``: ``"name": HarnessMethod("patch
method", learning_rate, {default args})``. ``patch=None`` means full fine-tuning (nothing is
patched, everything trains). Every other entry calls ``spu_kernels.patch(model, patch, **args)``.

Applying a method uses the public API only. Checking a config's method options without a model
needs two things the public API does not offer -- each method's option names with their defaults,
and their ranges -- so ``_registry()`` takes them from ``spu_kernels.patching.registry`` (the one
place the harness reaches below the public API).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import spu_kernels

from .model import lm_of
from .schema import ConfigError, check_value, suggest


@dataclass(frozen=True)
class HarnessMethod:
    patch: str | None                 # the spu_kernels.patch method, None = full fine-tuning
    learning_rate: float              # default peak learning rate (training.learning_rate overrides)
    args: dict = field(default_factory=dict)   # default options (method.args override them)
    # given the resolved options, whether patch() also takes ``batches=``: the run's first
    # PATCH_BATCHES training batches (e.g. lst/klst with init="fisher" score the backbone's units on them)
    needs_batches: Callable[[dict], bool] | None = None


#: how many training batches the harness hands to a patch that needs them (the LST paper's Fisher
#: pruning accumulates over a few batches of the task's training data)
PATCH_BATCHES = 8


def _fisher_init(args: dict) -> bool:
    return args.get("init") == "fisher"


def _no_selection(args: dict) -> bool:
    """fishmask ranks on the batches unless the config gives its selection (``mask``)."""
    return args.get("mask") is None and args.get("scores") is None


METHODS: dict[str, HarnessMethod] = {
    "full": HarnessMethod(None, 5e-5),
    "lora": HarnessMethod("lora", 1e-3, {"r": 16}),
    "siva": HarnessMethod("siva", 1e-3, {"r": 16}),
    "siva_kv": HarnessMethod("siva_kv", 1e-3, {"r": 16}),
    "krona": HarnessMethod("krona", 1e-3),
    "ia3": HarnessMethod("ia3", 3e-3),
    "ia3_dynamic": HarnessMethod("ia3", 3e-3, {"dynamic": True}),
    "lst": HarnessMethod("lst", 3e-3, {"r": 8}, needs_batches=_fisher_init),
    "klst": HarnessMethod("klst", 3e-3, {"r": 8, "k": 3}, needs_batches=_fisher_init),
    "last_n": HarnessMethod("last_n", 1e-4, {"n": 2}),
    "bitfit": HarnessMethod("bitfit", 1e-3),
    "fishmask": HarnessMethod("fishmask", 1e-3, {"p": 0.005}, needs_batches=_no_selection),
    "prompt": HarnessMethod("prompt", 3e-3, {"n_tokens": 20}),
    "prefix": HarnessMethod("prefix", 3e-3, {"n_tokens": 20}),
    "adapter": HarnessMethod("adapter", 1e-3, {"r": 64}),
}

# default learning rates with optimizer: mezo (its steps follow a projected gradient: much smaller)
MEZO_LEARNING_RATE = {"full": 1e-6}
MEZO_DEFAULT_LEARNING_RATE = 1e-4


def _registry():
    """``spu_kernels.patching.registry``: option names, defaults and ranges (see the module docstring)."""
    from spu_kernels.patching import registry
    return registry


def get(name: str) -> HarnessMethod:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not available{suggest(name, METHODS)}; the harness has "
                          f"{', '.join(METHODS)} (add one with a line in spu_kernels/harness/methods.py METHODS)")
    m = METHODS[name]
    if m.patch is not None and m.patch not in spu_kernels.known_methods():
        raise ConfigError(f"method {name!r}: spu_kernels.patch has no method {m.patch!r} in this install "
                          f"(it has {', '.join(spu_kernels.known_methods())})")
    return m


def options_of(name: str) -> dict:
    """Option name -> default for a harness method (empty for full)."""
    m = get(name)
    if m.patch is None:
        return {}
    spec = _registry().get_method(m.patch)
    out = {k: spec.defaults().get(k) for k in spec.option_names()}
    # the options patch() itself takes for every method it allows them for (train_head, ...)
    out.update(_registry().shared_options(m.patch))
    if m.needs_batches is not None:
        out.pop("batches", None)        # the harness passes them (PATCH_BATCHES), never the config
    return out


def check_method(name: str, args: dict, where: str) -> None:
    """A ConfigError naming ``where.args.KEY`` for an unknown option, one of the wrong type, or one
    out of its range (``spu_kernels.patching.registry.check_options``)."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: must be a string, got {name!r}")
    try:
        get(name)
    except ConfigError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    allowed = options_of(name)
    for key, value in (args or {}).items():
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no options (full fine-tuning trains every parameter)"
            raise ConfigError(f"{where}.args.{key}: unknown option for {name}{suggest(key, allowed)}; "
                              f"{name} takes {takes}")
        default = allowed[key]
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(default))
        if kind is not None and value is not None:
            if kind == "str" and not isinstance(value, str):
                continue          # options like svd / init are strings; others (dtypes) may be objects
            check_value(f"{where}.args.{key}", value, kind)
    patch_name = get(name).patch
    if args and patch_name is not None:
        try:
            _registry().check_options(patch_name, args)
        except ValueError as e:                       # "OPTION: must be ..." -> where.args.OPTION: ...
            raise ConfigError(f"{where}.args.{e}") from None


def resolve(name: str, args: dict | None, learning_rate: float | None,
            optimizer: str = "adamw") -> tuple[HarnessMethod, dict, float]:
    m = get(name)
    if learning_rate is None:
        learning_rate = (m.learning_rate if optimizer != "mezo"
                         else MEZO_LEARNING_RATE.get(name, MEZO_DEFAULT_LEARNING_RATE))
    return m, {**m.args, **(args or {})}, float(learning_rate)


def apply(model, name: str, args: dict, batches: Callable[[], list[dict]] | None = None):
    """Apply the method to ``model`` in place (to the language model inside a PromptClassifier);
    returns the model it applied it to. ``batches()``: training batches (model inputs with labels),
    called only where the method ``needs_batches``."""
    m = get(name)
    lm = lm_of(model)
    if m.patch is None:
        for p in lm.parameters():
            p.requires_grad_(True)
        return lm
    if m.needs_batches is not None and m.needs_batches(args):
        if hasattr(model, "lm_batch"):               # task: text2text: the LM's own inputs (target token ids)
            if batches is None:
                raise ConfigError(f"method {name!r} with {args} needs training batches; pass batches= to apply")
            return spu_kernels.patch(lm, m.patch, **args, batches=[model.lm_batch(b) for b in batches()])
        if lm is not model:
            raise ConfigError(f"method {name!r} with {args}: needs training batches of the model it patches; "
                              "with a prompt template the batches are the prompt classifier's, not its LM's "
                              "(drop prompt.template, or use options that need no batches)")
        if batches is None:
            raise ConfigError(f"method {name!r} with {args} needs training batches; pass batches= to apply")
        args = {**args, "batches": batches()}
    return spu_kernels.patch(lm, m.patch, **args)
