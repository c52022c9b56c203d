"""Residual Attention Network building blocks (Wang et al., CVPR 2017).

Signatures (the backbone assembles Attention-56/92 from these):

- ``ResidualUnit(in_ch: int, out_ch: int, stride: int = 1)``: the paper's pre-activation bottleneck
  unit, ``(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)``.
- ``AttentionModule(channels: int, skips: int, p: int = 1, t: int = 2, r: int = 1)``:
  ``(B, C, H, W) -> (B, C, H, W)``. ``skips`` is the number of down-up skip connections in the
  soft-mask branch: 2 for stage 1 (56x56), 1 for stage 2 (28x28), 0 for stage 3 (14x14) in the
  paper's ImageNet networks, whose mask branch always bottoms out at 7x7. p, t, r as in the paper:
  residual units before/after the module, in the trunk branch, and between adjacent poolings.

Attention module, for input x:

    x'  = units_p(x)
    T   = units_t(x')                                          trunk branch
    M   = sigmoid(conv1x1(ReLU(BN(conv1x1(ReLU(BN(U(x'))))))))    soft mask in (0, 1)
    out = units_p((1 + M) · T)                                 attention residual learning

U is the bottom-up top-down branch: (skips + 1) times max-pool 3x3/2 then r units (2r at the
bottom); on the way up, bilinear upsampling to the next level's size, plus a skip connection (one
residual unit on that level's down-path output), then r units; a final bilinear upsampling to H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1 plus identity.

    The bottleneck width is out_ch / 4. When the shape changes, the shortcut is a strided 1x1
    convolution of the pre-activated input. (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        require(
            in_ch > 0 and out_ch >= 4 and stride > 0,
            "ResidualUnit",
            f"need in_ch > 0, out_ch >= 4, stride > 0; got {in_ch}, {out_ch}, {stride}",
        )
        width = out_ch // 4
        self.in_ch = in_ch
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        needs_projection = in_ch != out_ch or stride != 1
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
        check_feature_map(x, self.in_ch, "ResidualUnit")
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        identity = x if self.shortcut is None else self.shortcut(pre)
        return out + identity


def residual_units(channels: int, count: int) -> nn.Sequential:
    """``count`` shape-keeping residual units in a row (an empty Sequential for 0)."""
    return nn.Sequential(*(ResidualUnit(channels, channels) for _ in range(count)))


def _max_pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def _upsample(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SoftMaskBranch(nn.Module):
    """Bottom-up top-down mask M(x) in (0, 1), (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, skips: int, r: int) -> None:
        super().__init__()
        self.down = nn.ModuleList(
            nn.Sequential(_max_pool(), residual_units(channels, r)) for _ in range(skips)
        )
        self.skip = nn.ModuleList(ResidualUnit(channels, channels) for _ in range(skips))
        self.bottom = nn.Sequential(_max_pool(), residual_units(channels, 2 * r))
        self.up = nn.ModuleList(residual_units(channels, r) for _ in range(skips))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcuts: list[Tensor] = []
        h = x
        for down, skip in zip(self.down, self.skip):
            h = down(h)
            shortcuts.append(skip(h))
        h = self.bottom(h)
        for up, shortcut in zip(reversed(self.up), reversed(shortcuts)):
            h = up(_upsample(h, shortcut) + shortcut)
        return torch.sigmoid(self.head(_upsample(h, x)))


class AttentionModule(nn.Module):
    """Trunk T and soft mask M combined as (1 + M) · T, between p residual units on each side."""

    def __init__(self, channels: int, skips: int, p: int = 1, t: int = 2, r: int = 1) -> None:
        super().__init__()
        require(
            channels >= 4 and skips >= 0 and min(p, t, r) >= 0,
            "AttentionModule",
            f"need channels >= 4 and non-negative skips, p, t, r; got {channels}, {skips}, {p}, {t}, {r}",
        )
        self.channels = channels
        self.pre = residual_units(channels, p)
        self.trunk = residual_units(channels, t)
        self.mask = SoftMaskBranch(channels, skips, r)
        self.post = residual_units(channels, p)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (1 + M) · T between the pre and post units, (B, C, H, W)."""
        check_feature_map(x, self.channels, "AttentionModule")
        x = self.pre(x)
        return self.post((1 + self.mask(x)) * self.trunk(x))
