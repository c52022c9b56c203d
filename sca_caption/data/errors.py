"""Bad input data: its error (``DataError``, an ``SCACaptionError``) and the report that collects entries skipped instead.

Readers take ``on_bad``: ``"error"`` raises a ``DataError`` at the first bad entry; ``"skip"`` leaves
the entry out and records it in a ``BadInputReport`` that the command-line tools print at the end,
so no bad entry ever disappears silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sca_caption.errors import SCACaptionError

ON_BAD_CHOICES = ("error", "skip")


class DataError(SCACaptionError):
    """Bad input data: the message is one line naming the file (and line, where there is one) and the problem."""


def location(file: Path | str, line: int | None = None) -> str:
    """``"FILE, line N"``, or just ``"FILE"`` where there is no line to name."""
    return f"{file}, line {line}" if line is not None else str(file)


@dataclass(frozen=True)
class SkippedEntry:
    """One bad entry left out under ``on_bad="skip"``."""

    file: Path
    line: int | None
    problem: str

    def __str__(self) -> str:
        return f"{location(self.file, self.line)}: {self.problem}"


class BadInputReport:
    """Bad entries skipped, and notes on input left out by design (e.g. images in no split list)."""

    def __init__(self) -> None:
        self.skipped: list[SkippedEntry] = []
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self, max_listed: int = 20) -> str:
        """Lines for the end of a command-line run: the skip count, the first skips, then the notes."""
        lines = [f"skipped {len(self.skipped)} bad input entr{'y' if len(self.skipped) == 1 else 'ies'}"]
        lines += [f"  {entry}" for entry in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


class BadInputPolicy:
    """What a reader does with a bad entry: raise a ``DataError`` or record it as skipped."""

    def __init__(self, on_bad: str, report: BadInputReport | None) -> None:
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
        if on_bad == "skip" and report is None:
            raise ValueError("on_bad='skip' needs a BadInputReport to record the skipped entries in")
        self.on_bad = on_bad
        self.report = report

    def bad(self, file: Path, problem: str, line: int | None = None) -> None:
        """Raise for ``on_bad="error"``; otherwise record the entry, which the caller then leaves out."""
        if self.on_bad == "error":
            raise DataError(f"{location(file, line)}: {problem}")
        assert self.report is not None
        self.report.skipped.append(SkippedEntry(Path(file), line, problem))

    def note(self, text: str) -> None:
        """Record input left out by design (kept only when there is a report to show it in)."""
        if self.report is not None:
            self.report.notes.append(text)
