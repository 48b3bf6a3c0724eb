"""The method registry: ``patch(model, name, **options)`` looks methods up here.

A method is a function ``fn(ctx: PatchContext, **options)`` that replaces modules through
``ctx.replace`` and names what trains through ``ctx.train``; the core (core.py) does the rest:
checking options, freezing, the task head, rollback on error, the summary, unpatch and merge.
Later methods plug in with ``@register_method("name")`` in their own file, imported by
spu_kernels/patching/__init__.py, without touching the core.

``patch`` also takes a few options beside every method's own: ``SHARED_OPTIONS``. The core
applies ``train_head`` and ``trainable_modules`` itself; the others are applied by the method
file that registers them with ``register_shared_option`` (prompt_methods.py: ``soft_prompt``),
so the core imports no method file.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..ops.bottleneck_adapter import ACTIVATIONS


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    description: str

    def option_names(self) -> list[str]:
        params = list(inspect.signature(self.fn).parameters.values())[1:]   # after ctx
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def defaults(self) -> dict:
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, description: str = "") -> Callable[[Callable], Callable]:
    """Decorator: make ``fn(ctx, *, options...)`` available as ``patch(model, name, ...)``."""
    def deco(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].fn.__module__})")
        _METHODS[name] = MethodSpec(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known_methods())}")
    return _METHODS[name]


# --------------------------------------------------------------------------------------------
# the options patch() takes for every method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedOption:
    """An option of ``patch`` beside the method's own, with its default."""
    name: str
    default: Any
    description: str


#: The options ``patch(model, method, ...)`` takes beside every method's own, in its signature's
#: order (``spu_kernels.patch``'s keyword-only parameters; a test keeps the two in step).
SHARED_OPTIONS: tuple[SharedOption, ...] = (
    SharedOption("train_head", True, "keep the task head (classifier, score, ...) trainable"),
    SharedOption("trainable_modules", None, "names (matched at the end) of further modules to train in full"),
    SharedOption("soft_prompt", None, "a trainable soft prompt beside the method's adapters: a number of "
                                      "prompt tokens, or a dict of the prompt method's options"),
)
SHARED_OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in SHARED_OPTIONS)
#: the shared options the core applies itself; a method file applies each of the others
CORE_OPTIONS: tuple[str, ...] = ("train_head", "trainable_modules")


@dataclass(frozen=True)
class SharedOptionHandler:
    """How a shared option that a method file provides is applied, for a value other than None.

    ``prepare(value)`` checks the value and returns what ``apply`` takes; it runs before the
    model changes. ``apply(ctx, prepared)`` runs after the method's own replacements, inside
    ``patch``'s rollback. ``excludes``: method name -> the error message for combining them."""
    name: str
    prepare: Callable[[Any], Any]
    apply: Callable[[Any, Any], None]
    excludes: Mapping[str, str] = field(default_factory=dict)


_SHARED_HANDLERS: dict[str, SharedOptionHandler] = {}


def register_shared_option(name: str, *, prepare: Callable[[Any], Any], apply: Callable[[Any, Any], None],
                           excludes: Mapping[str, str] | None = None) -> None:
    """Make the shared option ``name`` (one of ``SHARED_OPTIONS``, not a core one) work: see
    ``SharedOptionHandler``."""
    if name not in SHARED_OPTION_NAMES or name in CORE_OPTIONS:
        raise ValueError(f"{name!r} is not a shared option a method file applies (those are "
                         f"{', '.join(n for n in SHARED_OPTION_NAMES if n not in CORE_OPTIONS)})")
    if name in _SHARED_HANDLERS:
        raise ValueError(f"shared option {name!r} is already registered "
                         f"(by {_SHARED_HANDLERS[name].apply.__module__})")
    _SHARED_HANDLERS[name] = SharedOptionHandler(name, prepare, apply, dict(excludes or {}))


def shared_option_handler(name: str) -> SharedOptionHandler:
    if name not in _SHARED_HANDLERS:
        raise ValueError(f"patch option {name!r} is not available: no method file registered it "
                         "(import spu_kernels.patching, which registers the built-in ones)")
    return _SHARED_HANDLERS[name]


def shared_options(method: str | None = None) -> dict[str, Any]:
    """Shared option name -> default: those ``method`` can take, given one (``soft_prompt`` is no
    option of "prompt"), else all of them."""
    return {o.name: o.default for o in SHARED_OPTIONS
            if method is None or o.name not in _SHARED_HANDLERS or method not in _SHARED_HANDLERS[o.name].excludes}


# --------------------------------------------------------------------------------------------
# option ranges, checked without a model (the harness's config validation uses this)
# --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "a positive int")
# option name -> (test, what it must be); None passes where the default is None (or the option is
# patch()'s own, like soft_prompt)
OPTION_RULES: dict[str, tuple[Callable, str]] = {
    "r": _POSITIVE_INT, "k": _POSITIVE_INT, "n_tokens": _POSITIVE_INT, "niter": _POSITIVE_INT,
    "generator_rank": _POSITIVE_INT, "reparam_hidden": _POSITIVE_INT,
    "init_std": (lambda v: _is_finite(v) and v > 0, "a finite number > 0"),
    "n": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "dropout": (lambda v: _is_finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "alpha": (_is_finite, "a finite number"),
    "scale": (_is_finite, "a finite number"),
    "soft_prompt": (lambda v: isinstance(v, dict) or (_is_int(v) and v >= 1), "a positive int (or a mapping of "
                                                                             "the prompt method's options)"),
}
METHOD_OPTION_RULES: dict[tuple[str, str], tuple[Callable, str]] = {
    ("klst", "k"): (lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd positive int"),
    ("fishmask", "p"): (lambda v: _is_finite(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    ("prefix", "attentions"): (lambda v: v in ("all", "decoder_self"), "'all' or 'decoder_self'"),
    ("adapter", "non_linearity"): (lambda v: v in ACTIVATIONS, "one of " + ", ".join(ACTIVATIONS)),
    ("adapter", "placement"): (lambda v: v in ("houlsby", "pfeiffer"), "'houlsby' or 'pfeiffer'"),
}


def check_options(name: str, options: dict) -> None:
    """A ValueError ``"OPTION: must be ... for NAME, got VALUE"`` for the first option of method
    ``name`` outside its range (``OPTION_RULES``); options without a rule, or unknown, pass."""
    defaults = get_method(name).defaults()
    for key, value in options.items():
        rule = METHOD_OPTION_RULES.get((name, key)) or OPTION_RULES.get(key)
        if rule is None or (value is None and defaults.get(key) is None):
            continue
        test, what = rule
        if not test(value):
            raise ValueError(f"{key}: must be {what} for {name}, got {value!r}")
