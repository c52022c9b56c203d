"""Ctrl-C and SIGTERM with real signals (issue #16, RELIABILITY.md): ``caption`` writes the JSON
of the images it finished and says so; extraction keeps its finished parts and says the same
command continues; neither prints a traceback. (Training: tests/test_misuse.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from caption_support import checkpoint, shape_image  # noqa: F401
from sca_caption.data.shapes import generate_shapes
from sca_caption.errors import command, main_process_takes_interrupts
from train_support import subprocess_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def interruptible() -> None:
    """A child's ``preexec_fn``: SIGINT at its default, as a terminal's Ctrl-C finds it. A shell
    starts a background job (``nohup pytest ... &``) with SIGINT ignored, the children inherit
    that, and Python then never turns SIGINT into ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises ``KeyboardInterrupt`` in this process during the test, as Python sets it up
    unless it was started with SIGINT ignored (a background job)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_caption_interrupted_writes_the_json_of_the_images_done(checkpoint: Path, tmp_path: Path, sig):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(400):
        shape_image(photos / f"p{i:03d}.png", (200, 30 + i % 200, 30), (10, 10, 50 + i % 40, 60))
    results = tmp_path / "out.json"
    command = [sys.executable, "-u", "-m", "sca_caption.caption", "--checkpoint", str(checkpoint), "--no-progress",
               "--batch-size", "1", "--workers", "0", "--json", str(results), str(photos)]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    assert process.stdout is not None
    first = process.stdout.readline()  # the first image is captioned: interrupt now
    assert first.startswith(str(photos / "p000.png"))
    process.send_signal(sig)
    rest, err = process.communicate(timeout=120)
    printed = [first, *rest.splitlines()]
    assert process.returncode == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    done = len(json.loads(results.read_text()))
    assert last == f"error: interrupted after {done} of 400 images; {results} holds the captions of those"
    assert 1 <= done < 400 and done - 1 <= len(printed) <= done  # every caption printed is in the file


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_extraction_interrupted_keeps_its_parts_and_the_same_command_finishes(tmp_path: Path, sig):
    root = tmp_path / "shapes"
    generate_shapes(root, seed=0, counts={"train": 300, "val": 2, "test": 2})
    out = tmp_path / "f.h5"
    command = [sys.executable, str(REPO / "preprocess" / "extract_features.py"), "--dataset", "shapes",
               "--data-root", str(root), "--backbone", "efficientnet_lite0", "--weights", "none", "--layers",
               "stage7", "--out", str(out), "--batch-size", "2", "--workers", "0"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=interruptible)
    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.npz"))) < 2:
        assert process.poll() is None, "it finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: {out}: extraction interrupted; its finished parts in {parts} are kept: the same command continues"
    )
    kept = len(list(parts.glob("part-*.npz")))
    assert 2 <= kept < 152 and not out.exists()
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.exists() and not parts.exists(), done.stderr[-2000:]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_any_command_interrupted_is_one_line_and_status_2(capsys, ctrl_c_raises, sig):
    @command
    def main(argv: list[str] | None = None) -> int:
        os.kill(os.getpid(), sig)
        time.sleep(10)  # the signal arrives first
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert main([]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted (Ctrl-C or SIGTERM)"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


class Slow(torch.utils.data.Dataset):
    """Items that take a while to load, as images do."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        time.sleep(0.05)
        return index


def test_dataloader_workers_leave_ctrl_c_and_sigterm_to_the_main_process():
    loader = torch.utils.data.DataLoader(Slow(), batch_size=2, num_workers=1,
                                         worker_init_fn=main_process_takes_interrupts)
    iterator = iter(loader)
    got = [next(iterator)]
    (worker,) = iterator._workers  # the worker a terminal's Ctrl-C, or a kill of the group, reaches too
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)  # torch raises in the main process as soon as a worker dies by a signal
    got += [next(iterator) for _ in range(5)]  # ignored: the worker goes on
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0  # it ended itself; killed by the signal, it would make torch raise here
    busy_until = time.monotonic() + 0.5
    while time.monotonic() < busy_until:  # the main process at work, as mid-step
        sum(range(1000))
    assert torch.cat(got).tolist() == list(range(12))
    del iterator
