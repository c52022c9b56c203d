"""Pictures of where each word looked, drawn with Pillow: one PNG per captioned image.

Layout: a title line (file name, caption, score), then a grid with one row per attended layer
(named at the left) and one column per generated word (named on top); after ``WORDS_PER_BAND``
words the grid goes on in another band of rows below, so long captions stay readable. The first
column is the image as the model saw it (squashed to a square, as ``load_image`` does); every
other tile is that image with the word's spatial attention α of that layer, upsampled bilinearly
to the image, overlaid as a heat map. Colour and opacity both follow α / max α of the map, so a
peaked map tints only where the word looked and a spread-out map tints the whole tile. The grid
cell of the largest weight is outlined, and under the tile that weight is given as a multiple of
the uniform weight 1/m of the layer's m cells, so a nearly uniform map, which the normalisation
tints fully, shows as such ("peak 1.1x uniform").
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from sca_caption.captioning import Caption

TILE = 160  # pixels per tile side
WORDS_PER_BAND = 8  # word columns per band of rows
GAP = 4
LABEL_WIDTH = 76
HEADER_HEIGHT = 22
FOOTER_HEIGHT = 16
TITLE_HEIGHT = 26
MAX_OPACITY = 0.65
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
# Heat colour ramp: (position in [0, 1], RGB), linear between the stops (dark blue -> red).
HEAT_STOPS = (
    (0.0, (20, 20, 160)),
    (0.3, (0, 130, 255)),
    (0.55, (40, 210, 90)),
    (0.8, (255, 215, 0)),
    (1.0, (230, 20, 20)),
)


def upsample(alpha: Tensor, height: int, width: int) -> Tensor:
    """A map (h, w) -> (height, width) by bilinear interpolation between cell centres, each cell
    centred on the image region it covers (``align_corners=False``); edges are held constant."""
    return F.interpolate(alpha[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values (H, W) in [0, 1] -> RGB (H, W, 3) uint8 on the ``HEAT_STOPS`` ramp."""
    positions = [p for p, _ in HEAT_STOPS]
    channels = [np.interp(values, positions, [rgb[c] for _, rgb in HEAT_STOPS]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def overlay(image: np.ndarray, alpha: Tensor) -> np.ndarray:
    """Image (H, W, 3) uint8 and a map (h, w) -> the image with the upsampled map blended in,
    colour and opacity ∝ α / max α (opacity at most ``MAX_OPACITY``)."""
    height, width = image.shape[:2]
    strength = upsample(alpha, height, width)
    strength = (strength / strength.max().clamp_min(1e-12)).clamp(0.0, 1.0).numpy()
    opacity = (MAX_OPACITY * strength)[..., None]
    blended = image.astype(np.float64) * (1.0 - opacity) + heat_colours(strength).astype(np.float64) * opacity
    return np.rint(blended).astype(np.uint8)


def render_attention(image: Tensor, caption: Caption, layers: Sequence[str], title: str) -> Image.Image:
    """The attention grid of one caption (see the module docstring); a caption of more than
    ``WORDS_PER_BAND`` words continues in further bands of rows below.

    ``image``: (3, S, S) in [0, 1]; ``caption.spatial_map(t, l)``: α (h_l, w_l) of layer l at word t.
    """
    font = ImageFont.load_default(size=13)
    pixels = np.asarray(
        Image.fromarray(_to_uint8(image)).resize((TILE, TILE), Image.Resampling.BICUBIC), dtype=np.uint8
    )
    count = len(caption.words)
    bands = [range(s, min(s + WORDS_PER_BAND, count)) for s in range(0, max(count, 1), WORDS_PER_BAND)]
    row_height = HEADER_HEIGHT + TILE + FOOTER_HEIGHT
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + (1 + min(count, WORDS_PER_BAND)) * (TILE + GAP), TITLE_HEIGHT + len(bands) * len(layers) * (row_height + GAP)),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 6), _fit(draw, title, font, canvas.width - 2 * GAP), fill=TEXT, font=font)
    for b, band in enumerate(bands):
        for l, layer in enumerate(layers):
            top = TITLE_HEIGHT + (b * len(layers) + l) * (row_height + GAP)
            tiles_top = top + HEADER_HEIGHT
            draw.text((GAP, tiles_top + TILE // 2 - 7), _fit(draw, layer, font, LABEL_WIDTH - GAP), fill=TEXT, font=font)
            draw.text((LABEL_WIDTH + 2, top + 4), "image", fill=TEXT, font=font)
            canvas.paste(Image.fromarray(pixels), (LABEL_WIDTH, tiles_top))
            for column, t in enumerate(band, start=1):
                left = LABEL_WIDTH + column * (TILE + GAP)
                alpha = caption.spatial_map(t, l)
                draw.text((left + 2, top + 4), _fit(draw, caption.words[t], font, TILE - 4), fill=TEXT, font=font)
                canvas.paste(Image.fromarray(overlay(pixels, alpha)), (left, tiles_top))
                _outline_peak(draw, alpha, left, tiles_top)
                footer = f"peak {float(alpha.max()) * alpha.numel():.1f}x uniform"
                draw.text((left + 2, tiles_top + TILE + 1), footer, fill=TEXT, font=font)
    return canvas


def png_names(paths: Sequence[Path]) -> list[str]:
    """One PNG file name per image: its stem, with ``-2``, ``-3`` ... added where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(f"{path.stem}.png" if count == 1 else f"{path.stem}-{count}.png")
    return names


def _outline_peak(draw: ImageDraw.ImageDraw, alpha: Tensor, left: int, top: int) -> None:
    """Outline the grid cell of the map's largest weight in a tile at (left, top)."""
    h, w = alpha.shape
    cell = int(alpha.flatten().argmax())
    row, col = cell // w, cell % w
    box = (left + col * TILE / w, top + row * TILE / h, left + (col + 1) * TILE / w - 1, top + (row + 1) * TILE / h - 1)
    draw.rectangle(box, outline=(255, 255, 255), width=1)


def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
