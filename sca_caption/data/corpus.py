"""The normalised caption corpus every dataset reader produces and every later stage reads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its reference captions.

    image_id: stable identifier (file name stem for Flickr, the numeric id as text for COCO).
    path: the image file.
    split: one of ``SPLITS``.
    raw: the captions as written in the source.
    tokens: the same captions tokenised (lowercase words, punctuation dropped), one tuple each.
    """

    image_id: str
    path: Path
    split: str
    raw: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]


def records_in_split(records: Iterable[ImageRecord], split: str) -> list[ImageRecord]:
    """The records of one split, in corpus order."""
    return [r for r in records if r.split == split]


def images_hash(records: Sequence[ImageRecord]) -> str:
    """A short hash of the image ids and file names, in order: what a feature cache is made from
    besides its backbone (not the captions: a caption-only change keeps the cache)."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.image_id, r.path.name]).encode())
    return digest.hexdigest()[:16]


def corpus_hash(records: Sequence[ImageRecord]) -> str:
    """A short hash of image ids, file names, splits and tokens: names the corpus a vocabulary was built from."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.image_id, r.path.name, r.split, r.tokens]).encode())
    return digest.hexdigest()[:16]


def sort_records(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Records in the corpus order every reader returns: by split (train, val, test), then image id."""
    return sorted(records, key=lambda r: (SPLITS.index(r.split), r.image_id))
