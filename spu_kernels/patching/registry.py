"""The method registry: ``patch(model, name, **options)`` looks methods up here.

A method is a function ``fn(ctx: PatchContext, **options)`` that replaces modules through
``ctx.replace`` and names what trains through ``ctx.train``; the core (core.py) does the rest:
checking options, freezing, the task head, rollback on error, the summary, unpatch and merge.
Later methods plug in with ``@register_method("name")`` in their own file, imported by
spu_kernels/patching/__init__.py, without touching the core.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable


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
    "n": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "dropout": (lambda v: _is_finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "alpha": (_is_finite, "a finite number"),
    "scale": (_is_finite, "a finite number"),
    "soft_prompt": (lambda v: isinstance(v, dict) or (_is_int(v) and v >= 1), "a positive int (or a mapping of "
                                                                             "the prompt method's options)"),
}
METHOD_OPTION_RULES: dict[tuple[str, str], tuple[Callable, str]] = {
    ("klst", "k"): (lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd positive int"),
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
