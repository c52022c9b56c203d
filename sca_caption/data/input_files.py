"""Reading input files, with one-line ``DataError``s for a missing or unreadable file or broken JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sca_caption.data.errors import DataError


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file is a ``DataError``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
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
