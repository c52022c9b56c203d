"""Convolutional Block Attention Module (Woo et al., ECCV 2018).

Signature: ``CBAM(channels: int, reduction: int = 16, spatial_kernel: int = 7)``;
``(B, C, H, W) -> (B, C, H, W)``. Channel gate first, then spatial gate on the channel-refined map:

    Mc(F)  = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))   one shared MLP C -> C/r -> C, (B, C, 1, 1)
    F'     = Mc(F) · F
    Ms(F') = sigmoid(conv_kxk([mean_c(F'); max_c(F')]))   (B, 1, H, W)
    F''    = Ms(F') · F'

As in the paper's equations, the spatial descriptor stacks the channel mean before the channel
max and the k x k convolution feeds the sigmoid directly (the authors' code adds a BatchNorm there
and stacks max before mean; this module follows the paper).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class ChannelGate(nn.Module):
    """Mc: sigmoid of one shared MLP applied to the average- and the max-pooled channel vectors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        require(
            channels > 0 and reduction > 0,
            "CBAM",
            f"channels ({channels}) and reduction ({reduction}) must be positive",
        )
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channel gate (B, C, 1, 1) in (0, 1)."""
        avg = x.mean(dim=(2, 3), keepdim=True)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(peak))


class SpatialGate(nn.Module):
    """Ms: sigmoid of a k x k convolution over the stacked channel mean and channel max."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        odd = kernel_size > 0 and kernel_size % 2 == 1
        require(odd, "CBAM", f"spatial_kernel must be a positive odd number, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> spatial gate (B, 1, H, W) in (0, 1)."""
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(descriptor))


class CBAM(nn.Module):
    """Channel gate then spatial gate, each multiplied into the feature map."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(spatial_kernel)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> Ms(F') · F' with F' = Mc(F) · F, (B, C, H, W)."""
        check_feature_map(x, self.channels, "CBAM")
        refined = x * self.channel_gate(x)
        return refined * self.spatial_gate(refined)
