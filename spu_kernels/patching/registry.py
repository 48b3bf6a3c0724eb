"""The method registry: ``patch(model, name, **options)`` looks methods up here.

A method is a function ``fn(ctx: PatchContext, **options)`` that replaces modules through
``ctx.replace`` and names what trains through ``ctx.train``; the core (core.py) does the rest:
checking options, freezing, the task head, rollback on error, the summary, unpatch and merge.
Later methods plug in with ``@register_method("name")`` in their own file, imported by
spu_kernels/patching/__init__.py, without touching the core.
"""
from __future__ import annotations

import inspect
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
