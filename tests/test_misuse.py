"""Misuse that must not lose data (RELIABILITY.md lists each case): two runs into one output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paused_train import PAUSED
from sca_caption import train
from sca_caption.data.datasets import load_corpus
from sca_caption.data.errors import DataError
from train_support import TinyShapes, run_train, subprocess_env, tiny_shapes, train_command  # noqa: F401

pytestmark = pytest.mark.slow


def test_a_second_training_run_into_the_same_folder_is_refused_naming_the_first(
    tiny_shapes: TinyShapes, tmp_path: Path, capsys
) -> None:
    settings = tiny_shapes.overrides()
    out = tmp_path / "run"
    command = [sys.executable, str(Path(__file__).with_name("paused_train.py")), "--pause-after", "1"]
    first = subprocess.Popen(
        command + train_command("--out", str(out), *settings)[3:], env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert first.stdout is not None
    try:
        assert any(PAUSED in line for line in first.stdout), "the first run ended before its pause"
        written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {out}: another training run is writing this folder (process {first.pid})"]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written  # nothing of the first touched
    finally:
        first.kill()
        first.wait(timeout=60)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(tmp_path / "other"), *settings]) == 0


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("to", ["the process", "its group"])  # the group: DataLoader workers too, as Ctrl-C does
def test_a_signal_mid_epoch_saves_the_step_and_says_how_to_resume(
    tiny_shapes: TinyShapes, tmp_path: Path, name: str, to: str
) -> None:
    group = to == "its group"  # small batches: the worker is still loading when the signal comes
    settings = tiny_shapes.overrides(model__dropout=0.3, data__num_workers=int(group), data__batch_size=5 if group else 30)
    whole = tmp_path / "whole"
    run_train("--out", str(whole), *settings, cwd=tmp_path)  # one thread, as the interrupted run
    out = tmp_path / "run"
    how = "--signal-group-after" if to == "its group" else "--signal-after"
    command = [sys.executable, str(Path(__file__).with_name("paused_train.py")), how, "3", name]
    stopped = subprocess.run(
        command + train_command("--out", str(out), *settings)[3:], env=subprocess_env(), capture_output=True,
        text=True, timeout=300, start_new_session=True,
    )
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: {out}: stopped by {name} after step 3; {out / 'last.pt'} holds it: continue with --resume"
    )
    assert "Traceback" not in stopped.stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["data_position"]) == (0, 3, 15 if group else 90)
    run_train("--out", str(out), "--resume", *settings, cwd=tmp_path)
    ended, wanted = torch.load(out / "last.pt", weights_only=True), torch.load(whole / "last.pt", weights_only=True)
    assert all(torch.equal(v, ended["model"][k]) for k, v in wanted["model"].items())  # as if never stopped


def test_a_shapes_run_pointed_at_another_dataset_is_never_told_to_write_there(tmp_path: Path) -> None:
    flickr = tmp_path / "shared" / "flickr8k"  # another dataset's folder, perhaps shared and read-only
    (flickr / "Flicker8k_Dataset").mkdir(parents=True)
    (flickr / "dataset_flickr8k.json").write_text("{}\n")
    with pytest.raises(DataError) as caught:
        load_corpus("shapes", flickr)
    assert str(caught.value) == (
        f"no shapes dataset in {flickr}: looked for dataset_shapes.json; {flickr} holds other files (another "
        "dataset?), so the shapes dataset does not go there: make it in a folder of its own with "
        "`python preprocess/make_shapes.py --out data/shapes` and use that data root"
    )
    assert sorted(p.name for p in flickr.iterdir()) == ["Flicker8k_Dataset", "dataset_flickr8k.json"]
