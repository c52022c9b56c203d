"""Triplet attention (Misra et al., "Rotate to Attend", WACV 2021).

Signature: ``TripletAttention(channels: int, kernel_size: int = 7)``; ``(B, C, H, W) -> (B, C, H, W)``.
Three branches, each gating x over one plane of its (C, H, W) axes from the Z-pool of the third:

    Z(t)     = [max_0(t); mean_0(t)]                      Z-pool over t's first axis, (2, P, Q)
    g(t)     = sigmoid(BN(conv_kxk(Z(t))))                (1, P, Q), no conv bias
    y_cw     = x · g(x viewed as (H, C, W))               pool over H, gate each (c, w)
    y_hc     = x · g(x viewed as (W, H, C))               pool over W, gate each (h, c)
    y_hw     = x · g(x)                                   pool over C, gate each (h, w)
    y        = (y_cw + y_hc + y_hw) / 3

The paper "rotates" x by 90 degrees; like the authors' code, this module permutes the axes instead
(a rotation is that permutation plus a flip, which the learned kernel absorbs). The Z-pool stacks
the max before the mean, as in the paper and the code; k = 7 is the paper's ImageNet setting.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


def z_pool(x: Tensor) -> Tensor:
    """(B, D, P, Q) -> (B, 2, P, Q): the max, then the mean, over dimension 1."""
    return torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)


class ZPoolGate(nn.Module):
    """t -> t · sigmoid(BN(conv(Z(t)))) for t of shape (B, D, P, Q)."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.bn(self.conv(z_pool(x))))


class TripletAttention(nn.Module):
    """The average of three Z-pool gates, over the (C, W), (H, C) and (H, W) planes."""

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        odd = kernel_size > 0 and kernel_size % 2 == 1
        require(channels > 0, "TripletAttention", f"channels must be positive, got {channels}")
        require(odd, "TripletAttention", f"kernel_size must be a positive odd number, got {kernel_size}")
        self.channels = channels
        self.cw = ZPoolGate(kernel_size)
        self.hc = ZPoolGate(kernel_size)
        self.hw = ZPoolGate(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (y_cw + y_hc + y_hw) / 3, (B, C, H, W)."""
        check_feature_map(x, self.channels, "TripletAttention")
        cw = self.cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # (B, H, C, W): H pooled
        hc = self.hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)  # (B, W, H, C): W pooled
        return (cw + hc + self.hw(x)) / 3
