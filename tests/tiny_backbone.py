"""A tiny random TappedBackbone for fast captioner tests.

Taps on a 16×16 image: conv1 4×8×8, conv2 6×4×4, conv3 8×4×4, conv4 6×4×4 (a residual stage
that reads conv2 as its shortcut, like ResNet's res5c reading res5b), conv5 10×2×2. Attending
(conv3, conv4) therefore caches conv3 and conv2.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from sca_caption.models.backbones.base import IMAGENET, Plain, Stage, TapInfo, TappedBackbone

NAME = "tiny"
IMAGE_SIZE = 16


class Shortcut(Stage):
    """relu(conv1x1(x) + taps[conv2]): a stage with a side input."""

    side_inputs = ("conv2",)

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:
        return torch.relu(self.norm(self.conv(x)) + taps["conv2"])


def conv(in_channels: int, out_channels: int, stride: int) -> Plain:
    """A 3×3 convolution and ReLU as a stage."""
    return Plain(nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.ReLU()))


def build_tiny_backbone(seed: int = 0) -> TappedBackbone:
    """The tiny backbone with weights drawn from ``seed`` (batch-norm statistics randomised too)."""
    torch.manual_seed(seed)
    backbone = TappedBackbone(
        NAME,
        [
            (TapInfo("conv1", 4, 2), conv(3, 4, 2)),
            (TapInfo("conv2", 6, 4), conv(4, 6, 2)),
            (TapInfo("conv3", 8, 4), conv(6, 8, 1)),
            (TapInfo("conv4", 6, 4), Shortcut(8, 6)),
            (TapInfo("conv5", 10, 8), conv(6, 10, 2)),
        ],
        IMAGENET,
        input_size=IMAGE_SIZE,
    )
    norm = backbone.stages["conv4"].norm
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    return backbone.eval()


def tiny_features(layers: tuple[str, ...], batch: int = 3, seed: int = 1) -> dict[str, Tensor]:
    """The cached prefix outputs for attending ``layers``, from random images."""
    torch.manual_seed(seed)
    prefix, _ = build_tiny_backbone().split(layers)
    with torch.no_grad():
        return prefix(torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE))
