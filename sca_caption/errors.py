"""The project's one error base and its one-line report.

Every error a user can cause or fix (bad data, settings, checkpoints, options, decoding settings)
is an ``SCACaptionError``: ``DataError`` (and its ``ConfigError``, ``CheckpointError``, ...),
``ModelConfigError`` and ``DecodingError`` derive from it, and each message is one line that names
the file, key or setting and the problem. Command-line entry points are wrapped in ``command``,
which prints such an error as ``error: <line>`` on stderr and exits 2; any other exception is a
bug and keeps its traceback.

Ctrl-C and SIGTERM: inside ``command`` SIGTERM interrupts like Ctrl-C (``KeyboardInterrupt``). A
command that keeps something of its work says what in an ``Interrupted`` error; any other
interruption is one line too (the project's outputs are written atomically, so none is left half
written). Both exit 2, as an error does. Before ``command`` runs, while an entry point imports
torch and the rest (seconds), a Ctrl-C is the same line and status 2 once the entry point has
called ``exit_on_ctrl_c_until_command`` (its first statement).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


INTERRUPTED = "error: interrupted (Ctrl-C or SIGTERM)"


class SCACaptionError(ValueError):
    """A problem the user can fix; the message is one line naming the file or setting."""


class Interrupted(SCACaptionError):
    """Ctrl-C or SIGTERM stopped a command; the message says what was kept and how to go on."""


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
            if signal.getsignal(signal.SIGINT) is _exit_interrupted:  # Ctrl-C raises again from here on
                signal.signal(signal.SIGINT, signal.default_int_handler)
            with _sigterm_interrupts():
                return main(argv)
        except SCACaptionError as error:
            lines = str(error).strip().splitlines()
            print(f"error: {lines[0] if lines else type(error).__name__}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            return 2

    return run


def exit_on_ctrl_c_until_command() -> None:
    """Make a Ctrl-C end the process with ``command``'s line and status 2 until ``command`` runs:
    an entry point's first statement, before its imports, whose traceback a Ctrl-C would print.
    A process started with Ctrl-C ignored keeps ignoring it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(_number: int, _frame: object) -> None:
    """Exit at once: nothing is written yet, and an import stopped halfway must not run on."""
    print(INTERRUPTED, file=sys.stderr, flush=True)
    os._exit(2)


def main_process_takes_interrupts(_worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: a Ctrl-C (which a terminal sends to the whole process
    group) is ignored by the worker and a SIGTERM ends it with status 0, so the main process stops
    as it says it will. A worker killed by the signal makes torch raise in the middle of whatever
    the main process is doing; one that exits does not (and torch's own clean-up, which ends
    workers with SIGTERM, still works)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(_number: int, _frame: object) -> None:
    os._exit(0)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` while the block runs (in the main thread; elsewhere
    signals cannot be handled and the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_number: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
