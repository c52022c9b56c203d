"""A hostile user's second round (issue #26 items 9 and 12, docs/RELIABILITY.md): checks that
came too late now come before any work, and the new misuses found are one line each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from caption_support import save_tiny_checkpoint, shape_image
from train_support import TinyShapes, tiny_shapes  # noqa: F401

from sca_caption import caption, evaluate, export, train
from sca_caption.data.shapes import generate_shapes


@pytest.fixture(scope="module")
def trained(tiny_shapes: TinyShapes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch tiny run's folder."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *tiny_shapes.overrides(train__epochs=1)]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_resume_with_other_model_settings_is_refused_before_any_extraction(trained, tiny_shapes, tmp_path, capsys):
    cache = tmp_path / "features" / "stage6.h5"  # where the changed layers' features would be extracted
    settings = tiny_shapes.overrides(train__epochs=1, model__layers="[stage6]", data__feature_cache=str(cache))
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(trained), "--resume", *settings]) == 2
    assert "model.layers is ['stage7'] there, ['stage6'] here" in _error_line(capsys)
    assert not cache.parent.exists(), "features were extracted for a run that could not resume"


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_scoring_a_split_the_data_root_lacks_is_refused_before_any_extraction(command, trained, tmp_path, capsys, monkeypatch):
    root = tmp_path / "shapes"
    generate_shapes(root, seed=1, counts={"train": 4, "val": 2, "test": 0})
    monkeypatch.chdir(tmp_path)  # the default feature cache goes under data/features here
    common = ["--data-root", str(root), "--no-progress"]
    if command == "evaluate":
        code = evaluate.main(["--checkpoint", str(trained / "best.pt"), "--out", str(tmp_path / "r.json"), *common])
    else:
        code = export.main([str(trained / "best.pt"), str(tmp_path / "model.pt"), *common])
    assert code == 2
    assert f"{root}: the shapes split 'test' (--split) has no images" in _error_line(capsys)
    assert not (tmp_path / "data").exists(), "features were extracted for a split that is not there"
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "model.pt").exists()


LONG = "a" * 300  # longer than any file name may be (255 bytes): the system says "File name too long"
OUTPUTS = {
    "caption --json": lambda out: caption.main(["--checkpoint", "ck.pt", "--json", out, "x.png"]),
    "caption --attention": lambda out: caption.main(["--checkpoint", "ck.pt", "--attention", out, "x.png"]),
    "evaluate --out": lambda out: evaluate.main(["--checkpoint", "ck.pt", "--out", out]),
    "export OUT": lambda out: export.main(["ck.pt", out]),
    "train --out": lambda out: train.main(["--no-progress", "--out", out]),
    "train --resume --out": lambda out: train.main(["--no-progress", "--resume", "--out", out]),
}


@pytest.mark.parametrize("command", sorted(OUTPUTS))
@pytest.mark.parametrize("name", ["-", LONG, f"{LONG}/x.json"])
def test_an_output_named_dash_or_too_long_is_one_line_before_any_work(command, name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert OUTPUTS[command](name) == 2
    line = _error_line(capsys)
    assert ("does not mean standard output" in line) if name == "-" else ("too long for a file name" in line), line
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_a_data_root_or_feature_cache_named_too_long_is_one_line(tiny_shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dataset in ("shapes", "flickr8k", "coco"):
        assert train.main(["--no-progress", "--dataset", dataset, "--data-root", LONG]) == 2
        assert f"no {dataset} dataset can be there: it has a name of 300 bytes" in _error_line(capsys)
    settings = tiny_shapes.overrides(data__feature_cache=f"{LONG}/x.h5")
    assert train.main(["--no-progress", "--out", "run", *settings]) == 2
    assert "too long for a file name (the most is 255); the feature cache (data.feature_cache)" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_caption_reports_a_name_too_long_and_captions_the_others(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    photo = shape_image(tmp_path / "photo.png", (200, 40, 40), (20, 20, 60, 60))
    for missing in (tmp_path / f"{LONG}.png", tmp_path / f"{LONG}*.png"):  # a file, and a glob pattern
        code = caption.main(["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress", str(missing), str(photo)])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        if "*" in missing.name:
            assert code == 2 and f"{missing}: the pattern matches no file" in captured.err
        else:
            assert code == 1 and "File name too long" in captured.err and captured.out.startswith(f"{photo}\t")


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS file systems take only UTF-8 names")
def test_a_file_name_that_is_not_utf8_is_printed_and_written_escaped(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    shape_image(Path(os.fsdecode(bytes(photos) + b"/caf\xe9.png")), (200, 40, 40), (20, 20, 60, 60))  # latin-1 "café"
    out = tmp_path / "captions.json"
    assert caption.main(["--checkpoint", str(checkpoint), "--workers", "0", "--no-progress", "--json", str(out), str(photos)]) == 0
    assert capsys.readouterr().out.split("\t")[0] == f"{photos}/caf\\xe9.png"
    [entry] = json.loads(out.read_text(encoding="utf-8"))
    assert (entry["file"], entry["image_id"]) == (f"{photos}/caf\\xe9.png", "caf\\xe9")
