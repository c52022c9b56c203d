"""Image decoding: every colour mode to 8-bit RGB, EXIF orientation, first frame, bad files refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sca_caption.data.errors import DataError
from sca_caption.data.images import MAX_PIXELS, decode_image, load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _pixel(image: torch.Tensor, row: int, col: int) -> tuple[int, ...]:
    """The 8-bit RGB value at (row, col) of a (3, S, S) tensor in [0, 1]."""
    return tuple(int(round(v * 255)) for v in image[:, row, col].tolist())


def _photo(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    """A noisy JPEG (so it has plenty of entropy-coded data to cut)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _error(path: Path, size: int = 32) -> str:
    with pytest.raises(DataError) as caught:
        load_image(path, size)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_rgb_jpeg_output_shape_range_and_values(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.new("RGB", (40, 40), (10, 128, 250)).save(path)
    image = load_image(path, 40)
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert torch.equal(image, torch.tensor([10, 128, 250]).view(3, 1, 1).expand(3, 40, 40) / 255.0)


def test_squashed_not_cropped(tmp_path: Path) -> None:
    # A 128x64 image, left half red and right half green, squashed to 32x32 keeps both halves.
    array = np.zeros((64, 128, 3), np.uint8)
    array[:, :64] = RED
    array[:, 64:] = GREEN
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 32)
    assert image.shape == (3, 32, 32)
    assert _pixel(image, 0, 0) == RED and _pixel(image, 31, 31) == GREEN
    assert _pixel(image, 16, 13) == RED and _pixel(image, 16, 18) == GREEN  # bicubic rings at the edge only


def test_grayscale_becomes_equal_channels(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    assert _pixel(load_image(tmp_path / "gray.png", 8), 3, 3) == (77, 77, 77)


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png", 4)  # 4x1 squashed to 4x4: columns keep their values
    assert [_pixel(image, 0, c)[0] for c in range(4)] == [0, 100, 255, 4]  # 1000 / 257 = 3.9 -> 4


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    array = np.zeros((2, 2, 4), np.uint8)
    array[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    array[0, 1] = (0, 0, 255, 255)  # opaque blue stays blue
    array[1, 0] = (0, 0, 0, 51)  # black at 20 % -> 255 * 0.8 = 204
    array[1, 1] = (0, 255, 0, 255)
    Image.fromarray(array, "RGBA").save(tmp_path / "alpha.png")
    image = load_image(tmp_path / "alpha.png", 2)
    assert _pixel(image, 0, 0) == WHITE and _pixel(image, 0, 1) == BLUE
    assert _pixel(image, 1, 0) == (204, 204, 204) and _pixel(image, 1, 1) == GREEN


def test_palette_with_transparent_index_is_composited(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "pal.png", transparency=0)
    loaded = load_image(tmp_path / "pal.png", 2)
    assert _pixel(loaded, 0, 0) == WHITE and _pixel(loaded, 0, 1) == RED


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)  # pure cyan
    assert Image.open(tmp_path / "cyan.jpg").mode == "CMYK"
    r, g, b = _pixel(load_image(tmp_path / "cyan.jpg", 16), 8, 8)
    assert r < 10 and g > 245 and b > 245


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE, GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    assert _pixel(load_image(tmp_path / "anim.gif", 8), 4, 4) == RED


def test_exif_orientation_6_comes_out_upright(tmp_path: Path) -> None:
    # Upright: 32 wide x 64 tall, top half red, bottom half blue. Stored rotated 90 degrees
    # counter-clockwise with orientation 6 ("rotate 90 clockwise to display").
    upright = np.zeros((64, 32, 3), np.uint8)
    upright[:32] = RED
    upright[32:] = BLUE
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    image = load_image(tmp_path / "phone.jpg", 16)
    top, bottom = _pixel(image, 2, 8), _pixel(image, 13, 8)
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_truncated_jpeg_raises_not_grey_padding(tmp_path: Path) -> None:
    data = _photo(tmp_path / "whole.jpg").read_bytes()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name, cut in (("half.jpg", len(data) // 2), ("no_end.jpg", len(data) - 2)):
        (tmp_path / name).write_bytes(data[:cut])
        assert "truncated" in _error(tmp_path / name)
    assert load_image(tmp_path / "whole.jpg", 32).shape == (3, 32, 32)


@pytest.mark.parametrize("marker", [b"\xff\xc4", b"\xff\xda"])  # Huffman table; start of scan
def test_corrupt_jpeg_segment_raises(tmp_path: Path, marker: bytes) -> None:
    data = bytearray(_photo(tmp_path / "whole.jpg").read_bytes())
    start = data.index(marker)
    data[start + 4 : start + 30] = bytes(26)
    (tmp_path / "broken.jpg").write_bytes(bytes(data))
    assert "corrupt or truncated" in _error(tmp_path / "broken.jpg")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("not an image\n")
    assert "not an image file" in _error(tmp_path / "notes.jpg")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "absent.jpg")
    assert "folder" in _error(tmp_path)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (its pixel data is never decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("side", [10_000, 100_000])  # just over our limit; far over (Pillow's own guard)
def test_decompression_bomb_refused_with_the_limit(tmp_path: Path, side: int) -> None:
    assert side * side > MAX_PIXELS
    message = _error(_png_declaring(tmp_path / "bomb.png", side, side))
    assert f"{MAX_PIXELS:,}" in message and "decompression-bomb" in message


def test_importing_the_package_keeps_truncated_loading_off() -> None:
    import sca_caption.data.feature_extraction  # noqa: F401  (imports every image-reading module)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bytes_in_memory_decode_as_the_file_does_and_errors_name_the_upload(tmp_path: Path) -> None:
    path = _photo(tmp_path / "whole.jpg")
    data = path.read_bytes()
    assert torch.equal(decode_image(data, 32, "upload.jpg"), load_image(path, 32))
    for bad, problem in ((data[: len(data) // 2], "truncated"), (b"not an image", "not an image file")):
        with pytest.raises(DataError) as caught:
            decode_image(bad, 32, "upload.jpg")
        message = str(caught.value)
        assert message.startswith("upload.jpg: ") and problem in message and "\n" not in message
