"""Reader for Karpathy split files (``dataset_flickr8k.json``, ``dataset_flickr30k.json``,
``dataset_coco.json``, and the built-in ``dataset_shapes.json``).

Layout: ``{"images": [{"filename", "split", "sentences": [{"raw", "tokens"}], "filepath"?, "cocoid"?}]}``.
``filepath`` (COCO's ``train2014``/``val2014``) is a folder under the image root. Splits are train,
val, test and COCO's ``restval``, which joins train unless asked to stay out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sca_caption.data.corpus import SPLITS, ImageRecord, sort_records
from sca_caption.data.errors import BadInputPolicy, BadInputReport, DataError
from sca_caption.data.image_listing import ImageFolderIndex
from sca_caption.data.input_files import object_problem, read_json
from sca_caption.data.tokenize import tokenize

RESTVAL = "restval"


def read_karpathy(
    json_path: Path,
    image_root: Path,
    *,
    merge_restval: bool = True,
    on_bad: str = "error",
    report: BadInputReport | None = None,
) -> list[ImageRecord]:
    """The images of a Karpathy split file, sorted by split then image id.

    image_root: the folder the file names (after ``filepath``, if any) are relative to.
    merge_restval: put ``restval`` images in train (True) or leave them out (False).
    """
    policy = BadInputPolicy(on_bad, report)
    data = read_json(json_path)
    problem = object_problem(data, ("images",), "top level")
    if problem is None and not isinstance(data["images"], list):
        problem = "'images' is not a list"
    if problem is not None:
        raise DataError(f"{json_path}: {problem}")

    folders = ImageFolderIndex()
    records: dict[str, ImageRecord] = {}
    restval_left_out = 0
    for index, entry in enumerate(data["images"]):
        where = f"images[{index}]"
        record = _read_entry(json_path, entry, where, image_root, folders, policy)
        if record is None:
            continue
        if record.split == RESTVAL:
            if not merge_restval:
                restval_left_out += 1
                continue
            record = ImageRecord(record.image_id, record.path, "train", record.raw, record.tokens)
        if record.image_id in records:
            policy.bad(json_path, f"{where}: image id {record.image_id!r} appears twice")
            continue
        records[record.image_id] = record
    if restval_left_out:
        policy.note(f"{json_path}: {restval_left_out} restval images left out")
    return sort_records(records.values())


def _read_entry(
    json_path: Path,
    entry: Any,
    where: str,
    image_root: Path,
    folders: ImageFolderIndex,
    policy: BadInputPolicy,
) -> ImageRecord | None:
    """One image entry as a record (split possibly ``restval``), or None after reporting it as bad."""
    problem = object_problem(entry, ("filename", "split", "sentences"), where)
    if problem is None and not isinstance(entry["sentences"], list):
        problem = f"{where}: 'sentences' is not a list"
    if problem is None and entry["split"] not in (*SPLITS, RESTVAL):
        problem = f"{where}: unknown split {entry['split']!r} (expected one of {(*SPLITS, RESTVAL)})"
    if problem is not None:
        policy.bad(json_path, problem)
        return None
    filename = str(entry["filename"])
    where = f"{where} ({filename})"
    path = image_root / str(entry.get("filepath", "")) / filename
    raw: list[str] = []
    tokens: list[tuple[str, ...]] = []
    for k, sentence in enumerate(entry["sentences"]):
        caption = _read_sentence(sentence, f"{where}.sentences[{k}]")
        if isinstance(caption, str):
            policy.bad(json_path, caption)
            continue
        raw.append(caption[0])
        tokens.append(caption[1])
    if not raw:
        policy.bad(json_path, f"{where}: no captions")
        return None
    if not folders.exists(path):
        policy.bad(json_path, f"{where}: image file {path} not found")
        return None
    image_id = str(entry["cocoid"]) if "cocoid" in entry else Path(filename).stem
    return ImageRecord(image_id, path, entry["split"], tuple(raw), tuple(tokens))


def _read_sentence(sentence: Any, where: str) -> tuple[str, tuple[str, ...]] | str:
    """``(raw, tokens)`` of one sentence (tokens re-derived from raw if absent), or the problem with it."""
    problem = object_problem(sentence, ("raw",), where)
    if problem is not None:
        return problem
    raw = sentence["raw"]
    if not isinstance(raw, str):
        return f"{where}: 'raw' is not a string"
    given = sentence.get("tokens")
    if given is None:
        tokens = tokenize(raw)
    elif isinstance(given, list) and all(isinstance(t, str) for t in given):
        tokens = tuple(given)
    else:
        return f"{where}: 'tokens' is not a list of strings"
    if not tokens:
        return f"{where}: empty caption"
    return raw, tokens
