"""Corpus readers: Karpathy JSON, native Flickr8k, COCO captions, ``load_corpus``, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sca_caption.data import image_listing
from sca_caption.data.coco import read_coco_captions
from sca_caption.data.datasets import FLICKR30K_FORM, load_corpus
from sca_caption.data.errors import BadInputReport, DataError
from sca_caption.data.flickr8k import SPLIT_FILES, TOKEN_FILE, read_flickr8k
from sca_caption.data.karpathy import read_karpathy
from sca_caption.data.tokenize import tokenize


def flickr8k_native(root: Path, **kwargs) -> list:
    split_files = {split: root / name for split, name in SPLIT_FILES.items()}
    return read_flickr8k(root / TOKEN_FILE, split_files, root / "Flicker8k_Dataset", **kwargs)


# --- the real data ---------------------------------------------------------------------------


def test_flickr8k_reads_the_same_both_ways(shared_data: Path):
    root = shared_data / "flickr8k"
    from_json = read_karpathy(root / "dataset_flickr8k.json", root / "Flicker8k_Dataset")
    report = BadInputReport()
    native = flickr8k_native(root, on_bad="skip", report=report)
    assert len(from_json) == 8000
    assert [sum(r.split == s for r in native) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert native == from_json  # same ids, paths, splits, raw captions and tokens, same order
    assert all(len(r.raw) == 5 for r in native)
    assert [str(s) for s in report.skipped] == [
        f"{root / TOKEN_FILE}, line 6731: captions for image '2258277193_586949ec62.jpg.1', "
        f"which is not in {root / 'Flicker8k_Dataset'}"
    ]
    assert any("91 captioned images are in no split list" in note for note in report.notes)
    assert load_corpus("flickr8k", root) == from_json


def test_flickr8k_token_file_quirk_is_an_error_naming_the_line(shared_data: Path):
    with pytest.raises(DataError) as info:
        flickr8k_native(shared_data / "flickr8k")
    message = str(info.value)
    assert "Flickr8k.token.txt, line 6731" in message and "2258277193_586949ec62.jpg.1" in message
    assert "\n" not in message


def test_coco_mini_reads_80_images_and_400_captions(shared_data: Path):
    root = shared_data / "coco-mini"
    records = read_coco_captions(root / "annotations" / "captions_train2017.json", root / "train2017", "train")
    assert len(records) == 80 and sum(len(r.raw) for r in records) == 400
    assert all(r.split == "train" and r.path.is_file() and r.image_id.isdigit() for r in records)
    assert all(r.path.name == f"{int(r.image_id):012d}.jpg" for r in records)
    assert load_corpus("coco", root) == records


# --- a tiny native Flickr8k built per test ---------------------------------------------------

TOKEN_LINES = [
    "a.jpg#0\tA dog runs .",
    "a.jpg#1\tThe dog is brown",
    "b.jpg#0\tA cat sits on a mat .",
    "c.jpg#0\tTwo birds fly .",
]


def write_flickr8k(root: Path, token_lines=TOKEN_LINES, train=("a.jpg", "b.jpg"), val=("c.jpg",), images="abc") -> Path:
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    for stem in images:
        (root / "Flicker8k_Dataset" / f"{stem}.jpg").write_bytes(b"jpeg")
    (root / TOKEN_FILE).write_text("\n".join(token_lines) + "\n")
    for split, names in (("train", train), ("val", val), ("test", ())):
        (root / SPLIT_FILES[split]).write_text("".join(f"{n}\n" for n in names))
    return root


def test_native_flickr8k_reads_captions_in_index_order(tmp_path: Path):
    root = write_flickr8k(tmp_path, token_lines=[TOKEN_LINES[1], *TOKEN_LINES[2:], TOKEN_LINES[0]])
    records = flickr8k_native(root)
    assert [(r.image_id, r.split) for r in records] == [("a", "train"), ("b", "train"), ("c", "val")]
    assert records[0].raw == ("A dog runs .", "The dog is brown")
    assert records[0].tokens == (("a", "dog", "runs"), ("the", "dog", "is", "brown"))
    assert records[0].path == root / "Flicker8k_Dataset" / "a.jpg"


@pytest.mark.parametrize(
    "change, file, line, problem",
    [
        ({"token_lines": [*TOKEN_LINES, "c.jpg#1 no tab here"]}, TOKEN_FILE, 5, "expected 'NAME.jpg#K<TAB>caption'"),
        ({"token_lines": [*TOKEN_LINES, "c.jpg\tno index"]}, TOKEN_FILE, 5, "expected 'NAME.jpg#K<TAB>caption'"),
        ({"token_lines": [*TOKEN_LINES, "c.jpg#1\t . , "]}, TOKEN_FILE, 5, "empty caption for 'c.jpg'"),
        ({"token_lines": [*TOKEN_LINES, "c.jpg#0\tagain"]}, TOKEN_FILE, 5, "caption #0 of 'c.jpg' appears twice"),
        ({"token_lines": [*TOKEN_LINES, "d.jpg#0\tghost"]}, TOKEN_FILE, 5, "captions for image 'd.jpg', which is not in"),
        ({"images": "ab"}, TOKEN_FILE, 4, "captions for image 'c.jpg', which is not in"),
        ({"val": ("c.jpg", "e.jpg")}, SPLIT_FILES["val"], 2, "split entry 'e.jpg' has no captions"),
        ({"val": ("c.jpg", "a.jpg")}, SPLIT_FILES["val"], 2, "'a.jpg' is also listed in"),
    ],
)
def test_native_flickr8k_bad_input_errors_or_is_skipped_and_counted(tmp_path: Path, change, file, line, problem):
    root = write_flickr8k(tmp_path, **change)
    with pytest.raises(DataError) as info:
        flickr8k_native(root)
    assert str(info.value).startswith(f"{root / file}, line {line}: {problem}")
    assert "\n" not in str(info.value)

    report = BadInputReport()
    records = flickr8k_native(root, on_bad="skip", report=report)
    assert len(report) == 1 and report.skipped[0].line == line and problem in report.skipped[0].problem
    assert "skipped 1 bad input entry" in report.summary()
    good = {"a", "b", "c"} - ({"c"} if change.get("images") == "ab" else set())
    assert {r.image_id for r in records} == good
    assert sum(len(r.raw) for r in records) == 4 - (1 if "c" not in good else 0)


def test_image_existence_is_checked_with_one_listing_per_folder(tmp_path: Path, monkeypatch):
    root = write_flickr8k(tmp_path)
    calls = []
    real_scandir = os.scandir

    def counting_scandir(path):
        calls.append(Path(path))
        return real_scandir(path)

    monkeypatch.setattr(image_listing.os, "scandir", counting_scandir)
    assert len(flickr8k_native(root)) == 3
    assert calls == [root / "Flicker8k_Dataset"]


def test_skip_without_a_report_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="BadInputReport"):
        flickr8k_native(write_flickr8k(tmp_path), on_bad="skip")


# --- Karpathy JSON ---------------------------------------------------------------------------


def karpathy_entry(filename: str, split: str, *raws: str, **extra) -> dict:
    sentences = [{"raw": r, "tokens": list(tokenize(r))} for r in raws]
    return {"filename": filename, "split": split, "sentences": sentences, **extra}


def write_karpathy(root: Path, images: list, folders=("train2014", "val2014")) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image in images:
        if isinstance(image, dict) and "filename" in image:
            (root / image.get("filepath", "") / image["filename"]).write_bytes(b"jpeg")
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


COCO_STYLE = [
    karpathy_entry("COCO_val2014_3.jpg", "test", "c", filepath="val2014", cocoid=3),
    karpathy_entry("COCO_val2014_2.jpg", "restval", "b", filepath="val2014", cocoid=2),
    karpathy_entry("COCO_train2014_1.jpg", "train", "a", filepath="train2014", cocoid=1),
    karpathy_entry("COCO_val2014_4.jpg", "val", "d", filepath="val2014", cocoid=4),
]


def test_karpathy_reader_resolves_filepath_ids_and_restval(tmp_path: Path):
    path = write_karpathy(tmp_path, COCO_STYLE)
    records = read_karpathy(path, tmp_path)
    assert [(r.image_id, r.split) for r in records] == [("1", "train"), ("2", "train"), ("4", "val"), ("3", "test")]
    assert records[1].path == tmp_path / "val2014" / "COCO_val2014_2.jpg"
    assert records[0].raw == ("a",) and records[0].tokens == (("a",),)

    report = BadInputReport()
    kept_out = read_karpathy(path, tmp_path, merge_restval=False, on_bad="skip", report=report)
    assert [r.image_id for r in kept_out] == ["1", "4", "3"]
    assert len(report) == 0 and report.notes == [f"{path}: 1 restval images left out"]


def test_karpathy_reader_tokenises_raw_when_tokens_are_absent(tmp_path: Path):
    entry = {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "A Red-Car."}]}
    path = write_karpathy(tmp_path, [entry], folders=())
    assert read_karpathy(path, tmp_path)[0].tokens == (("a", "red", "car"),)


@pytest.mark.parametrize(
    "bad_entry, problem, kept",
    [
        ({"split": "train", "sentences": []}, "images[4]: missing key 'filename'", 4),
        (karpathy_entry("e.jpg", "train", " . ", "fine"), "images[4] (e.jpg).sentences[0]: empty caption", 5),
        (karpathy_entry("e.jpg", "train"), "images[4] (e.jpg): no captions", 4),
        (karpathy_entry("e.jpg", "dev", "x"), "images[4]: unknown split 'dev'", 4),
        (karpathy_entry("COCO_val2014_4.jpg", "val", "x", filepath="val2014", cocoid=4), "image id '4' appears twice", 4),
    ],
)
def test_karpathy_bad_entries_error_or_are_skipped(tmp_path: Path, bad_entry, problem, kept):
    path = write_karpathy(tmp_path, [*COCO_STYLE, bad_entry])
    with pytest.raises(DataError) as info:
        read_karpathy(path, tmp_path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)
    report = BadInputReport()
    assert len(read_karpathy(path, tmp_path, on_bad="skip", report=report)) == kept
    assert len(report) == 1 and problem in str(report.skipped[0])


def test_karpathy_missing_image_file(tmp_path: Path):
    path = write_karpathy(tmp_path, COCO_STYLE)
    (tmp_path / "val2014" / "COCO_val2014_4.jpg").unlink()
    with pytest.raises(DataError, match=r"images\[3\] \(COCO_val2014_4.jpg\): image file .* not found"):
        read_karpathy(path, tmp_path)


def test_karpathy_malformed_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",\n  oops}\n]}')
    with pytest.raises(DataError, match=r"dataset_flickr8k.json, line 3: malformed JSON"):
        read_karpathy(path, tmp_path)
    path.write_text('{"imgs": []}')
    with pytest.raises(DataError, match=r"dataset_flickr8k.json: top level: missing key 'images'"):
        read_karpathy(path, tmp_path)


# --- COCO captions JSON ----------------------------------------------------------------------


def write_coco(root: Path, images: list, annotations: list) -> Path:
    (root / "train2017").mkdir(parents=True)
    for image in images:
        (root / "train2017" / image["file_name"]).write_bytes(b"jpeg")
    path = root / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


COCO_IMAGES = [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 10, "file_name": "000000000010.jpg"}]
COCO_CAPTIONS = [
    {"image_id": 10, "id": 1, "caption": "A man riding a horse."},
    {"image_id": 9, "id": 2, "caption": " Two plates of food.\n"},
    {"image_id": 10, "id": 3, "caption": "A horse with a rider"},
]


def test_coco_reader_groups_captions_by_image(tmp_path: Path):
    path = write_coco(tmp_path, COCO_IMAGES, COCO_CAPTIONS)
    records = read_coco_captions(path, tmp_path / "train2017", "val")
    assert [(r.image_id, r.split, len(r.raw)) for r in records] == [("10", "val", 2), ("9", "val", 1)]
    assert records[1].raw == ("Two plates of food.",)
    assert records[0].tokens[1] == ("a", "horse", "with", "a", "rider")


@pytest.mark.parametrize(
    "images, annotations, problem, kept",
    [
        (COCO_IMAGES, [*COCO_CAPTIONS, {"image_id": 9, "caption": " ! "}], "annotations[3]: empty caption", 2),
        (COCO_IMAGES, [*COCO_CAPTIONS, {"caption": "no image"}], "annotations[3]: missing key 'image_id'", 2),
        (COCO_IMAGES, [*COCO_CAPTIONS, {"image_id": 77, "caption": "x"}], "image id 77, which is not in 'images'", 2),
        ([*COCO_IMAGES, {"id": 11, "file_name": "11.jpg"}], COCO_CAPTIONS, "image 11 (11.jpg) has no captions", 2),
        ([*COCO_IMAGES, {"file_name": "12.jpg"}], COCO_CAPTIONS, "images[2]: missing key 'id'", 2),
    ],
)
def test_coco_bad_entries_error_or_are_skipped(tmp_path: Path, images, annotations, problem, kept):
    path = write_coco(tmp_path, images, annotations)
    with pytest.raises(DataError) as info:
        read_coco_captions(path, tmp_path / "train2017", "train")
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)
    report = BadInputReport()
    assert len(read_coco_captions(path, tmp_path / "train2017", "train", on_bad="skip", report=report)) == kept
    assert len(report) == 1


def test_coco_missing_image_file_and_folder(tmp_path: Path):
    path = write_coco(tmp_path, COCO_IMAGES, COCO_CAPTIONS)
    (tmp_path / "train2017" / "000000000009.jpg").unlink()
    with pytest.raises(DataError, match="image 9: image file .*000000000009.jpg not found"):
        read_coco_captions(path, tmp_path / "train2017", "train")
    with pytest.raises(DataError, match="val2017: image folder not found"):
        read_coco_captions(path, tmp_path / "val2017", "train")


# --- load_corpus -----------------------------------------------------------------------------


def test_load_corpus_prefers_karpathy_and_falls_back_to_native_files(tmp_path: Path):
    root = write_flickr8k(tmp_path / "flickr8k")
    native = load_corpus("flickr8k", root)
    assert [r.image_id for r in native] == ["a", "b", "c"]
    entries = [karpathy_entry(f"{r.image_id}.jpg", "test", *r.raw) for r in native]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    assert [r.split for r in load_corpus("flickr8k", root)] == ["test"] * 3


def test_load_corpus_missing_dataset_says_what_it_looked_for(tmp_path: Path, monkeypatch):
    with pytest.raises(DataError) as info:
        load_corpus("flickr8k", tmp_path)
    message = str(info.value)
    assert message.startswith(f"no flickr8k dataset in {tmp_path}: looked for dataset_flickr8k.json")
    assert TOKEN_FILE in message and SPLIT_FILES["train"] in message
    assert message.endswith(f"get it with `python preprocess/download.py --dataset flickr8k --root {tmp_path}` (or train with --download)")
    with pytest.raises(DataError, match="captions_train2014.json.*preprocess/download.py --dataset coco"):
        load_corpus("coco", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no flickr30k dataset in data/flickr30k: looked for dataset_flickr30k.json") as info:
        load_corpus("flickr30k")
    message = str(info.value)
    assert "python preprocess/download.py --dataset flickr30k --root data/flickr30k" in message
    assert FLICKR30K_FORM in message and "data/flickr30k/flickr30k-images/" in message and "\n" not in message
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_corpus("mnist", tmp_path)
