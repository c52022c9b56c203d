"""One writer at a time for an output: a POSIX record lock on a lock file beside it.

Rank 0 of a run holds the lock for all of the run's processes; a second run that wants the same
output is refused, on every one of its processes, with a one-line ``DataError`` naming the
process that holds it. A record lock (``lockf``), not ``flock``: forked DataLoader workers do not
inherit it, so a killed run frees it at once instead of when its orphaned workers exit. The
lock file is removed when the holder is done.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from sca_caption.data.errors import DataError
from sca_caption.distributed import Processes


@contextmanager
def exclusive(lock: Path, processes: Processes, busy: str) -> Iterator[None]:
    """Hold ``lock`` while the block runs; ``busy``: the refusal's message (the holder's process
    id is added to it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+") if processes.is_main else None  # "a+": never truncate a holder's id
    try:
        if not processes.main_says(handle is not None and _locked(handle)):
            holder = _holder(handle)
            raise DataError(f"{busy} (process {holder})" if holder else busy)
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        try:
            yield
        finally:
            if handle is not None:
                lock.unlink(missing_ok=True)
    finally:
        if handle is not None:
            handle.close()


def _locked(handle: IO[str]) -> bool:
    """Whether this process took the lock on ``handle`` (False: another process holds it)."""
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder(handle: IO[str] | None) -> str:
    """The process id the holder wrote into the lock file, or "" where it cannot be read."""
    if handle is None:
        return ""
    handle.seek(0)
    return handle.read().strip()
