"""Decoding one image file into the square RGB tensor the backbones take.

Choices (the same for the feature cache and the caption CLI):

- Pillow decodes; the EXIF orientation is applied, so a phone photo comes out upright.
- Animated or multi-page files: the first frame.
- Colour: grayscale, palette, CMYK, YCbCr ... go through Pillow's conversion to RGB. 16-bit
  grayscale ("I;16*", and "I", read as 0..65535) is scaled to 8 bits (v / 257, rounded), not
  clipped as Pillow's own conversion would. Transparency (RGBA, LA, PA, palette with a
  transparent index) is composited on white: the pixels under a transparent area are undefined
  (often black) and the captioned object usually sits on the visible part.
- Size: squashed to ``size`` x ``size`` (aspect ratio not kept, so nothing is cropped away) with
  Pillow's bicubic filter, which antialiases when shrinking. An image whose shorter side is at
  least ``2 * REDUCING_GAP * size`` is first shrunk while it decodes, keeping both sides at least
  ``REDUCING_GAP * size``: a JPEG decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), another
  file box-averaged by a whole factor (``Image.reduce``; not palette or 16-bit images), so a photo
  of 9400 x 9400 never holds more than one decoded frame. Smaller images (every Flickr8k and COCO
  photo at the 224 input) are decoded exactly as before.
- Guard: an image of more than ``MAX_PIXELS`` pixels is refused before decoding (decompression bomb).
- Truncated or corrupt data raises: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False, so Pillow
  never pads a cut file with grey.

Every failure is a ``DataError`` naming the file and the problem, in one line. ``decode_image``
does the same for a file's bytes held in memory (an upload to the captioning service), and
``image_tensor`` for a Pillow image (the Python API, ``sca_caption.api``).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from sca_caption.data.errors import DataError
from sca_caption.data.input_files import open_regular
from sca_caption.errors import first_line

MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: a 3-channel image of 0.25 GiB
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
WHITE = (255, 255, 255)
REDUCING_GAP = 4  # an early shrink keeps both sides >= 4x the model input, so bicubic still sees the detail
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I")  # Image.reduce averages these channels


def load_image(path: str | Path, size: int) -> Tensor:
    """The image at ``path`` as a float tensor (3, size, size) in [0, 1]; ``DataError`` if it cannot be."""
    with open_regular(path, "image file") as file:
        return _decode(file, path, size)


def decode_image(data: bytes, size: int, name: str) -> Tensor:
    """``load_image`` for an image file's bytes held in memory; ``name`` (e.g. an upload's) starts
    every ``DataError`` message and is never opened."""
    return _decode(io.BytesIO(data), name, size)


def _decode(file: BinaryIO, name: str | Path, size: int) -> Tensor:
    """Decode the image file open as ``file`` as ``load_image`` documents; errors name ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our limit
            image = Image.open(file)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise DataError(
            f"{name}: declared size is over the limit of {MAX_PIXELS:,} pixels (decompression-bomb guard)"
        ) from None
    except OSError as err:
        raise DataError(f"{name}: cannot open ({first_line(err)})") from None
    with image:
        return image_tensor(image, size, name)


def image_tensor(image: Image.Image, size: int, name: str | Path) -> Tensor:
    """A Pillow image (opened, e.g. from a file, or made in memory) as ``load_image``'s tensor
    (3, size, size) in [0, 1]; every ``DataError`` message starts with ``name``. A large image
    is shrunk while it is decoded (``_shrink_early``)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{MAX_PIXELS:,} pixels (decompression-bomb guard)"
        )
    try:
        shrunk = _shrink_early(image, size)
        rgb = to_rgb(ImageOps.exif_transpose(shrunk))  # the first frame: Image.open stays on frame 0
        resized = rgb.resize((size, size), Image.Resampling.BICUBIC)
    except DataError as err:
        raise DataError(f"{name}: {err}") from None
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError ...
        raise DataError(f"{name}: corrupt or truncated image data ({first_line(err)})") from None
    pixels = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)


def _shrink_early(image: Image.Image, size: int) -> Image.Image:
    """``image`` decoded, shrunk by a whole factor while both sides stay >= ``REDUCING_GAP * size``
    (unchanged, decoded, when no factor of 2 or more fits)."""
    keep = REDUCING_GAP * size
    if min(image.size) < 2 * keep:
        return image
    if image.format == "JPEG":
        image.draft(image.mode, (keep, keep))  # a DCT scale leaving both sides >= keep
        image.load()
        return image
    factor = min(image.size) // keep
    if image.mode not in REDUCIBLE_MODES:
        return image
    reduced = image.reduce(factor)
    reduced.info = image.info  # the EXIF orientation, applied after
    return reduced


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB (decodes it): 16-bit scaled, transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise DataError("32-bit float images are not supported (no agreed value range)")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
