"""Inputs that never finish (issue #16, RELIABILITY.md): a FIFO, socket or device is refused by
name and never read, and folder walks and globs end and list each image once whatever links the
tree holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from caption_support import checkpoint, shape_image  # noqa: F401
from sca_caption.captioning import collect_images
from sca_caption.checkpoint import CheckpointError, load_checkpoint
from sca_caption.config import ConfigError, load_config
from sca_caption.data.errors import DataError
from sca_caption.data.images import load_image
from sca_caption.data.input_files import read_text
from sca_caption.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]


def finishes(action: Callable[[], object], seconds: float = 10.0) -> BaseException | None:
    """Run ``action`` in a thread; fail if it is still running after ``seconds`` (a blocked read)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s: it blocked on a special file"
    return outcome[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_by_name_without_blocking(fifo: Path, tmp_path: Path):
    error = finishes(lambda: load_image(fifo, 32))
    assert isinstance(error, DataError) and str(error) == f"{fifo}: is a named pipe (FIFO), not an image file; not read"
    error = finishes(lambda: read_text(fifo))
    assert isinstance(error, DataError) and "is a named pipe (FIFO)" in str(error)
    config = tmp_path / "config.yaml"
    os.mkfifo(config)
    error = finishes(lambda: load_config("shapes", config))
    assert isinstance(error, ConfigError) and str(error).startswith(f"{config}: cannot read the config file: is a named pipe")


def test_a_fifo_given_as_a_checkpoint_or_weights_is_refused_by_name_without_blocking(tmp_path: Path):
    path = tmp_path / "best.pt"
    os.mkfifo(path)
    error = finishes(lambda: load_checkpoint(path))
    assert isinstance(error, CheckpointError) and str(error) == f"{path}: is a named pipe (FIFO), not a checkpoint file; not read"
    weights = tmp_path / "weights.pth"
    os.mkfifo(weights)
    for name in ("efficientnet_lite0", "timm:test_resnet"):  # our state-dict reader, and timm's (by name)
        error = finishes(lambda: build_backbone(name, weights=weights))
        assert isinstance(error, DataError) and str(error) == f"{weights}: is a named pipe (FIFO), not a weights file; not read"


def test_sockets_and_devices_are_refused_by_name(tmp_path: Path):
    path = tmp_path / "s.jpg"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        with pytest.raises(DataError, match=r"s.jpg: is a socket, not an image file"):
            load_image(path, 32)
    finally:
        server.close()
    with pytest.raises(DataError, match=r"^/dev/zero: is a character device, not an image file; not read$"):
        load_image("/dev/zero", 32)  # endless: it would never finish reading


def test_caption_reports_a_fifo_among_photos_and_captions_the_others(checkpoint: Path, tmp_path: Path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shape_image(photos / "a.png", (200, 30, 30), (10, 10, 60, 60))
    os.mkfifo(photos / "b.jpg")
    done = subprocess.run(
        [sys.executable, "-m", "sca_caption.caption", "--checkpoint", str(checkpoint), "--no-progress", str(photos)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"{photos / 'a.png'}\t") and len(done.stdout.splitlines()) == 1
    assert f"error: {photos / 'b.jpg'}: is a named pipe (FIFO), not an image file; not read" in done.stderr
    assert "Traceback" not in done.stderr


def test_globs_and_folders_end_and_list_each_image_once_whatever_the_links(tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tree / "a" / "b" / "x.jpg")
    Image.new("RGB", (8, 8)).save(tree / "a" / "z.jpg")
    (tree / "a" / "b" / "up").symlink_to("..")  # loops back
    (tree / "a" / "self1").symlink_to(".")  # two self-links: glob.glob would walk 2^40 paths
    (tree / "a" / "self2").symlink_to(".")
    (tree / "a" / "b" / "y.jpg").symlink_to("x.jpg")  # a second name of x.jpg
    (tree / "a" / ".hidden.jpg").write_bytes(b"")
    found: list[list[Path]] = []
    assert finishes(lambda: found.append(collect_images([f"{tree}/**/*.jpg", str(tree / "a"), str(tree / "a" / "z.jpg")]))) is None
    assert found == [[tree / "a" / "b" / "x.jpg", tree / "a" / "z.jpg"]]
    assert collect_images([str(tree / "a" / "b")]) == [tree / "a" / "b" / "x.jpg"]
