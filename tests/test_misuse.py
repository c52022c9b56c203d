"""Misuse that must not lose data (RELIABILITY.md lists each case): two runs into one output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from paused_train import PAUSED
from sca_caption import train
from train_support import TinyShapes, subprocess_env, tiny_shapes, train_command  # noqa: F401

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
