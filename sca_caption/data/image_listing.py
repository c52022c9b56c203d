"""Cheap image-exists checks: one directory listing per folder instead of one stat per image."""

from __future__ import annotations

import os
from pathlib import Path

from sca_caption.data.errors import DataError


class ImageFolderIndex:
    """Answers "is this image file there?" from a single ``os.scandir`` of each folder asked about."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def exists(self, path: Path) -> bool:
        """Whether ``path`` names a file in its folder; a missing folder is a ``DataError``."""
        return path.name in self._listing(path.parent)

    def _listing(self, folder: Path) -> frozenset[str]:
        if folder not in self._names:
            try:
                with os.scandir(folder) as entries:
                    self._names[folder] = frozenset(e.name for e in entries if not e.is_dir())
            except FileNotFoundError:
                raise DataError(f"{folder}: image folder not found") from None
            except NotADirectoryError:
                raise DataError(f"{folder}: expected an image folder, found a file") from None
        return self._names[folder]
