"""Selective Kernel convolution (Li et al., SKNet, CVPR 2019).

Signature: ``SelectiveKernel(in_channels: int, channels: int, stride: int = 1, branches: int = 2,
groups: int = 32, reduction: int = 16, min_dim: int = 32)``; ``(B, C_in, H, W) -> (B, C, H/s, W/s)``.
It takes the place of a bottleneck's 3x3 convolution and its BN-ReLU.

    U_m = ReLU(BN_m(conv_m(x)))        split: branch m = 0..M-1 is a 3x3 conv with dilation m + 1
                                       (receptive field 3, 5, 7, ...), G groups, stride s
    U   = sum_m U_m                    fuse
    z   = ReLU(BN(W_z GAP(U)))         (B, d), W_z: C -> d, d = max(C / r, L)
    a_m = softmax over m of (A_m z)    select: one weight per channel and branch, A_m: d -> C
    V   = sum_m a_m · U_m              (B, C, H/s, W/s)

The paper's SKNet-50 uses M = 2, G = 32, r = 16, L = 32 (Table 1), and builds its 5x5 branch as a
3x3 conv with dilation 2 (Sec. 3.1), as here. W_z and the A_m have no bias, as in the paper's
equations (a BN follows W_z).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class SelectiveKernel(nn.Module):
    """Convolutions of several receptive fields, mixed per channel by a softmax across branches."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        branches: int = 2,
        groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
    ) -> None:
        super().__init__()
        positive = min(in_channels, channels, stride, branches, groups, reduction, min_dim) > 0
        require(positive, "SelectiveKernel", "channels, stride, branches, groups, reduction and min_dim must be positive")
        divisible = in_channels % groups == 0 and channels % groups == 0
        require(divisible, "SelectiveKernel", f"groups ({groups}) must divide {in_channels} and {channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.paths = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, stride, padding=m + 1, dilation=m + 1, groups=groups, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            for m in range(branches)
        )
        dim = max(channels // reduction, min_dim)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.select = nn.Conv2d(dim, branches * channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> V = sum_m a_m · U_m, (B, C, H/s, W/s)."""
        check_feature_map(x, self.in_channels, "SelectiveKernel")
        u = torch.stack([path(x) for path in self.paths], dim=1)  # (B, M, C, H', W')
        z = self.squeeze(u.sum(dim=1).mean(dim=(2, 3), keepdim=True))
        logits = self.select(z).view(x.shape[0], len(self.paths), self.channels, 1, 1)
        return (u * torch.softmax(logits, dim=1)).sum(dim=1)
