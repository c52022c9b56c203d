"""Checkpoints: exact round trip, resumed training equal to uninterrupted, atomic writes, weights_only
files, and one-line refusals of mismatched, corrupt or foreign files."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sca_caption.checkpoint import (
    FORMAT,
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sca_caption.config import ExperimentConfig, load_config
from sca_caption.io_utils import OutputError

VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs"]
CONFIG = ExperimentConfig.from_dict({  # a whole config, as a run records it
    "data": {"dataset": "shapes", "batch_size": 4},
    "train": {"lr": 0.01, "epochs": 3},
    "model": {"backbone": "efficientnet_lite0", "layers": ["stage6", "stage7"], "attention_dim": 16, "dropout": 0.5},
}).to_dict()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_training(seed: int = 0):
    """A tiny model with dropout, AdamW and a cosine schedule."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    """Steps whose data and dropout come from every generator a checkpoint captures."""
    for _ in range(steps):
        x = torch.randn(4, 6) + random.random() + float(np.random.rand())
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def snapshot(model, optimizer, scheduler, step: int, rng=None) -> Checkpoint:
    return Checkpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        epoch=1,
        step=step,
        data_order=torch.randperm(20, generator=torch.Generator().manual_seed(5)),
        data_position=8,
        rng=capture_rng_state() if rng is None else rng,
        config=CONFIG,
        vocab=VOCAB,
        extra={"best_score": 0.25, "history": [0.1, 0.25], "scheduler": scheduler.state_dict()},
    )


def assert_same(a, b, where: str = "checkpoint") -> None:
    """Deep equality with tensors compared exactly (values, dtype, shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


@pytest.fixture
def trained():
    seed_everything(0)
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 3)
    return model, optimizer, scheduler


def test_round_trip_keeps_every_field(tmp_path, trained):
    saved = snapshot(*trained, step=3)
    path = tmp_path / "last.pt"
    save_checkpoint(path, saved)
    loaded = load_checkpoint(path, expect_config=CONFIG, expect_vocab=VOCAB)
    for name in saved.__dataclass_fields__:
        assert_same(getattr(saved, name), getattr(loaded, name), name)


def test_file_loads_with_weights_only(tmp_path, trained):
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(*trained, step=3))
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    assert payload["rng"]["torch"].dtype == torch.uint8


def test_resumed_training_equals_uninterrupted(tmp_path, trained):
    model, optimizer, scheduler = trained
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(model, optimizer, scheduler, step=3))
    train_steps(model, optimizer, scheduler, 4)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    seed_everything(123)  # a fresh process would start from other generator states
    resumed_model, resumed_optimizer, resumed_scheduler = make_training(seed=99)
    checkpoint = load_checkpoint(path)
    resumed_model.load_state_dict(checkpoint.model)
    resumed_optimizer.load_state_dict(checkpoint.optimizer)
    resumed_scheduler.load_state_dict(checkpoint.extra["scheduler"])
    restore_rng_state(checkpoint.rng)
    train_steps(resumed_model, resumed_optimizer, resumed_scheduler, 4)

    assert resumed_scheduler.last_epoch == scheduler.last_epoch == 7
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def test_rng_state_restores_the_same_draws():
    seed_everything(7)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's generator
    np.random.standard_normal()  # likewise in NumPy's
    state = capture_rng_state()

    def draws():
        return (
            [random.random(), random.gauss(0, 1), random.gauss(0, 1)],
            [np.random.rand(), np.random.standard_normal(), np.random.standard_normal()],
            torch.rand(5).tolist(),
        )

    first = draws()
    restore_rng_state(state)
    assert draws() == first
    assert draws() != first


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, trained, monkeypatch):
    path = tmp_path / "last.pt"
    previous = snapshot(*trained, step=3)
    save_checkpoint(path, previous)

    def crash_midway(obj, handle):
        handle.write(b"PK\x03\x04 half a zip archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OutputError, match=r"last.pt: not written, the file there is unchanged \(OSError: .*No space left") as caught:
        save_checkpoint(path, replace(previous, step=4))
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path).step == 3


def test_interrupted_save_keeps_the_previous_file(tmp_path, trained, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(*trained, step=3))

    def interrupted(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, snapshot(*trained, step=4))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path).step == 3


