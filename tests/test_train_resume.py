"""A training run SIGKILLed in the middle of an epoch and resumed with --resume ends with exactly
the weights, optimizer state and log of an uninterrupted run."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paused_train import PAUSED
from train_support import TinyShapes, run_train, subprocess_env, tiny_shapes, train_command  # noqa: F401

pytestmark = pytest.mark.slow


def _log_without_times(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a nested dict/list, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in sorted(value, key=str) for t in _tensors(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


CROSS_ENTROPY = {
    # 4 steps per epoch, 2 epochs, last.pt every 2 steps (steps 2 and 6 are mid-epoch saves);
    # validation only after the last epoch. Dropout is on: its masks must repeat too.
    "settings": dict(train__checkpoint_every=2, train__eval_every=2, model__dropout=0.3),
    "pause_after": 7, "paused_at": (1, 6, 60), "end": (2, 8),
}
SELF_CRITICAL = {
    # batches of 10: 12 cross-entropy steps, then 2 self-critical epochs of 3 steps (10, 10 and 4
    # of the 24 images, 3 samples each); killed after step 14, mid-epoch, after its checkpoint.
    "settings": dict(
        data__batch_size=10, train__epochs=3, train__scst_after=1, train__scst_samples=3, train__checkpoint_every=2,
        train__eval_every=3, model__dropout=0.3,
    ),
    "pause_after": 14, "paused_at": (1, 14, 20), "end": (3, 18),
}
VALIDATED_BY_STEPS = {
    # validation every 5 steps (12 cross-entropy steps of 10 captions, then 2 self-critical epochs
    # of 4 steps of 7 images): rows at steps 5, 10, 15 and 20; killed after step 11, so last.pt
    # holds step 10, saved with its mid-epoch validation.
    "settings": dict(
        data__batch_size=10, train__epochs=3, train__scst_after=1, train__scst_samples=3, train__scst_images=7,
        train__val_every=5, train__checkpoint_every=4, model__dropout=0.3,
    ),
    "pause_after": 11, "paused_at": (0, 10, 100), "end": (3, 20),
}


@pytest.mark.parametrize(
    "case", [CROSS_ENTROPY, SELF_CRITICAL, VALIDATED_BY_STEPS], ids=["cross_entropy", "self_critical", "val_every"]
)
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tiny_shapes: TinyShapes, tmp_path: Path, case) -> None:
    settings = tiny_shapes.overrides(**case["settings"])
    run_train("--out", "whole", *settings, cwd=tmp_path)

    command = [sys.executable, str(Path(__file__).with_name("paused_train.py")), "--pause-after", str(case["pause_after"])]
    killed = subprocess.Popen(
        command + train_command("--out", "split", *settings)[3:], cwd=tmp_path, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert killed.stdout is not None
    try:
        paused = any(PAUSED in line for line in killed.stdout)  # stops reading at the pause
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    assert paused, f"the run ended before reaching the pause after step {case['pause_after']}"
    interrupted = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (interrupted["epoch"], interrupted["step"], interrupted["data_position"]) == case["paused_at"]
    assert (tmp_path / "split" / "best.pt").exists() == (case is VALIDATED_BY_STEPS)

    run_train("--out", "split", "--resume", *settings, cwd=tmp_path)

    for name in ("last.pt", "best.pt"):
        whole = torch.load(tmp_path / "whole" / name, weights_only=True)
        resumed = torch.load(tmp_path / "split" / name, weights_only=True)
        assert whole["model"].keys() == resumed["model"].keys()
        for key, value in whole["model"].items():
            assert torch.equal(value, resumed["model"][key]), f"{name}: {key} differs"
        optimizer_whole, optimizer_resumed = _tensors(whole["optimizer"]), _tensors(resumed["optimizer"])
        assert len(optimizer_whole) == len(optimizer_resumed) > 0
        assert all(torch.equal(a, b) for a, b in zip(optimizer_whole, optimizer_resumed))
        assert (whole["epoch"], whole["step"]) == (resumed["epoch"], resumed["step"])
        if name == "last.pt" or case is not VALIDATED_BY_STEPS:  # there best.pt is at the best of 4 validations
            assert (whole["epoch"], whole["step"]) == case["end"]
    assert _log_without_times(tmp_path / "whole" / "log.csv") == _log_without_times(tmp_path / "split" / "log.csv")
    if case is VALIDATED_BY_STEPS:
        assert [row["step"] for row in _log_without_times(tmp_path / "whole" / "log.csv")] == ["5", "10", "15", "20"]
    if case is SELF_CRITICAL:
        steps = (tmp_path / "whole" / "steps.csv").read_text()
        assert steps == (tmp_path / "split" / "steps.csv").read_text()
        assert len(steps.splitlines()) == 1 + 6  # a header and the six self-critical steps
