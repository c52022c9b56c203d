"""The decoding options of the command lines (``caption``, ``evaluate``, ``export``) and of the
service's query string: one table from each option's name (the query name; the flag is ``--``
and the name with dashes) to the ``decoding.DecodeSettings`` field it changes. An option left out
leaves its setting as recorded; a value out of the field's range is refused while parsing (a
usage error, or the service's 422), the rest of the checks are the settings' own."""

from __future__ import annotations

import argparse
import math
import types
from typing import Any, Callable, Iterable, Union, get_args, get_origin, get_type_hints

from sca_caption.decoding import DecodeSettings

# option name -> (its DecodeSettings field, help)
DECODE_OPTIONS: dict[str, tuple[str, str]] = {
    "beam": ("beam_size", "beam size (1: greedy)"),
    "n_best": ("n_best", "captions per image, best first; at most beam"),
    "max_length": ("max_length", "decoding steps, the end token included (default: the checkpoint's caption length + 1)"),
    "length_penalty": ("length_penalty", "rank by log-prob (none), log-prob per step (average) or Wu et al.'s (wu)"),
    "length_alpha": ("alpha", "exponent of the wu penalty"),
    "min_length": ("min_length", "at least this many words"),
    "block_trigrams": ("block_trigrams", "never repeat a trigram of the caption"),
}
RECORDED_OPTIONS = ("beam", "length_penalty", "length_alpha", "min_length", "block_trigrams")  # evaluate, export


def option_type(name: str) -> type:
    """The type of option ``name``'s field (int, float, str or bool; None left out)."""
    hint = get_type_hints(DecodeSettings)[DECODE_OPTIONS[name][0]]
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [arg for arg in get_args(hint) if arg is not type(None)]
    return hint


def option_limits(name: str) -> dict[str, Any]:
    """Option ``name``'s field metadata: ``choices``, ``min``, ``max`` where it has them."""
    return dict(DecodeSettings.__dataclass_fields__[DECODE_OPTIONS[name][0]].metadata)


def _in_range(name: str, kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: the text as ``kind`` (int or float), finite and within the range of
    option ``name``'s field."""
    limits = option_limits(name)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if "min" in limits and value < limits["min"]:
            raise argparse.ArgumentTypeError(f"{text} is below {kind(limits['min'])}")
        if "max" in limits and value > limits["max"]:
            raise argparse.ArgumentTypeError(f"{text} is above {kind(limits['max'])}")
        return value

    return parse


def add_decode_options(
    parser: argparse.ArgumentParser, names: Iterable[str] = RECORDED_OPTIONS, default: str = "the checkpoint's"
) -> None:
    """The flags of options ``names``, each None when not given; ``default`` says where unchanged
    settings come from."""
    group = parser.add_argument_group("decoding", f"each setting not given is {default} (its decode section)")
    for name in names:
        flag, kind, help = "--" + name.replace("_", "-"), option_type(name), DECODE_OPTIONS[name][1]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif "choices" in option_limits(name):
            group.add_argument(flag, choices=option_limits(name)["choices"], default=None, help=help)
        else:
            group.add_argument(flag, type=_in_range(name, kind), default=None, metavar="N" if kind is int else "X", help=help)


def decode_changes(values: Any) -> dict[str, Any]:
    """The ``DecodeSettings`` changes that the options of ``values`` (parsed flags or the query)
    ask for, each option it has mapped to its field (None: unchanged)."""
    return {field: getattr(values, name) for name, (field, _) in DECODE_OPTIONS.items() if hasattr(values, name)}
