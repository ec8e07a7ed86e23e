"""Input checks shared by the whole library (plain Python, run before anything is traced).

Every check raises an exception that names the argument, the bad value and what is allowed.
Modules validate on construction or at the top of a public function with these helpers; no
module keeps private copies of them. This module imports nothing from diffjax.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Iterable

import jax
import numpy as np

__all__ = [
    "is_finite_real",
    "check_number",
    "check_positive",
    "check_count",
    "check_choice",
    "check_key",
    "check_shape",
    "matches_annotation",
    "check_dataclass_fields",
    "nearest",
    "build_named",
]


def is_finite_real(value) -> bool:
    """A finite Python or NumPy real number (not a bool, not an array)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_number(name: str, value) -> float:
    """`value` (a number or a concrete 0-d array) as a float; ValueError naming `name` unless it
    is a finite real number."""
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and not isinstance(value, jax.core.Tracer):
        value = value.item()
    if not is_finite_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r:.100}")
    return float(value)


def check_positive(name: str, value) -> float:
    """`value` as a float; ValueError unless it is a positive finite number."""
    if not (is_finite_real(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r:.100}")
    return float(value)


def check_count(name: str, value, minimum: int = 1) -> int:
    """`value` as an int; ValueError unless it is an integer >= `minimum` (bools refused)."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r:.100}")
    return int(value)


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to `name` by spelling, or None when none is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_choice(name: str, value, allowed: Iterable[str]) -> str:
    """`value` unless it is not one of `allowed`: ValueError naming the nearest allowed value."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        hint = nearest(value, allowed) if isinstance(value, str) else None
        suggestion = f" (did you mean {hint!r}?)" if hint else ""
        raise ValueError(f"unknown {name} {value!r:.100}{suggestion}; allowed: {sorted(allowed)}")
    return value


def check_key(key) -> None:
    """A typed key (jax.random.key) or raw uint32 key data (jax.random.PRNGKey), one key."""
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if typed and key.shape == ():
        return
    if not typed and isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.ndim == 1:
        return
    raise TypeError(
        f"key must be one jax.random.key (or jax.random.PRNGKey data), got {key!r:.100}; "
        "for a batch of keys, vmap over them"
    )


def check_shape(shape) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints with a batch axis first."""
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    if not (
        isinstance(shape, tuple)
        and len(shape) >= 1
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (batch first), got {shape!r}")
    return shape


def matches_annotation(annotation: str, value) -> bool:
    """Whether `value` has the type a dataclass field's annotation string names ("int", "float",
    "bool", "str", "None", "tuple[int, ...]" and unions of them); other annotations match anything."""

    def matches(a: str, v) -> bool:
        if a.startswith("tuple["):
            inner = a[len("tuple[") : -1].split(",")[0].strip()
            return isinstance(v, (tuple, list)) and all(matches(inner, x) for x in v)
        return {
            "None": lambda: v is None,
            "bool": lambda: isinstance(v, bool),
            "int": lambda: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v),
            "str": lambda: isinstance(v, str),
            "tuple": lambda: isinstance(v, (tuple, list)),
        }.get(a, lambda: True)()

    return any(matches(a.strip(), value) for a in str(annotation).split("|"))


def check_dataclass_fields(cls, options: dict[str, Any], what: str) -> None:
    """Refuse option names that are not fields of the dataclass `cls`, or values whose type does
    not match the field's annotation; `what` names the thing being configured in the message."""
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.init}
    for name, value in options.items():
        if name not in fields:
            hint = nearest(name, fields)
            suggestion = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"unknown option {name!r} for {what}{suggestion}; allowed: {sorted(fields) or 'none'}")
        if not matches_annotation(fields[name], value):
            raise TypeError(f"option {name} of {what} must be of type {fields[name]}, got {value!r:.100}")


def build_named(table: dict[str, type], name, options: dict[str, Any] | None, what: str):
    """`table[name](**options)`, the one way a name from a config becomes a typed option object:
    unknown names and option keys are refused naming the nearest allowed one, and the dataclass's
    own defaults are the only defaults."""
    check_choice(what, name, table)
    cls = table[name]
    options = dict(options or {})
    check_dataclass_fields(cls, options, f"{what} {name!r}")
    return cls(**options)
