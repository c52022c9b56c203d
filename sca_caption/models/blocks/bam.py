"""Bottleneck Attention Module (Park et al., BMVC 2018).

Signature: ``BAM(channels: int, reduction: int = 16, dilation: int = 4)``;
``(B, C, H, W) -> (B, C, H, W)``.

    Mc(F) = BN(MLP(AvgPool(F)))                  channel branch, MLP C -> C/r -> C, (B, C, 1, 1)
    Ms(F) = BN(f1x1(f3x3_d(f3x3_d(f1x1(F)))))    spatial branch, C -> C/r -> C/r -> C/r -> 1, (B, 1, H, W)
    M(F)  = sigmoid(Mc(F) + Ms(F))               the sum broadcasts to (B, C, H, W)
    F'    = F + F · M(F)

The branches are combined by addition, as in the paper's equations. The authors' released code
(and most copies of it) multiplies them instead; this module follows the paper. Inside the
spatial branch the reduce and dilated convolutions are each followed by BN and ReLU; a convolution
that feeds a BN has no bias (the BN shift takes its place).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class BAMChannelBranch(nn.Module):
    """Mc: BN of an MLP on the average-pooled channel vector, (B, C, H, W) -> (B, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.mlp(x.mean(dim=(2, 3), keepdim=True)))


class BAMSpatialBranch(nn.Module):
    """Ms: 1x1 reduce, two dilated 3x3 convs, 1x1 to one map, BN; (B, C, H, W) -> (B, 1, H, W)."""

    def __init__(self, channels: int, reduction: int, dilation: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)

        def conv_bn_relu(in_ch: int, kernel: int, dil: int) -> list[nn.Module]:
            return [
                nn.Conv2d(in_ch, hidden, kernel, padding=dil * (kernel // 2), dilation=dil, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *conv_bn_relu(channels, 1, 1),
            *conv_bn_relu(hidden, 3, dilation),
            *conv_bn_relu(hidden, 3, dilation),
            nn.Conv2d(hidden, 1, kernel_size=1, bias=False),
            nn.BatchNorm2d(1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class BAM(nn.Module):
    """F + F · sigmoid(Mc(F) + Ms(F))."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4) -> None:
        super().__init__()
        require(
            channels > 0 and reduction > 0 and dilation > 0,
            "BAM",
            f"channels ({channels}), reduction ({reduction}) and dilation ({dilation}) must be positive",
        )
        self.channels = channels
        self.channel_branch = BAMChannelBranch(channels, reduction)
        self.spatial_branch = BAMSpatialBranch(channels, reduction, dilation)

    def attention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> M(F) = sigmoid(Mc(F) + Ms(F)), (B, C, H, W)."""
        check_feature_map(x, self.channels, "BAM")
        return torch.sigmoid(self.channel_branch(x) + self.spatial_branch(x))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> F + F · M(F), (B, C, H, W)."""
        return x + x * self.attention(x)
