"""Helpers for the caption tests: a tiny checkpoint (random SCA and LSTM weights over the real
EfficientNet-Lite0 with its packaged ImageNet weights, saved with the checkpoint module) and
small image files, good and bad."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sca_caption.models.backbones import build_cache_backbone
from sca_caption.captioning import ImageCaptioner
from sca_caption.checkpoint import Checkpoint, capture_rng_state, save_checkpoint
from sca_caption.data.vocab import SPECIALS
from sca_caption.models.backbones.base import freeze
from sca_caption.models.captioner import ModelConfig, SCACaptioner

WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "left", "of")
VOCAB = [*SPECIALS, *WORDS]
CAPTION_WORDS = 6
LAYERS = ("stage6", "stage7")


def tiny_model_config(order: str = "cs", layers: tuple[str, ...] = LAYERS) -> ModelConfig:
    return ModelConfig(
        backbone="efficientnet_lite0", layers=layers, order=order, attention_dim=8, hidden_dim=16, embed_dim=8, dropout=0.0
    )


def save_tiny_checkpoint(
    path: Path, order: str = "cs", seed: int = 0, backbone_weights: str = "imagenet", layers: tuple[str, ...] = LAYERS
) -> Path:
    """A checkpoint whose SCA and LSTM weights are random, drawn from ``seed``, over the backbone
    as the feature cache builds it with ``backbone_weights``; returns ``path``."""
    config = tiny_model_config(order, layers)
    backbone = freeze(build_cache_backbone(config.backbone, backbone_weights))
    torch.manual_seed(seed)
    model = SCACaptioner(config, len(VOCAB), backbone)
    save_checkpoint(
        path,
        Checkpoint(
            model=model.state_dict(),
            optimizer={},
            epoch=0,
            step=0,
            data_order=torch.arange(4),
            data_position=0,
            rng=capture_rng_state(),
            config={
                "data": {"dataset": "shapes", "max_length": CAPTION_WORDS, "backbone_weights": backbone_weights},
                "model": config.to_dict(),
            },
            vocab=VOCAB,
        ),
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint (``save_tiny_checkpoint``) for a test module."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint: Path) -> ImageCaptioner:
    """The tiny checkpoint's captioner, with its backbone prefix."""
    return ImageCaptioner.from_checkpoint(checkpoint)


def shape_image(path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int], size: int = 96) -> Path:
    """A dark square image with one filled ellipse of ``colour`` in ``box``; saved as ``path``."""
    image = Image.new("RGB", (size, size), (30, 30, 30))
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    image.save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut after 60% of its bytes."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> Path:
    """A few-byte PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
