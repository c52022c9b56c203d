"""Reader for COCO caption annotation files (``annotations/captions_{train,val}{2014,2017}.json``).

Layout: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
One file is one split, so the caller says which. Image ids are COCO's numeric ids, as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sca_caption.data.corpus import SPLITS, ImageRecord, sort_records
from sca_caption.data.errors import BadInputPolicy, BadInputReport, DataError
from sca_caption.data.image_listing import ImageFolderIndex
from sca_caption.data.input_files import object_problem, read_json
from sca_caption.data.tokenize import tokenize


def read_coco_captions(
    annotation_file: Path,
    image_dir: Path,
    split: str,
    *,
    on_bad: str = "error",
    report: BadInputReport | None = None,
) -> list[ImageRecord]:
    """Every image of the file with its captions (in file order), sorted by image id."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    policy = BadInputPolicy(on_bad, report)
    data = read_json(annotation_file)
    problem = object_problem(data, ("images", "annotations"), "top level")
    for key in ("images", "annotations"):
        if problem is None and not isinstance(data[key], list):
            problem = f"{key!r} is not a list"
    if problem is not None:
        raise DataError(f"{annotation_file}: {problem}")

    file_names = _image_file_names(annotation_file, data["images"], policy)
    captions = _captions_by_image(annotation_file, data["annotations"], file_names, policy)
    folders = ImageFolderIndex()
    records = []
    for image_id, file_name in file_names.items():
        if image_id not in captions:
            policy.bad(annotation_file, f"image {image_id} ({file_name}) has no captions")
            continue
        path = image_dir / file_name
        if not folders.exists(path):
            policy.bad(annotation_file, f"image {image_id}: image file {path} not found")
            continue
        raw = tuple(r for r, _ in captions[image_id])
        tokens = tuple(t for _, t in captions[image_id])
        records.append(ImageRecord(str(image_id), path, split, raw, tokens))
    return sort_records(records)


def _image_file_names(annotation_file: Path, images: list[Any], policy: BadInputPolicy) -> dict[int, str]:
    """COCO image id -> file name."""
    file_names: dict[int, str] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        problem = object_problem(image, ("id", "file_name"), where)
        if problem is None and not isinstance(image["id"], int):
            problem = f"{where}: 'id' is not an integer"
        if problem is None and image["id"] in file_names:
            problem = f"{where}: image id {image['id']} appears twice"
        if problem is not None:
            policy.bad(annotation_file, problem)
            continue
        file_names[image["id"]] = str(image["file_name"])
    return file_names


def _captions_by_image(
    annotation_file: Path, annotations: list[Any], file_names: dict[int, str], policy: BadInputPolicy
) -> dict[int, list[tuple[str, tuple[str, ...]]]]:
    """COCO image id -> ``(raw, tokens)`` for each of its captions, in file order."""
    captions: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        problem = object_problem(annotation, ("image_id", "caption"), where)
        if problem is None and not isinstance(annotation["caption"], str):
            problem = f"{where}: 'caption' is not a string"
        if problem is None and not (isinstance(annotation["image_id"], int) and annotation["image_id"] in file_names):
            problem = f"{where}: caption for image id {annotation['image_id']!r}, which is not in 'images'"
        tokens = tokenize(annotation["caption"]) if problem is None else ()
        if problem is None and not tokens:
            problem = f"{where}: empty caption"
        if problem is not None:
            policy.bad(annotation_file, problem)
            continue
        captions.setdefault(annotation["image_id"], []).append((annotation["caption"].strip(), tokens))
    return captions
