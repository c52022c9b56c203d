"""The project's one error base and its one-line report.

Every error a user can cause or fix (bad data, settings, checkpoints, options, decoding settings)
is an ``SCACaptionError``: ``DataError`` (and its ``ConfigError``, ``CheckpointError``, ...),
``ModelConfigError`` and ``DecodingError`` derive from it, and each message is one line that names
the file, key or setting and the problem. Command-line entry points are wrapped in ``command``,
which prints such an error as ``error: <line>`` on stderr and exits 2; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class SCACaptionError(ValueError):
    """A problem the user can fix; the message is one line naming the file or setting."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` of a foreign exception, at most ``limit`` characters:
    what a one-line error quotes of the exception it replaces."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main(argv)`` that reports an ``SCACaptionError`` as ``error: <message>`` and returns 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except SCACaptionError as error:
            lines = str(error).strip().splitlines()
            print(f"error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
            return 2

    return run
