"""Reading input files, with one-line ``DataError``s for a missing or unreadable file or broken JSON.

Only regular files are read: a FIFO, socket or device (which could block forever or never end)
is refused by name without being read, and opening never blocks (``O_NONBLOCK``, cleared once the
file is known to be regular).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from sca_caption.data.errors import DataError
from sca_caption.errors import first_line

KINDS = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
         stat.S_ISBLK: "a block device"}


def open_regular(path: str | os.PathLike[str], what: str = "file") -> IO[bytes]:
    """``path`` open for binary reading if it is a regular file (links followed); anything else is a
    one-line ``DataError`` naming ``what`` it should have been."""
    path = Path(path)
    a_what = f"{'an' if what[0] in 'aeiou' else 'a'} {what}"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as err:  # a socket cannot be opened at all (ENXIO); permissions, link loops, ...
        try:
            kind = _special_kind(os.stat(path).st_mode)
        except OSError:
            kind = None
        raise DataError(f"{path}: is {kind}, not {a_what}" if kind else f"{path}: cannot open ({first_line(err)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else _special_kind(mode) or "not a regular file"
        raise DataError(f"{path}: is {kind}, not {a_what}; not read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _special_kind(mode: int) -> str | None:
    """"a socket" etc. for the ``st_mode`` of a FIFO, socket or device, else None."""
    return next((kind for test, kind in KINDS.items() if test(mode)), None)


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path``; a missing, special or unreadable one is a ``DataError``."""
    with open_regular(path, what) as handle:
        try:
            return handle.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read ({err})") from None


def read_json(path: Path) -> Any:
    """The parsed content of ``path``; a missing, unreadable or malformed file is a ``DataError``."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None


def object_problem(obj: Any, keys: tuple[str, ...], where: str) -> str | None:
    """The problem with ``obj`` (not an object, or lacking one of ``keys``), or None when it is fine."""
    if not isinstance(obj, dict):
        return f"{where}: expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in keys if k not in obj]
    if missing:
        return f"{where}: missing key {missing[0]!r}"
    return None
