"""Output files: checked before the work, written atomically.

``check_output_file`` / ``check_output_folder`` refuse, in one line and before a command does any
work, a place it could not write: a folder where a file is wanted or the reverse, a missing
folder under a file, a read-only or otherwise unwritable folder (tried by creating and removing a
hidden file in the nearest folder that exists; nothing missing is created).

The rule for an output file that exists: a command never replaces an input of its run (the
checkpoint it reads, ...), and replaces only a file of the kind it writes (``FileKind``, e.g.
``COCO_RESULTS``): anything else there (a user's notes, a model, a dataset's annotations) is
refused in one line and left as it is.

Atomic writing: a reader sees the old file or the complete new one, never a partial one. The new
content goes to a hidden temporary file in the target's folder (same file system, so the final
``os.replace`` is atomic), is flushed and fsynced, then renamed over the target; the folder is
fsynced too so the rename survives a power cut. If writing fails (a full disk), the temporary
file is removed, the target is left as it was, and the failure is one ``OutputError`` line.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

from sca_caption.errors import SCACaptionError, first_line


class OutputError(SCACaptionError):
    """An output file or folder that cannot be written; the message names it."""


@dataclass(frozen=True)
class FileKind:
    """A kind of file a command writes, and so may replace: its ``name`` for messages (with its
    article: "a COCO results JSON file"), and
    ``holds(path)``, whether an existing file is one of that kind."""

    name: str
    holds: Callable[[Path], bool]


def _holds_coco_results(path: Path) -> bool:
    """A JSON list of objects that each have an ``image_id`` and a ``caption``."""
    try:
        with path.open("rb") as handle:
            if handle.read(64).lstrip()[:1] != b"[":  # not JSON text of a list: not read further
                return False
            handle.seek(0)
            entries = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(entries, list) and all(isinstance(e, dict) and {"image_id", "caption"} <= e.keys() for e in entries)


COCO_RESULTS = FileKind("a COCO results JSON file", _holds_coco_results)


def check_output_file(
    path: str | os.PathLike[str],
    what: str = "output file",
    *,
    inputs: Mapping[str | os.PathLike[str], str] | None = None,
    replaces: FileKind | None = None,
) -> None:
    """Refuse (``OutputError``) a ``path`` a file cannot be written at; one of the run's ``inputs``
    (path -> what it is, e.g. "the checkpoint to evaluate"); or, given the ``replaces`` kind, an
    existing file that is not of that kind."""
    target = check_path_name(path, what)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, but the {what} goes here")
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: is not a regular file, but the {what} goes here")
    for source, role in (inputs or {}).items():
        if target.exists() and Path(source).exists() and os.path.samefile(target, source):
            raise OutputError(f"{target}: is {role}; name another {what}")
    if replaces is not None and target.exists() and not replaces.holds(target):
        raise OutputError(f"{target}: exists and is not {replaces.name}; not overwritten")
    _check_writable_folder(target.parent, target, what)


def check_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> None:
    """Refuse (``OutputError``) a ``path`` that is not, and cannot become, a writable folder."""
    target = check_path_name(path, what)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file, but the {what} goes here")
    _check_writable_folder(target, target, what)


NAME_MAX, PATH_MAX = 255, 4096  # bytes, as Linux and macOS file systems allow


def name_problem(path: str | os.PathLike[str]) -> str | None:
    """Why no file can be named ``path`` (a part longer than ``NAME_MAX`` bytes, or the whole
    path ``PATH_MAX`` bytes or more, which the system refuses as "File name too long"), or None."""
    whole = len(os.fsencode(path))
    if whole >= PATH_MAX:
        return f"a path of {whole} bytes is too long (the most is {PATH_MAX - 1})"
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest > NAME_MAX:
        return f"it has a name of {longest} bytes, too long for a file name (the most is {NAME_MAX})"
    return None


def check_path_name(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a ``Path``, refused (``OutputError``) where no file or folder can be named so:
    ``name_problem``, or "-" (standard output to a user, which the command does not write to)."""
    if os.fspath(path) == "-":
        raise OutputError(f"-: the {what} needs a real name (\"-\" does not mean standard output here)")
    problem = name_problem(path)
    if problem is not None:
        raise OutputError(f"{path}: {problem}; the {what} cannot go there")
    return Path(path)


def _check_writable_folder(folder: Path, target: Path, what: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a folder this process can write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{target}: {existing} is a file, so the {what} cannot go there")
    try:
        fd, probe = _create_temporary(existing / "sca-caption-write-check")
    except OSError as error:
        raise OutputError(f"{target}: the {what} cannot be written in {existing} ({first_line(error)})") from None
    os.close(fd)
    probe.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The path of a new, empty temporary file beside ``path``, for a writer that opens files by
    name (h5py); on a clean exit the file is fsynced and replaces ``path`` (see ``_replacing``)."""
    with _replacing(path) as (_, tmp_path):
        yield tmp_path


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """An open temporary file beside ``path``; on a clean exit it replaces ``path`` (see ``_replacing``).

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with _replacing(path) as (fd, _):
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None, closefd=False) as handle:
            yield handle


@contextmanager
def _replacing(path: str | os.PathLike[str]) -> Iterator[tuple[int, Path]]:
    """A new temporary file beside ``path``, open for writing (its descriptor and path); on a clean
    exit its content is fsynced and it replaces ``path``.

    Missing parent folders are created. Any ``OSError`` on the way (a full disk, or one the writer
    raised) is one ``OutputError`` naming ``path``, whose old file is left unchanged; the temporary
    file is removed whenever ``path`` is not replaced.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_path = _create_temporary(target)
    except OSError as error:
        raise OutputError(f"{target}: not written ({first_line(error)})") from None
    try:
        try:
            yield fd, tmp_path
            os.fsync(fd)  # the inode's data, whichever descriptor wrote it
        finally:
            os.close(fd)
        os.replace(tmp_path, target)
    except OSError as error:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{target}: not written, the file there is unchanged ({first_line(error)})") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new hidden file ``.<name>.<random>.tmp`` beside ``target``, with the permissions an ordinary
    new file gets (0666 less the umask; ``tempfile.mkstemp`` would make it 0600)."""
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), candidate
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
