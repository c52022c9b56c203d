"""Large uploads and memory: the image loader (one path for the caption CLI, the feature cache
and the service) shrinks a large image while it decodes, so decoding a 6000 x 6000 PNG holds about
one decoded frame, not several copies; images of dataset size decode exactly as a plain resize;
the CLI's loader and the service's give the same tensor for the same file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from sca_caption.data.images import decode_image, load_image

REPO = Path(__file__).resolve().parents[1]
PEAK_GROWTH = """
import re, sys
from pathlib import Path
import torch  # imported before the reading: its memory is not the decoder's
from sca_caption.data.images import decode_image
def kb(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
data = Path(sys.argv[1]).read_bytes()
before = kb("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
decode_image(data, 224, "big.png")
print(kb("VmHWM") - before)
"""


def drawing(width: int, height: int, fmt: str) -> bytes:
    """An image file of shapes and a gradient, ``fmt`` (PNG, JPEG)."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.broadcast_to(ramp, (height, width))] * 3, axis=-1).copy())
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 3, height // 2), fill=(250, 20, 20))
    draw.ellipse((width // 2, height // 2, width, height), fill=(20, 20, 250))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


def plain_resize(data: bytes, size: int) -> torch.Tensor:
    """The loader without any early shrink: the full frame, upright, RGB, bicubic to ``size``."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)


@pytest.mark.slow
def test_decoding_a_large_png_holds_about_one_decoded_frame(tmp_path):
    width = height = 6000
    path = tmp_path / "big.png"
    path.write_bytes(drawing(width, height, "PNG"))
    frame_kb = width * height * 3 / 1024
    run = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(path)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr
    growth_kb = int(run.stdout)
    assert growth_kb < 2 * frame_kb, f"peak grew by {growth_kb / frame_kb:.2f} decoded frames"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("shape", [(500, 375), (640, 480), (1700, 2400)])
def test_images_below_the_shrink_threshold_decode_as_a_plain_resize(fmt, shape):
    data = drawing(*shape, fmt)
    assert torch.equal(decode_image(data, 224, "photo"), plain_resize(data, 224))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_large_image_shrunk_early_is_close_to_the_plain_resize(fmt):
    data = drawing(4000, 3000, fmt)
    shrunk, plain = decode_image(data, 224, "photo"), plain_resize(data, 224)
    assert not torch.equal(shrunk, plain)  # it was shrunk early
    assert (shrunk - plain).abs().mean() < 1e-3 and (shrunk - plain).abs().max() < 0.15  # a hard edge moves by a fraction of a pixel


def test_the_cli_loader_and_the_service_decoder_agree(tmp_path):
    for i, shape in enumerate([(500, 375), (4000, 3000)]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(drawing(*shape, "JPEG"))
        assert torch.equal(load_image(path, 224), decode_image(path.read_bytes(), 224, path.name))