@dataclass
class NotPlain:
    lr: float = 0.1


@pytest.mark.parametrize(
    "change, where",
    [
        ({"config": {"train": NotPlain()}}, "checkpoint.config.train: a NotPlain"),
        ({"extra": {"scores": np.zeros(3)}}, "checkpoint.extra.scores: a ndarray"),
        ({"extra": {(1, 2): 0.5}}, "checkpoint.extra: key \\(1, 2\\) is tuple, not str or int"),
    ],
)
def test_values_weights_only_cannot_read_are_refused_before_writing(tmp_path, trained, change, where):
    path = tmp_path / "last.pt"
    with pytest.raises(CheckpointError, match=f"cannot save {where}") as caught:
        save_checkpoint(path, replace(snapshot(*trained, step=3), **change))
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved_path(tmp_path, trained) -> Path:
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(*trained, step=3))
    return path


@pytest.mark.parametrize(
    "expectation, message",
    [
        ({"expect_vocab": VOCAB + ["cat"]}, "vocabulary differs (7 words there, 8 here; first difference at id 7: nothing there, 'cat' here)"),
        ({"expect_vocab": VOCAB[:5] + ["cat", "runs"]}, "vocabulary differs (7 words there, 7 here; first difference at id 5: 'dog' there, 'cat' here)"),
        ({"expect_config": {"model": {"backbone": "resnet50"}}}, "model.backbone is 'efficientnet_lite0' there, 'resnet50' here"),
        (
            {"expect_vocab": VOCAB + ["cat"], "expect_config": {"data": {"batch_size": 8}}},
            "vocabulary differs (7 words there, 8 here; first difference at id 7: nothing there, 'cat' here); "
            "data.batch_size is 4 there, 8 here",
        ),
        ({"expect_config": {"model": {"attention_dim": 32}}}, "model.attention_dim is 16 there, 32 here"),
        ({"expect_config": {"model": {"layers": ("stage7",)}}}, "model.layers is ['stage6', 'stage7'] there, ['stage7'] here"),
        ({"expect_config": {"model": {"wings": 2}}}, "model.wings is absent there, 2 here"),
        (
            {"expect_config": {"model": {"dropout": 0.1, "attention_dim": 8, "backbone": "vgg19"}}},
            "model.backbone is 'efficientnet_lite0' there, 'vgg19' here; model.attention_dim is 16 there, 8 here; model.dropout is 0.5 there, 0.1 here",
        ),
    ],
)
def test_mismatch_is_refused_in_one_line_naming_file_and_keys(saved_path, expectation, message):
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(saved_path, **expectation)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{saved_path}: checkpoint does not match this run: ")
    differences = set(text.split(": checkpoint does not match this run: ", 1)[1].split("; "))
    assert differences == set(message.split("; "))


def test_partial_expectations_that_agree_load(saved_path):
    # Only what is expected is compared: a different learning rate elsewhere is not a mismatch.
    loaded = load_checkpoint(saved_path, expect_config={"model": {"layers": ("stage6", "stage7"), "attention_dim": 16}})
    assert loaded.config["train"]["lr"] == 0.01


def foreign_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    good = folder / "good.pt"
    files = {}
    truncated = folder / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (truncated, "not a readable checkpoint (truncated or corrupt?)")
    garbage = folder / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 4)
    files["garbage"] = (garbage, "not a readable checkpoint (truncated or corrupt?)")
    empty = folder / "empty.pt"
    empty.write_bytes(b"")
    files["empty"] = (empty, "not a readable checkpoint (truncated or corrupt?)")
    a_list = folder / "list.pt"
    torch.save([1, 2, 3], a_list)
    files["list"] = (a_list, "not an sca-caption checkpoint (expected format 'sca-caption-checkpoint/2', found 'list')")
    state_dict = folder / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    files["state_dict"] = (state_dict, "not an sca-caption checkpoint (expected format 'sca-caption-checkpoint/2', found None)")
    older = folder / "older.pt"
    torch.save({"format": "sca-caption-checkpoint/1", "model": {}}, older)
    files["older"] = (older, "a checkpoint of another sca-caption version ('sca-caption-checkpoint/1'; this one reads 'sca-caption-checkpoint/2')")
    pickled = folder / "pickled.pt"
    torch.save({"format": FORMAT, "config": NotPlain()}, pickled)
    files["pickled"] = (pickled, "not a checkpoint this project can load safely (it holds pickled Python objects")
    partial = folder / "partial.pt"
    torch.save({"format": FORMAT, "model": {}, "epoch": 0}, partial)
    files["partial"] = (partial, "checkpoint lacks optimizer, step, data_order")
    odd_config = folder / "odd_config.pt"
    unsummed = {k: v for k, v in torch.load(good, weights_only=True).items() if k != "checksum"}  # as before checksums
    torch.save({**unsummed, "config": "shapes"}, odd_config)
    files["odd_config"] = (odd_config, "its config is str, not a mapping of sections")
    odd_layers = folder / "odd_layers.pt"
    payload = unsummed
    payload["config"]["model"]["layers"] = 3
    torch.save(payload, odd_layers)
    files["odd_layers"] = (odd_layers, "checkpoint does not match this run: model.layers is 3 there")
    files["missing"] = (folder / "missing.pt", "checkpoint file not found")
    files["folder"] = (folder, "is a folder, not a checkpoint file; not read")
    return files


