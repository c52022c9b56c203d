"""Helpers for the captioning service's tests: small photos as bytes, the library's captions of
them (the caption CLI's decoding step), and a comparable view of a caption."""

from __future__ import annotations

import io
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

from sca_caption.captioning import Caption, DecodeSettings, ImageCaptioner
from sca_caption.data.images import decode_image

COLOURS = [(220, 30, 30), (40, 80, 230), (30, 170, 50), (240, 220, 30), (150, 50, 200)]


def photo_bytes(i: int, size: int = 96) -> bytes:
    """PNG bytes of a dark square with one ellipse, colour and place varying with ``i``."""
    image = Image.new("RGB", (size, size), (30, 30, 30))
    ImageDraw.Draw(image).ellipse((8 * i, 10, 8 * i + 40, 60), fill=COLOURS[i % len(COLOURS)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def library_captions(captioner: ImageCaptioner, photos: Sequence[bytes], settings: DecodeSettings) -> list[list[Caption]]:
    """The captions of ``photos`` decoded together as one batch, as the caption CLI does."""
    images = torch.stack([decode_image(p, captioner.input_size, "photo") for p in photos])
    return captioner.caption_features(captioner.features(images), settings)


def as_answer(captions: list[Caption]) -> list[dict[str, Any]]:
    """The ``n_best`` list the service answers for these captions."""
    return [
        {"caption": c.text, "score": c.hypothesis.score, "log_prob": c.hypothesis.log_prob, "finished": c.hypothesis.finished}
        for c in captions
    ]
