"""Reader for the native Flickr8k files: ``Flickr8k.token.txt`` and the three split lists.

The token file has one caption a line, ``NAME.jpg#K<TAB>caption`` (K = 0..4). A split list has one
image file name a line. Captioned images that are in no split list are left out (and noted).
The real file has a quirk: five captions for ``2258277193_586949ec62.jpg.1``, an image that does
not exist; like any caption of a missing image it is a bad entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from sca_caption.data.corpus import SPLITS, ImageRecord, sort_records
from sca_caption.data.errors import BadInputPolicy, BadInputReport
from sca_caption.data.image_listing import ImageFolderIndex
from sca_caption.data.input_files import read_text
from sca_caption.data.tokenize import tokenize

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images")


@dataclass
class _Captions:
    """The captions of one image in the token file, keyed by their index K."""

    first_line: int
    by_index: dict[int, tuple[str, tuple[str, ...]]]


def read_flickr8k(
    token_file: Path,
    split_files: Mapping[str, Path],
    image_dir: Path,
    *,
    on_bad: str = "error",
    report: BadInputReport | None = None,
) -> list[ImageRecord]:
    """The images named in the split lists, with their captions, sorted by split then image id.

    split_files: split name (train/val/test) -> list file.
    """
    unknown = set(split_files) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected some of {SPLITS}")
    policy = BadInputPolicy(on_bad, report)
    folders = ImageFolderIndex()
    captions = _read_token_file(token_file, policy)
    missing = {name for name in captions if not folders.exists(image_dir / name)}
    for name in sorted(missing, key=lambda n: captions[n].first_line):
        policy.bad(token_file, f"captions for image {name!r}, which is not in {image_dir}", captions[name].first_line)
        del captions[name]

    records: dict[str, ImageRecord] = {}
    listed_in: dict[str, Path] = {}
    for split, list_file in split_files.items():
        for line_number, name in _read_list(list_file):
            if name in listed_in:
                policy.bad(list_file, f"{name!r} is also listed in {listed_in[name]}", line_number)
                continue
            listed_in[name] = list_file
            if name in missing:
                continue  # its captions were already reported as those of a missing image
            if name not in captions:
                policy.bad(list_file, f"split entry {name!r} has no captions in {token_file.name}", line_number)
                continue
            ordered = [captions[name].by_index[k] for k in sorted(captions[name].by_index)]
            raw = tuple(r for r, _ in ordered)
            tokens = tuple(t for _, t in ordered)
            records[name] = ImageRecord(Path(name).stem, image_dir / name, split, raw, tokens)
    unlisted = len(set(captions) - set(listed_in))
    if unlisted:
        policy.note(f"{token_file}: {unlisted} captioned images are in no split list; left out")
    return sort_records(records.values())


def _read_token_file(token_file: Path, policy: BadInputPolicy) -> dict[str, _Captions]:
    """Image file name -> its captions; malformed lines, empty captions and repeated indices are bad."""
    captions: dict[str, _Captions] = {}
    for line_number, line in _lines(token_file):
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.partition("#")
        if not tab or not hash_sign or not index.isdigit() or not name:
            policy.bad(token_file, "expected 'NAME.jpg#K<TAB>caption'", line_number)
            continue
        tokens = tokenize(caption)
        if not tokens:
            policy.bad(token_file, f"empty caption for {name!r}", line_number)
            continue
        entry = captions.setdefault(name, _Captions(line_number, {}))
        if int(index) in entry.by_index:
            policy.bad(token_file, f"caption #{index} of {name!r} appears twice", line_number)
            continue
        entry.by_index[int(index)] = (caption, tokens)
    return captions


def _read_list(list_file: Path) -> list[tuple[int, str]]:
    """``(line number, image name)`` for every non-blank line of a split list."""
    return [(n, line.strip()) for n, line in _lines(list_file)]


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(1-based line number, line without its line ending)`` for every non-blank line."""
    return [(n, line) for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]
