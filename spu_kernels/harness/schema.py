"""What the harness's config checks share: ``ConfigError``, the value check (``check_value``) and
the did-you-mean hint (``suggest``). config.py (the sections and keys) and methods.py (each
method's options) both use them; this module imports neither."""
from __future__ import annotations

import difflib
import math


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key."""


def suggest(key, allowed) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``allowed`` (a close match, else a prefix), or ""."""
    allowed = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    close = close or [a for a in allowed if str(key) and a.startswith(str(key))][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(kind: str) -> str:
    """'int?' -> 'an integer or null'."""
    base = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "dict": "a mapping", "list": "a list", "switch": "true, false or a string"}[kind.rstrip("?")]
    return base + (" or null" if kind.endswith("?") else "")


def check_value(key: str, value, kind: str, choices=None, minimum=None, above=None, maximum=None):
    """``value`` converted to ``kind`` ('int', 'float?', ...) or a ConfigError naming ``key``; numbers
    must be finite and within the range (>= minimum, > above, <= maximum)."""
    if value is None:
        if kind.endswith("?"):
            return None
        raise ConfigError(f"{key}: must be {type_name(kind)}, got null")
    base = kind.rstrip("?")
    ok = {"str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "dict": isinstance(value, dict),
          "list": isinstance(value, list),
          "switch": isinstance(value, (bool, str))}[base]
    if base == "switch" and isinstance(value, bool):   # YAML reads `false` / `true` as booleans
        value = "true" if value else "false"
    if base == "float" and isinstance(value, str):
        try:                      # YAML reads 1e-3 (no dot) as a string
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"{key}: must be {type_name(kind)}, got {type(value).__name__} {value!r}")
    if base == "float":
        value = float(value)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
                          + suggest(value, choices))
    if base == "float" and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    for bad, bound in ((minimum is not None and value < minimum, f">= {minimum}"),
                       (above is not None and value <= above, f"> {above}"),
                       (maximum is not None and value > maximum, f"<= {maximum}")):
        if bad:
            raise ConfigError(f"{key}: must be {bound}{' or null' if kind.endswith('?') else ''}, got {value!r}")
    return value
