"""The decoding options of the command lines (``caption``, ``evaluate``, ``export``): one set of
flags, each a change to the ``decode`` settings a checkpoint records (``decoding.DecodeConfig``).
A flag left out leaves its setting as recorded; a bad value is a usage error while parsing."""

from __future__ import annotations

import argparse
import math
from typing import Callable

from sca_caption.decoding import LENGTH_PENALTIES, DecodeConfig


def _at_least(setting: str, kind: type) -> Callable[[str], float]:
    """An argparse ``type``: the text as ``kind`` (int or float), finite and at least the minimum
    ``DecodeConfig`` gives ``setting``."""
    low = DecodeConfig.__dataclass_fields__[setting].metadata["min"]

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {kind(low)}")
        return value

    return parse


def add_decode_options(parser: argparse.ArgumentParser, default: str = "the checkpoint's") -> None:
    """``--beam``, ``--length-penalty``, ``--length-alpha``, ``--min-length`` and
    ``--block-trigrams``, each None when not given; ``default`` says where unchanged settings come from."""
    group = parser.add_argument_group("decoding", f"each setting not given is {default} (its decode section)")
    group.add_argument("--beam", type=_at_least("beam_size", int), default=None, metavar="K", help="beam size (1: greedy)")
    group.add_argument("--length-penalty", choices=LENGTH_PENALTIES, default=None,
                       help="rank by log-prob (none), log-prob per step (average) or Wu et al.'s (wu)")
    group.add_argument("--length-alpha", type=_at_least("alpha", float), default=None, metavar="A",
                       help="exponent of the wu penalty")
    group.add_argument("--min-length", type=_at_least("min_length", int), default=None, metavar="N", help="at least N words")
    group.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=None,
                       help="never repeat a trigram")


def decode_changes(args: argparse.Namespace) -> dict[str, object]:
    """The ``DecodeConfig`` fields the options of ``add_decode_options`` change (None: unchanged)."""
    return {
        "beam_size": args.beam,
        "length_penalty": args.length_penalty,
        "alpha": args.length_alpha,
        "min_length": args.min_length,
        "block_trigrams": args.block_trigrams,
    }
