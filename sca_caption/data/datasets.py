"""One entry point for every caption corpus: ``load_corpus(name, data_root)``.

A Karpathy split file ``dataset_<name>.json`` under the data root is preferred; otherwise the
dataset's native files are read (Flickr8k token and split files; COCO caption annotations).
``shapes`` is generated into its data root the first time it is asked for. Every "no dataset"
error ends with ``how_to_get``: the download command, and for Flickr30k where its images come from.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable

from sca_caption.data import coco, flickr8k, shapes
from sca_caption.data.corpus import ImageRecord
from sca_caption.data.errors import BadInputReport, DataError
from sca_caption.data.karpathy import read_karpathy
from sca_caption.io_utils import name_problem

CORPORA = ("shapes", "flickr8k", "flickr30k", "coco")
FLICKR30K_IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images", "images")
COCO_ANNOTATIONS = {  # year -> split -> (annotation file under annotations/, image folder)
    "2014": {"train": ("captions_train2014.json", "train2014"), "val": ("captions_val2014.json", "val2014")},
    "2017": {"train": ("captions_train2017.json", "train2017"), "val": ("captions_val2017.json", "val2017")},
}
FLICKR30K_FORM = "https://shannon.cs.illinois.edu/DenotationGraph/"  # Flickr30k's images: a request form


def default_data_root(name: str) -> Path:
    """``data/<name>`` under the current directory."""
    return Path("data") / name


def karpathy_file(name: str, data_root: Path) -> Path:
    """Where the Karpathy split file of the corpus ``name`` is looked for."""
    return data_root / f"dataset_{name}.json"


def how_to_get(name: str, data_root: Path) -> str:
    """How to get dataset ``name`` into ``data_root``: the end of every "no dataset" error."""
    if name == "shapes":
        return shapes.how_to_make(data_root, default_data_root(name))
    command = f"`python preprocess/download.py --dataset {name} --root {shlex.quote(str(data_root))}`"
    if name == "flickr30k":
        return f"{command} fetches {karpathy_file(name, data_root).name}; {flickr30k_images_hint(data_root)}"
    return f"get it with {command} (or train with --download)"


def flickr30k_images_hint(data_root: Path) -> str:
    """Where Flickr30k's images come from (they cannot be downloaded automatically) and where they go."""
    return (
        f"Flickr30k's images are only given out through the request form at {FLICKR30K_FORM}: "
        f"put the .jpg files in {data_root / FLICKR30K_IMAGE_FOLDERS[0]}/, beside {karpathy_file('flickr30k', data_root).name}"
    )


def load_corpus(
    name: str,
    data_root: Path | None = None,
    *,
    on_bad: str = "error",
    report: BadInputReport | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[ImageRecord]:
    """The records of corpus ``name`` (one of ``CORPORA``), sorted by split then image id.

    data_root: the dataset's folder (default ``data/<name>``). on_bad / report: see ``errors``.
    A missing dataset is a ``DataError`` saying which files were looked for, and where. ``log``
    hears one line when the shapes dataset is generated (or generated again).
    """
    if name not in CORPORA:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(CORPORA)}")
    root = Path(data_root) if data_root is not None else default_data_root(name)
    karpathy = karpathy_file(name, root)
    problem = name_problem(karpathy)
    if problem is not None:
        raise DataError(f"{root}: no {name} dataset can be there: {problem}")
    if name == "shapes":
        stale = shapes.stale_dataset(karpathy)
        if stale is not None:  # written by an older generator: made again with its seed and counts
            log(f"{karpathy}: written by an older shapes generator; generating the dataset again")
            shapes.generate_shapes(root, **stale)
        elif not karpathy.exists() and root == default_data_root(name):  # a data root given is never made
            log(f"generating the shapes dataset in {root}")
            shapes.generate_shapes(root)
    if karpathy.exists():
        return read_karpathy(karpathy, _karpathy_image_root(name, root), on_bad=on_bad, report=report)
    if name == "flickr8k":
        return _load_native_flickr8k(root, on_bad, report)
    if name == "coco":
        return _load_native_coco(root, on_bad, report)
    raise DataError(f"no {name} dataset in {root}: looked for {karpathy.name}; {how_to_get(name, root)}")


def _karpathy_image_root(name: str, root: Path) -> Path:
    """The folder a Karpathy file's image paths are relative to (COCO and shapes name a subfolder)."""
    if name == "flickr8k":
        return _first_folder(name, root, flickr8k.IMAGE_FOLDERS)
    if name == "flickr30k":
        return _first_folder(name, root, FLICKR30K_IMAGE_FOLDERS)
    return root


def _first_folder(name: str, root: Path, candidates: tuple[str, ...]) -> Path:
    for folder in candidates:
        if (root / folder).is_dir():
            return root / folder
    hint = flickr30k_images_hint(root) if name == "flickr30k" else how_to_get(name, root)
    raise DataError(f"{root}: no image folder (looked for {', '.join(candidates)}); {hint}")


def _load_native_flickr8k(root: Path, on_bad: str, report: BadInputReport | None) -> list[ImageRecord]:
    needed = (flickr8k.TOKEN_FILE, *flickr8k.SPLIT_FILES.values())
    if not all((root / f).is_file() for f in needed):
        raise DataError(
            f"no flickr8k dataset in {root}: looked for {karpathy_file('flickr8k', root).name}, "
            f"or {', '.join(needed)}; {how_to_get('flickr8k', root)}"
        )
    split_files = {split: root / f for split, f in flickr8k.SPLIT_FILES.items()}
    image_dir = _first_folder("flickr8k", root, flickr8k.IMAGE_FOLDERS)
    return flickr8k.read_flickr8k(root / flickr8k.TOKEN_FILE, split_files, image_dir, on_bad=on_bad, report=report)


def _load_native_coco(root: Path, on_bad: str, report: BadInputReport | None) -> list[ImageRecord]:
    """The train and val annotation files of the first year (2014, then 2017) that has any."""
    for splits in COCO_ANNOTATIONS.values():
        present = {s: (a, d) for s, (a, d) in splits.items() if (root / "annotations" / a).is_file()}
        if present:
            records: list[ImageRecord] = []
            for split, (annotation_file, image_folder) in present.items():
                records += coco.read_coco_captions(
                    root / "annotations" / annotation_file, root / image_folder, split, on_bad=on_bad, report=report
                )
            return records
    looked_for = [f"annotations/{a}" for splits in COCO_ANNOTATIONS.values() for a, _ in splits.values()]
    raise DataError(
        f"no coco dataset in {root}: looked for {karpathy_file('coco', root).name}, or {', '.join(looked_for)}; "
        f"{how_to_get('coco', root)}"
    )
