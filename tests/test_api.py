"""The Python API (``from sca_caption import Captioner``) on the shipped model: a path, a Pillow
image and a tensor get the caption CLI's captions for the same settings, with the n-best list and
attention the CLI's --json gives; bad input is one DataError line; the README's example runs;
torch.hub loads the same model from the checkout; importing the package loads no torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caption_support import shape_image
from sca_caption import Captioner, api
from sca_caption.caption import main as caption_main
from sca_caption.captioning import shipped_checkpoint
from sca_caption.checkpoint import CheckpointError
from sca_caption.data.errors import DataError
from sca_caption.decoding import DecodingError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "flickr8k_cs_lite0.pt"
FLICKR_PHOTO = "Flicker8k_Dataset/1000268201_693b08cb0e.jpg"


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(device="cpu")


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return shape_image(tmp_path / "ball.jpg", (220, 40, 40), (20, 30, 80, 90), size=120)


def cli(capsys, *argv: str) -> list[str]:
    """The caption CLI's stdout lines for ``argv`` (on the CPU, in this process), which must succeed."""
    assert caption_main([*argv, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    return capsys.readouterr().out.splitlines()


def test_load_without_a_path_is_the_shipped_model_of_the_checkout(captioner):
    assert shipped_checkpoint() == SHIPPED
    assert captioner.checkpoint == SHIPPED


def test_load_says_when_the_package_has_no_shipped_model(monkeypatch):
    monkeypatch.setattr(api, "shipped_checkpoint", lambda: None)
    with pytest.raises(CheckpointError, match="^the shipped model is not installed with this package: pass a checkpoint file$"):
        Captioner.load()


def test_a_path_a_pil_image_and_a_tensor_get_the_caption_cli_caption(capsys, captioner, photo):
    out = cli(capsys, "--checkpoint", str(SHIPPED), str(photo))
    assert len(out) == 1 and out[0].startswith(f"{photo}\t")
    expected = out[0].split("\t")[1]
    with Image.open(photo) as opened:
        from_pil = captioner(opened)
        pixels = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    results = [captioner(str(photo)), captioner(photo), from_pil, captioner(pixels), captioner(pixels.float() / 255)]
    assert [r.caption for r in results] == [expected] * 5 and expected
    assert [r.source for r in results] == [str(photo), str(photo), "image 1", "image 1", "image 1"]
    assert len(results[0].n_best) == 1 and results[0].attention is None
    assert [r.score for r in results[1:]] == [results[0].score] * 4


def test_n_best_and_attention_match_the_cli_json(capsys, captioner, photo, tmp_path):
    images = [photo, shape_image(tmp_path / "square.png", (40, 200, 60), (10, 10, 70, 50))]
    real = ROOT.parent / "shared" / "data" / "flickr8k" / FLICKR_PHOTO  # a real photo where ../shared is
    images += [real] if real.is_file() else []
    out = cli(capsys, "--checkpoint", str(SHIPPED), "--beam", "5", "--n-best", "3", "--json", str(tmp_path / "c.json"),
              *map(str, images))
    entries = json.loads((tmp_path / "c.json").read_text())
    results = captioner(images, beam=5, n_best=3, attention=True)
    assert len(results) == len(entries) == len(images) and len(out) == 3 * len(images)
    for result, entry, image in zip(results, entries, images):
        assert result.source == entry["file"] == str(image)
        assert (result.caption, result.score, result.log_prob, result.finished) == (
            entry["caption"], entry["score"], entry["log_prob"], entry["finished"])
        assert [(c.caption, c.score, c.log_prob, c.finished) for c in result.n_best] == [
            (c["caption"], c["score"], c["log_prob"], c["finished"]) for c in entry["n_best"]]
        assert len(result.n_best) == 3 and result.n_best[0].caption == result.caption
        assert [c.score for c in result.n_best] == sorted((c.score for c in result.n_best), reverse=True)
        assert result.attention is not None
        assert [w.word for w in result.attention] == result.caption.split() == [w["word"] for w in entry["attention"]]
        for word, summary in zip(result.attention, entry["attention"]):
            (layer,), (expected,) = word.layers, summary["layers"]
            assert layer.layer == expected["layer"] == "stage7"
            assert layer.spatial is not None and layer.spatial.shape == (7, 7)
            assert float(layer.spatial.sum()) == pytest.approx(1, abs=1e-5)
            cell = int(layer.spatial.argmax())
            assert [cell // 7, cell % 7] == expected["argmax"]
            assert layer.top_channels == [tuple(pair) for pair in expected["top_channels"]] and len(layer.top_channels) == 5
    if real.is_file():
        assert "girl" in results[-1].caption  # a girl on a staircase: a caption that sees her


def test_a_batch_tensor_is_a_list_of_images(captioner, photo):
    with Image.open(photo) as opened:
        pixels = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)
    results = captioner(torch.stack([pixels, pixels.flip(2)]), beam=2)
    assert [r.source for r in results] == ["image 1", "image 2"]
    assert results[0].caption == captioner(photo, beam=2).caption


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.jpg", r"missing\.jpg: image file not found$"),
        (lambda d: _write(d / "notes.jpg", b"just some text\n"), r"notes\.jpg: not an image file Pillow can read"),
        (lambda d: 42, r"^image 2: a int, not an image file path, Pillow image or tensor$"),
        (lambda d: torch.zeros(5, 8, 8), r"^image 2: a tensor of shape \(5, 8, 8\); expected \(3, H, W\) or \(1, H, W\)$"),
        (lambda d: torch.full((3, 8, 8), 2.0), r"^image 2: a float tensor with values outside \[0, 1\]$"),
        (lambda d: torch.zeros(3, 8, 8, dtype=torch.int64), r"^image 2: a torch.int64 tensor; expected uint8, or float in \[0, 1\]$"),
    ],
    ids=["missing file", "not an image", "not an image type", "tensor shape", "tensor range", "tensor type"],
)
def test_bad_input_is_one_data_error_line_naming_it(captioner, photo, tmp_path, make, message):
    with pytest.raises(DataError, match=message) as raised:
        captioner([photo, make(tmp_path)])
    assert "\n" not in str(raised.value)


def test_bad_settings_are_one_line(captioner, photo):
    with pytest.raises(DecodingError, match=r"^decoding settings: n_best \(3\) must be at most beam \(2\), the beam_size$"):
        captioner(photo, beam=2, n_best=3)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_readme_python_example_runs(capsys, monkeypatch, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    monkeypatch.chdir(tmp_path)
    shape_image(tmp_path / "photo.jpg", (220, 40, 40), (20, 30, 80, 90), size=120)
    shape_image(tmp_path / "dog.png", (40, 200, 60), (10, 10, 70, 50))
    exec(compile(code, str(ROOT / "README.md"), "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0]
    assert out[1].startswith("photo.jpg [") and out[2].startswith("dog.png [") and out[2].endswith("torch.Size([7, 7])")


def test_torch_hub_loads_the_shipped_captioner_from_the_checkout(captioner, photo):
    hub = torch.hub.load(str(ROOT), "flickr8k_cs_lite0", source="local", device="cpu")
    assert isinstance(hub, Captioner) and hub.checkpoint == SHIPPED
    assert hub(photo).caption == captioner(photo).caption


def test_importing_the_package_loads_no_torch():
    check = (
        "import sys, sca_caption; assert 'torch' not in sys.modules, 'torch at import'; "
        "sca_caption.Captioner; assert 'torch' in sys.modules\n"
        "try: sca_caption.Nothing\nexcept AttributeError as e: print(e)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'sca_caption' has no attribute 'Nothing'"
