"""Validate early and completely (issue #16, RELIABILITY.md): a bad ``--device`` or decoding flag is
a usage error in every command before any work, and the device "cuda" names GPU 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import tiny_shapes  # noqa: F401

from sca_caption import caption, evaluate, export, train
from sca_caption.data.shapes import generate_shapes
from sca_caption.distributed import start_processes
from sca_caption.serve import __main__ as serve

COMMANDS = {
    "train": lambda out, device: train.main(["--dataset", "shapes", "--out", str(out), "--device", device]),
    "evaluate": lambda out, device: evaluate.main(["--checkpoint", str(out / "best.pt"), "--device", device]),
    "caption": lambda out, device: caption.main(["--checkpoint", str(out / "best.pt"), "--device", device, "x.jpg"]),
    "serve": lambda out, device: serve.main(["--checkpoint", str(out / "best.pt"), "--device", device]),
}
BAD = {"banana": "is not a device name", "meta": "only cpu and cuda devices", "cuda:0": "CUDA is not available"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device", sorted(BAD))
def test_a_bad_device_is_a_one_line_usage_error_before_any_work(command, device, tmp_path: Path, capsys, monkeypatch):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    monkeypatch.chdir(tmp_path)  # nothing may be written: not even data/ or checkpoints/
    with pytest.raises(SystemExit) as stop:
        COMMANDS[command](tmp_path / "run", device)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and BAD[device] in err[-1] and "--device" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == []


DECODING = {
    "evaluate": lambda out, flags: evaluate.main(["--checkpoint", str(out / "best.pt"), *flags]),
    "caption": lambda out, flags: caption.main(["--checkpoint", str(out / "best.pt"), *flags, "x.jpg"]),
    "export": lambda out, flags: export.main([str(out / "best.pt"), str(out / "model.pt"), *flags]),
}
BAD_DECODING = {
    ("--beam", "0"): "argument --beam: 0 is below 1",
    ("--beam", "three"): "argument --beam: 'three' is not an integer",
    ("--min-length", "-1"): "argument --min-length: -1 is below 0",
    ("--length-alpha", "-0.5"): "argument --length-alpha: -0.5 is below 0.0",
    ("--length-alpha", "nan"): "argument --length-alpha: 'nan' is not a finite number",
    ("--length-penalty", "long"): "argument --length-penalty: invalid choice: 'long'",
}


@pytest.mark.parametrize("command", sorted(DECODING))
@pytest.mark.parametrize("flags", sorted(BAD_DECODING))
def test_a_bad_decoding_flag_is_a_one_line_usage_error_before_any_work(command, flags, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        DECODING[command](tmp_path / "run", list(flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and BAD_DECODING[flags] in err[-1], err
    assert list(tmp_path.iterdir()) == []


def test_device_cuda_without_an_index_is_gpu_0(monkeypatch):
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("cuda", "cuda:1"):
        assert start_processes(name).device == chosen[-1]
    assert chosen == [torch.device("cuda", 0), torch.device("cuda", 1)]


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_without_last_pt_is_refused_before_any_extraction(tiny_shapes, tmp_path: Path, capsys):
    cache = tmp_path / "features" / "fresh.h5"
    settings = tiny_shapes.overrides(data__feature_cache=str(cache))
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"), "--resume", *settings]) == 2
    assert f"{tmp_path / 'run' / 'last.pt'}: nothing to resume" in _error_line(capsys)
    assert not cache.parent.exists(), "features were extracted for a run that could not start"


@pytest.mark.parametrize("role", ["val_split", "test_split"])
def test_validating_or_testing_on_the_training_split_is_refused(tiny_shapes, tmp_path: Path, capsys, role):
    settings = tiny_shapes.overrides(**{f"data__{role}": "train"})
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"), *settings]) == 2
    assert f"data.{role} is 'train', the training split" in _error_line(capsys)


def test_an_empty_split_is_refused_naming_it_before_extraction(tmp_path: Path, capsys):
    root = tmp_path / "shapes"
    generate_shapes(root, seed=0, counts={"train": 12, "val": 4, "test": 0})
    cache = tmp_path / "features" / "shapes.h5"
    settings = [f"data.data_root={root}", f"data.feature_cache={cache}", "train.meteor=false"]
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(tmp_path / "run"), *settings]) == 2
    assert f"{root}: the shapes split 'test' (data.test_split) has no images" in _error_line(capsys)
    assert not cache.exists() and not (tmp_path / "run").exists()
