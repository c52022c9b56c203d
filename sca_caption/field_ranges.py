"""The checks of one settings field: ``coerce`` fits a value to the field's type hint, and
``out_of_range`` checks it against the field's ``metadata``, which may give its ``choices``, a
``min`` and ``max`` (inclusive) or a ``below`` (exclusive) bound. The config checks every key with
both, and ``DecodeSettings`` its fields' ranges; rules between fields are in ``config_rules``."""

from __future__ import annotations

import collections.abc
import math
import types
from typing import Any, Literal, Mapping, Union, get_args, get_origin

SEQUENCES = (list, tuple, collections.abc.Sequence)


def out_of_range(value: Any, metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` given its field's ``metadata`` ("must be ..."), or None."""
    if value is None:
        return None
    if "choices" in metadata and value not in metadata["choices"]:
        return "must be one of " + ", ".join(metadata["choices"])
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "min" in metadata and value < metadata["min"]:
        return f"must be at least {metadata['min']}"
    if "max" in metadata and value > metadata["max"]:
        return f"must be at most {metadata['max']}"
    if "below" in metadata and value >= metadata["below"]:
        return f"must be below {metadata['below']}"
    return None


class Mismatch(Exception):
    """A value that does not fit a type hint; the message describes what would."""


def coerce(value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (int, float, bool, str, None, unions, Literal, list[X],
    tuple[X, ...]); ints pass as floats, numeric text as float, lists as tuples where asked."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except Mismatch:
                continue
        raise Mismatch(" or ".join(describe(a) for a in args))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise Mismatch(describe(hint))
    if origin in SEQUENCES or hint in SEQUENCES:
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
            raise Mismatch(describe(hint))
        item_hints = args if fixed else [args[0] if args else Any] * len(value)
        try:
            items = [coerce(v, h) for v, h in zip(value, item_hints)]
        except Mismatch:
            raise Mismatch(describe(hint)) from None
        return tuple(items) if (origin or hint) is tuple else items
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config fields of type {hint!r} are not supported")
    raise Mismatch(describe(hint))


def describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in SEQUENCES:
        plurals = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plurals.get(args[0], describe(args[0]))}" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, repr(hint))
