"""A hostile user's second round (issue #26 items 9 and 12, docs/RELIABILITY.md): checks that
came too late now come before any work, and the new misuses found are one line each."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_support import TinyShapes, tiny_shapes  # noqa: F401

from sca_caption import evaluate, export, train
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
