"""Squeeze-and-Excitation (Hu et al., CVPR 2018).

Signature: ``SqueezeExcitation(channels: int, reduction: int = 16)``; ``(B, C, H, W) -> (B, C, H, W)``.

    z = GAP(x)                                   squeeze, (B, C)
    s = sigmoid(W2 · relu(W1 · z + b1) + b2)     excitation, W1: C -> C/r, W2: C/r -> C
    y = x · s                                    channel-wise rescale

The two fully connected layers are 1x1 convolutions named ``fc1`` / ``fc2``, the names torchvision's
and timm's SE modules use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class SqueezeExcitation(nn.Module):
    """Rescales each channel by a gate computed from the globally pooled feature map."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        require(
            channels > 0 and reduction > 0,
            "SqueezeExcitation",
            f"channels ({channels}) and reduction ({reduction}) must be positive",
        )
        self.channels = channels
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def gate(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channel gate s in (0, 1), shape (B, C, 1, 1)."""
        check_feature_map(x, self.channels, "SqueezeExcitation")
        z = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> x · s, (B, C, H, W)."""
        return x * self.gate(x)
