"""Data parallel: two CPU processes under torchrun (gloo) extract the feature cache one process
would, and end with the weights of one process trained on the same global batches."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sca_caption.config import load_config
from sca_caption.trainer import build_model
from train_support import TinyShapes, run_train, tiny_shapes  # noqa: F401

pytestmark = pytest.mark.slow


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_shapes: TinyShapes, tmp_path: Path) -> None:
    # Dropout off: each process draws its own masks, so only dropout-free runs can agree exactly.
    # Batches of 30 captions split 15/15; validation only after the last epoch. Each run prepares
    # its own feature cache: the two processes extract a share of the images each.
    def settings(cache: str) -> list[str]:
        return tiny_shapes.overrides(
            model__dropout=0.0, train__eval_every=2, model__doubly_stochastic=1.0, data__feature_cache=str(tmp_path / cache)
        )

    run_train("--out", "one", *settings("one.h5"), cwd=tmp_path)
    run_train("--out", "two", *settings("two.h5"), cwd=tmp_path, processes=2)
    with h5py.File(tmp_path / "one.h5", "r") as a, h5py.File(tmp_path / "two.h5", "r") as b:
        assert dict(a.attrs).keys() == dict(b.attrs).keys() and a.keys() == b.keys()
        assert all(np.array_equal(a.attrs[k], b.attrs[k]) for k in a.attrs)
        for name in ("taps/stage7", "image_ids", "skipped_ids"):
            assert a[name].shape == b[name].shape and np.array_equal(a[name][()], b[name][()]), name
        assert len(a["image_ids"]) == 32

    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert (one["step"], two["step"]) == (8, 8)
    # Float sums in another order differ in the last bits. Adam then turns the rounding noise of a
    # near-zero gradient into a step of up to lr in either direction, so a rare element may differ
    # by up to 2·lr per step (seen: 1 of 2048 elements by 1e-4); every other element must agree.
    for key, value in one["model"].items():
        other = two["model"][key]
        apart = (value - other).abs() > 2e-5 + 1e-4 * other.abs()
        assert int(apart.sum()) <= max(1, value.numel() // 1000), (key, int(apart.sum()), value.numel())
        assert float((value - other).abs().max()) <= 2 * 0.01 * 8, key
    start = build_model(load_config("shapes", overrides=settings("one.h5")), len(one["vocab"]), "imagenet").state_dict()
    moved = max(float((start[k] - v).abs().max()) for k, v in one["model"].items() if v.is_floating_point())
    assert moved > 1e-2  # training moved the weights far beyond the tolerance compared above
    with open(tmp_path / "one" / "log.csv") as a, open(tmp_path / "two" / "log.csv") as b:
        rows_one, rows_two = list(csv.DictReader(a)), list(csv.DictReader(b))
    for row_one, row_two in zip(rows_one, rows_two, strict=True):  # the logged loss is the global batch's
        assert float(row_one["train_loss"]) == pytest.approx(float(row_two["train_loss"]), rel=1e-5)


def test_self_critical_training_runs_under_two_processes(tiny_shapes: TinyShapes, tmp_path: Path) -> None:
    """Each process samples its own captions (its own RNG stream), so the runs cannot match a
    single process; the run must complete with the global batch's reward logged per step."""
    settings = tiny_shapes.overrides(
        data__batch_size=12, train__epochs=2, train__scst_after=1, train__scst_samples=2, train__eval_every=2,
        train__scst_baseline="mean",
    )
    run_train("--out", "two", *settings, cwd=tmp_path, processes=2)
    with open(tmp_path / "two" / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [11, 12]  # 10 cross-entropy steps, then 24 images in 2 steps
    longest = load_config("shapes", overrides=settings).data.max_length + 1  # the words and <end>
    for row in rows:
        assert 0.0 <= float(row["reward"]) < 10.0 and 1.0 <= float(row["sample_length"]) <= longest
    assert torch.load(tmp_path / "two" / "last.pt", weights_only=True)["step"] == 12


def test_only_rank_0_writes_checkpoints_mid_epoch_too(tiny_shapes: TinyShapes, tmp_path: Path) -> None:
    """A non-main process's last.pt (no log history, no best score) must never win the rename."""
    settings = tiny_shapes.overrides(train__checkpoint_every=1, train__eval_every=2)
    noted = tmp_path / "saves.txt"
    run_train("--out", "two", *settings, cwd=tmp_path, processes=2, instrumented=("--note-saves", str(noted)))
    saves = noted.read_text().splitlines()
    # 4 steps per epoch: mid-epoch saves after steps 1-3 and 5-7, epoch ends after 4 and 8
    assert saves == [f"0 last.pt {step}" for step in range(1, 8)] + ["0 best.pt 8", "0 last.pt 8"]
    books = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["extra"]
    assert len(books["history"]) == 2 and books["best_epoch"] == 2


def test_self_critical_epochs_with_a_trained_tag_head_run_under_two_processes(tiny_shapes: TinyShapes, tmp_path: Path) -> None:
    """The policy loss (and the references' cross-entropy mixed into it, in the samples' forward)
    does not reach the tag head (it learns in cross-entropy epochs only)."""
    settings = tiny_shapes.overrides(
        data__batch_size=12, train__epochs=2, train__scst_after=1, train__scst_samples=2, train__eval_every=2,
        train__scst_baseline="mean", model__num_tags=3, model__tag_loss_weight=0.5, train__scst_xe_weight=0.5,
    )
    run_train("--out", "two", *settings, cwd=tmp_path, processes=2)
    with open(tmp_path / "two" / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [11, 12] and all(float(r["cross_entropy"]) > 0 for r in rows)
    assert torch.load(tmp_path / "two" / "last.pt", weights_only=True)["step"] == 12


def test_a_validation_longer_than_the_collective_timeout_keeps_the_processes_together(
    tiny_shapes: TinyShapes, tmp_path: Path
) -> None:
    """Every process validates, so none waits for rank 0's decoding in a collective call."""
    settings = tiny_shapes.overrides(train__epochs=1)
    slow = ("--collective-timeout", "15", "--slow-validation", "25")
    run_train("--out", "two", *settings, cwd=tmp_path, processes=2, instrumented=slow)
    with open(tmp_path / "two" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and float(rows[0]["CIDEr"]) >= 0.0


def test_a_validation_after_the_last_step_keeps_the_processes_in_step(tiny_shapes: TinyShapes, tmp_path: Path) -> None:
    """With ``train.val_every`` landing on the run's last step, every process must agree that the
    last step was validated (rank 0 alone keeps log.csv's rows): no process may validate again
    while the other waits at a barrier."""
    settings = tiny_shapes.overrides(train__val_every=4, train__patience=None)  # 2 epochs of 4 steps
    run_train("--out", "two", *settings, cwd=tmp_path, processes=2, instrumented=("--collective-timeout", "60"))
    with open(tmp_path / "two" / "log.csv") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [4, 8]
