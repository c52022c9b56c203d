"""Shared pieces of the training and evaluation tests: a tiny shapes corpus with its feature cache
(built once per test session), tiny-model settings, and running the train CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sca_caption.config import load_config
from sca_caption.data.shapes import generate_shapes
from sca_caption.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 24, "val": 4, "test": 4}  # one extraction batch of 32 images


@dataclass(frozen=True)
class TinyShapes:
    """A 24/4/4-image shapes corpus in ``root`` and its stage7 feature cache at ``cache``."""

    root: Path
    cache: Path

    def overrides(self, **extra: object) -> list[str]:
        """Settings for a run of a few seconds: 30-caption batches (4 steps per epoch), 2 epochs,
        a tiny model, no warm-up, no METEOR; ``extra`` ("section__key": value) wins."""
        values: dict[str, object] = {
            "data.data_root": str(self.root),
            "data.feature_cache": str(self.cache),
            "data.batch_size": 30,
            "train.epochs": 2,
            "train.lr": 0.01,
            "train.warmup_steps": 0,
            "train.meteor": False,
            "decode.beam_size": 2,
            "train.checkpoint_every": None,
            "model.layers": "[stage7]",
            "model.hidden_dim": 32,
            "model.attention_dim": 16,
            "model.embed_dim": 16,
            "model.dropout": 0.3,
        }
        values.update({key.replace("__", "."): value for key, value in extra.items()})
        return [f"{key}={'null' if value is None else value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> TinyShapes:
    folder = tmp_path_factory.mktemp("tiny_shapes")
    data = TinyShapes(folder / "shapes", folder / "features" / "shapes_stage7.h5")
    generate_shapes(data.root, seed=0, counts=COUNTS)
    prepare(load_config("shapes", overrides=data.overrides()), progress=False, log=lambda _: None)
    return data


def train_command(*args: str, processes: int = 1, instrumented: tuple[str, ...] = ()) -> list[str]:
    """``python -m sca_caption.train ARGS``, or under torchrun with ``processes`` CPU processes;
    ``instrumented``: leading options of ``paused_train.py``, which then runs in place of the CLI."""
    program = [str(REPO / "tests" / "paused_train.py"), *instrumented] if instrumented else ["-m", "sca_caption.train"]
    if processes == 1:
        return [sys.executable, *program, "--no-progress", "--device", "cpu", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        *program, "--no-progress", "--device", "cpu", *args,
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: one thread per process, as deterministic as
    the parent's."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run_train(
    *args: str, cwd: Path, processes: int = 1, instrumented: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the train CLI (``train_command``) to completion; fails the test with its output if it fails."""
    done = subprocess.run(
        train_command(*args, processes=processes, instrumented=instrumented), cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done
