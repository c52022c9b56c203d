"""Efficient Channel Attention (Wang et al., CVPR 2020).

Signature: ``ECA(channels: int, gamma: int = 2, b: int = 1, kernel_size: int | None = None)``;
``(B, C, H, W) -> (B, C, H, W)``.

    k = |log2(C)/gamma + b/gamma|_odd                 nearest odd number, ties upwards
    w = sigmoid(conv1d_k(GAP(x)))                      1-D conv across the C pooled channels, no bias
    y = x · w

For t = log2(C)/gamma + b/gamma the nearest odd number is 2*floor(t/2) + 1, which is what the
authors' code computes (truncate, then add one if even): C = 64, 128, 256, 512, 2048 give
k = 3, 5, 5, 5, 7. ``kernel_size`` fixes k instead: the authors' released ECA-ResNets set it per
stage by hand (ECA-Net50 uses 3, 5, 5, 7 on its 256-, 512-, 1024- and 2048-channel stages).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The adaptive 1-D kernel size k for ``channels`` channels."""
    t = abs((math.log2(channels) + b) / gamma)
    return 2 * math.floor(t / 2) + 1


class ECA(nn.Module):
    """Channel gate from a 1-D convolution over the globally pooled channel vector."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, kernel_size: int | None = None) -> None:
        super().__init__()
        positive = channels > 0 and gamma > 0
        require(positive, "ECA", f"channels ({channels}) and gamma ({gamma}) must be positive")
        self.channels = channels
        self.kernel_size = eca_kernel_size(channels, gamma, b) if kernel_size is None else kernel_size
        odd = self.kernel_size > 0 and self.kernel_size % 2 == 1
        require(odd, "ECA", f"the kernel size must be a positive odd number, got {self.kernel_size}")
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False)

    def gate(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channel gate (B, C, 1, 1) in (0, 1)."""
        check_feature_map(x, self.channels, "ECA")
        pooled = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
        return torch.sigmoid(self.conv(pooled)).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> x · w, (B, C, H, W)."""
        return x * self.gate(x)
