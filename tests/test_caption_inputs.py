"""Odd but valid image files are captioned, and the image the backbone prefix receives is the
right one: the first GIF frame, 16-bit and grayscale values scaled (not clipped), transparency on
white, and an EXIF-rotated photo upright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caption_support import save_tiny_checkpoint
from sca_caption.captioning import CaptionedImage, DecodeSettings, ImageCaptioner

RED, BLUE = (220, 20, 20), (20, 20, 220)
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


def model_input(captioner: ImageCaptioner, path: Path) -> torch.Tensor:
    """Caption ``path`` and return the image (3, S, S) the backbone prefix was given."""
    seen: list[torch.Tensor] = []
    hook = captioner.prefix.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        (result,) = captioner.caption_files([path], DecodeSettings(beam_size=2), workers=0)
    finally:
        hook.remove()
    assert isinstance(result, CaptionedImage) and len(result.captions) == 1
    assert len(seen) == 1 and seen[0].shape == (1, 3, captioner.input_size, captioner.input_size)
    return seen[0][0]


def halves(image: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean colour (3,) of the first and second half of (3, S, S) along ``axis`` (1: rows, 2: columns)."""
    size = image.shape[axis]
    first, second = image.split([size // 2, size - size // 2], dim=axis)
    return first.mean(dim=(1, 2)), second.mean(dim=(1, 2))


def test_exif_rotated_photo_reaches_the_model_upright(tmp_path, captioner):
    stored = Image.new("RGB", (64, 32), RED)  # as the camera stored it: red left, blue right
    stored.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display": the left side goes to the top
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    top, bottom = halves(model_input(captioner, path), axis=1)
    assert top[0] > 0.75 and top[2] < 0.25, f"top half should be red, got {top}"
    assert bottom[2] > 0.75 and bottom[0] < 0.25, f"bottom half should be blue, got {bottom}"


def test_animated_gif_uses_its_first_frame(tmp_path, captioner):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    mean = model_input(captioner, path).mean(dim=(1, 2))
    assert mean[0] > 0.8 and mean[2] < 0.2


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, captioner):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((40, 40), 30_000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    image = model_input(captioner, path)
    assert torch.allclose(image, torch.full_like(image, round(30_000 / 257) / 255), atol=1e-6)


def test_grayscale_png_becomes_three_equal_channels(tmp_path, captioner):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40), 100, dtype=np.uint8), mode="L").save(path)
    image = model_input(captioner, path)
    assert torch.allclose(image, torch.full_like(image, 100 / 255), atol=1e-6)


def test_rgba_transparency_is_composited_on_white(tmp_path, captioner):
    pixels = np.zeros((40, 40, 4), dtype=np.uint8)  # left: transparent black; right: opaque red
    pixels[:, 20:] = (*RED, 255)
    path = tmp_path / "cutout.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    left, right = halves(model_input(captioner, path), axis=2)
    assert torch.all(left > 0.95), f"transparent half should be white, got {left}"
    assert right[0] > 0.8 and right[1] < 0.2