def test_corrupt_or_foreign_files_give_one_line(tmp_path, trained):
    save_checkpoint(tmp_path / "good.pt", snapshot(*trained, step=3))
    for name, (path, fragment) in foreign_files(tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path, expect_config={"model": {"layers": ["stage6", "stage7"]}})
        text = str(caught.value)
        assert "\n" not in text, name
        assert text.startswith(f"{path}: "), name
        assert fragment in text, (name, text)
        assert "weights_only" not in text, (name, text)  # never advise loading untrusted pickles


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, trained):
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(*trained, step=3))
    weight = trained[0].state_dict()["0.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(weight) + len(weight) // 2  # a byte inside a weight's values: torch.load reads it silently
    assert at > len(weight) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["0.weight"], trained[0].state_dict()["0.weight"])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == (
        f"{path}: its contents do not match the checksum saved with them (corrupted on disk or in a copy?)"
    )


def test_a_checkpoint_saved_before_checksums_still_loads(tmp_path, trained):
    path = tmp_path / "old.pt"
    save_checkpoint(path, snapshot(*trained, step=3))
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]
    torch.save(payload, path)
    assert load_checkpoint(path).step == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_file(tmp_path, trained, bad):
    model = trained[0]
    with torch.no_grad():
        model[3].bias[1] = bad
    path = tmp_path / "last.pt"
    save_checkpoint(path, snapshot(*trained, step=3))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: model weight 3.bias holds NaN or infinite values; a model cannot be used from it"


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_file(tmp_path, trained, monkeypatch):
    path = tmp_path / "last.pt"
    previous = snapshot(*trained, step=3)
    save_checkpoint(path, previous)
    real_save = torch.save

    class FullDisk:
        """A file that takes 1000 bytes, then fails as a full disk does."""

        def __init__(self, handle) -> None:
            self.handle, self.room = handle, 1000

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(28, "No space left on device")
            self.room -= len(data)
            return self.handle.write(data)

        def flush(self) -> None:
            self.handle.flush()

    monkeypatch.setattr(torch, "save", lambda obj, handle: real_save(obj, FullDisk(handle)))
    with pytest.raises(OutputError) as caught:  # torch itself raised RuntimeError (inline_container.cc)
        save_checkpoint(path, replace(previous, step=4))
    assert str(caught.value) == (
        f"{path}: not written, the file there is unchanged (OSError: [Errno 28] No space left on device)"
    )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path).step == 3


def test_experiment_config_survives_a_checkpoint(tmp_path, trained):
    config = load_config("shapes", overrides=["model.layers=[stage6,stage7]"])
    path = tmp_path / "last.pt"
    save_checkpoint(path, replace(snapshot(*trained, step=3), config=config.to_dict()))
    loaded = load_checkpoint(path, expect_config={"model": config.to_dict()["model"]})
    assert ExperimentConfig.from_dict(loaded.config, source=str(path)) == config
    other = load_config("shapes", overrides=["model.attention_dim=32"])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, expect_config={"model": other.to_dict()["model"]})
    assert str(caught.value).endswith(
        "model.layers is ['stage6', 'stage7'] there, ['stage6'] here; model.attention_dim is 64 there, 32 here"
    )
