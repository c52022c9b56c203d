"""Output locations checked before the work (issue #16, RELIABILITY.md): every command refuses, in
one line and before it reads a model or an image, a place it could not write its output."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from caption_support import checkpoint, shape_image  # noqa: F401
from sca_caption import caption, evaluate, export, train
from sca_caption.io_utils import COCO_RESULTS, OutputError, atomic_write_text, check_output_file, check_output_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "preprocess"))
import build_vocab  # noqa: E402
import extract_features  # noqa: E402
import make_shapes  # noqa: E402

UNWRITABLE = Path("/sys/sca-caption-test")  # refused even to root


def places(tmp_path: Path) -> dict[str, Path]:
    """A file, a folder, a path under a file, and an unwritable path."""
    (tmp_path / "a_file").write_text("mine\n")
    (tmp_path / "a_folder").mkdir()
    return {
        "file": tmp_path / "a_file",
        "folder": tmp_path / "a_folder",
        "under a file": tmp_path / "a_file" / "out",
        "unwritable": UNWRITABLE / "out",
    }


MISSING_CKPT = "no-such-checkpoint.pt"  # the output check must come first: this is never opened
COMMANDS: dict[str, tuple[str, Callable[[Path], list[str]], Callable[[list[str]], int]]] = {
    # name: (what the output is: "file" or "folder", argv for an output path, main)
    "caption --json": ("file", lambda p: ["--checkpoint", MISSING_CKPT, "--json", str(p), "x.jpg"], caption.main),
    "caption --attention": ("folder", lambda p: ["--checkpoint", MISSING_CKPT, "--attention", str(p), "x.jpg"],
                            caption.main),
    "evaluate --out": ("file", lambda p: ["--checkpoint", MISSING_CKPT, "--out", str(p)], evaluate.main),
    "export OUT": ("file", lambda p: [MISSING_CKPT, str(p)], export.main),
    "train --out": ("folder", lambda p: ["--dataset", "flickr8k", "--data-root", "no-such-root", "--out", str(p)],
                    train.main),
    "build_vocab --out": ("file", lambda p: ["--dataset", "flickr8k", "--data-root", "no-such-root", "--out", str(p)],
                          build_vocab.main),
    "extract_features --out": ("file", lambda p: ["--dataset", "flickr8k", "--data-root", "no-such-root",
                                                  "--backbone", "efficientnet_lite0", "--layers", "stage7",
                                                  "--out", str(p)], extract_features.main),
    "make_shapes --out": ("folder", lambda p: ["--out", str(p), "--train", "1", "--val", "1", "--test", "1"],
                          make_shapes.main),
}
EXPECTED = {
    ("file", "folder"): "is a folder, but the",
    ("folder", "file"): "is a file, but the",
    ("file", "under a file"): "is a file, so the",
    ("folder", "under a file"): "is a file, so the",
    ("file", "unwritable"): "cannot be written in /sys",
    ("folder", "unwritable"): "cannot be written in /sys",
}


CASES = [(name, place) for name, (kind, _, _) in sorted(COMMANDS.items()) for k, place in EXPECTED if k == kind]


@pytest.mark.parametrize(("name", "place"), CASES)
def test_an_output_that_cannot_be_written_is_refused_first(name, place, tmp_path, capsys, monkeypatch):
    kind, argv, main = COMMANDS[name]
    monkeypatch.chdir(tmp_path)
    target = places(tmp_path)[place]
    assert main(argv(target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {target}: ") and EXPECTED[kind, place] in err[0], err
    assert (tmp_path / "a_file").read_text() == "mine\n" and list((tmp_path / "a_folder").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # nothing made, no data/


def test_the_checks_create_nothing_and_accept_writable_places(tmp_path):
    (tmp_path / "existing.json").write_text("x")
    check_output_file(tmp_path / "new" / "deeper" / "out.json")
    check_output_folder(tmp_path / "new" / "run")
    check_output_file(tmp_path / "existing.json")
    check_output_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json"]


def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old\n")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OutputError, match=r"results.json: not written, the file there is unchanged .*No space left"):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_caption_never_writes_its_json_or_attention_maps_over_an_input_image(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"my photo")
    (photos / "dog.jpg").write_bytes(b"my other photo")
    for argv, named in [
        (["--attention", str(photos), str(photos)], photos / "cat.png"),  # cat.png's map would be cat.png
        (["--json", str(photos / "dog.jpg"), str(photos)], photos / "dog.jpg"),
    ]:
        assert caption.main(["--checkpoint", MISSING_CKPT, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {named}: is one of the images to caption; {argv[0]} " + (
            f"{photos} would overwrite it" if argv[0] == "--attention" else "would overwrite it")]
    assert (photos / "cat.png").read_bytes() == b"my photo" and (photos / "dog.jpg").read_bytes() == b"my other photo"


def test_export_and_build_vocab_replace_only_their_own_kind_of_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    assert build_vocab.main(["--dataset", "flickr8k", "--data-root", "no-such-root", "--out", str(notes)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {notes}: exists and is not a vocabulary file; not overwritten"]
    assert export.main([MISSING_CKPT, str(notes)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {notes}: exists and is not an sca-caption checkpoint; not overwritten"
    ]
    assert export.main([str(notes), str(notes)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {notes}: is the checkpoint to export; name another model file"]
    assert notes.read_text() == '{"mine": true}\n'


def test_make_shapes_on_a_full_disk_is_one_line_and_leaves_no_partial_image(tmp_path, capsys, monkeypatch):
    real_save = Image.Image.save
    written: list[Path] = []

    def full_after_three(image, path, *args, **kwargs):
        if len(written) == 3:
            Path(path).write_bytes(b"\xff\xd8 half a JPEG")
            raise OSError(28, "No space left on device")
        written.append(Path(path))
        return real_save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_after_three)
    out = tmp_path / "shapes"
    assert make_shapes.main(["--out", str(out), "--train", "5", "--val", "1", "--test", "1"]) == 2
    fourth = out / "images" / "train_00003.jpg"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {fourth}: not written (OSError: [Errno 28] No space left on device)"
    ]
    assert sorted((out / "images").iterdir()) == written and not (out / "dataset_shapes.json").exists()


def test_caption_and_evaluate_replace_only_a_results_file_never_an_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "m.pt"
    model.write_bytes(b"PK\x03\x04 my model")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    annotations = tmp_path / "shapes" / "dataset_shapes.json"
    annotations.parent.mkdir()
    annotations.write_text('{"dataset": "shapes", "images": []}\n')
    (tmp_path / "photo.png").write_bytes(b"not read")
    for main, argv, refusal in [
        (caption.main, ["--checkpoint", str(model), "--json", str(model), "photo.png"],
         f"{model}: is the checkpoint; name another --json file"),
        (caption.main, ["--checkpoint", str(model), "--json", str(notes), "photo.png"],
         f"{notes}: exists and is not a COCO results JSON file; not overwritten"),
        (evaluate.main, ["--checkpoint", str(model), "--out", str(model)],
         f"{model}: is the checkpoint to evaluate; name another results file"),
        (evaluate.main, ["--checkpoint", str(model), "--out", str(annotations)],
         f"{annotations}: exists and is not a COCO results JSON file; not overwritten"),
    ]:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {refusal}"]
    assert model.read_bytes() == b"PK\x03\x04 my model" and notes.read_text() == "mine\n"
    assert annotations.read_text() == '{"dataset": "shapes", "images": []}\n'


def test_a_results_file_of_an_earlier_run_may_be_replaced(tmp_path):
    results = tmp_path / "results.json"
    for earlier in ("[]\n", '[\n{"image_id": "p1", "caption": "a dog", "file": "p1.jpg"}\n]\n'):
        results.write_text(earlier)
        check_output_file(results, "results file", inputs={tmp_path / "m.pt": "the checkpoint"}, replaces=COCO_RESULTS)
    for other in ("{}", '[{"caption": "no id"}]', "[1, 2]", "not json"):
        results.write_text(other)
        with pytest.raises(OutputError, match="exists and is not a COCO results JSON file; not overwritten"):
            check_output_file(results, "results file", replaces=COCO_RESULTS)


def test_caption_prints_one_record_per_image_whatever_its_name(checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = ["plain.png", "two\nlines.png", "a\ttab.png", "back\\slash.png", "cr\r.png"]
    for name in names:
        shape_image(photos / name, (200, 40, 40), (20, 20, 60, 60))
    assert caption.main(["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress", str(photos)]) == 0
    records = capsys.readouterr().out.splitlines()
    assert len(records) == len(names) and all(record.count("\t") == 1 for record in records), records
    unescape = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}
    printed = {re.sub(r"\\[\\tnr]", lambda m: unescape[m.group()], record.split("\t")[0]) for record in records}
    assert printed == {str(photos / name) for name in names}
    assert str(photos / "plain.png") in [record.split("\t")[0] for record in records]  # printed as it is


def test_train_never_writes_over_the_checkpoint_it_starts_from(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    start = run / "best.pt"
    start.write_bytes(b"the weights to start from")
    assert train.main(["--out", str(run), "--init-from", str(start)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {start}: the run would write over the checkpoint it starts from; pass another --out"
    ]
    assert start.read_bytes() == b"the weights to start from"
