"""Split attention (Zhang et al., ResNeSt, arXiv:2004.08955, 2020), radix-major as in the authors' code.

Signature: ``SplitAttention(in_channels: int, channels: int, stride: int = 1, radix: int = 2,
cardinality: int = 1, reduction: int = 4, min_inner: int = 32)``;
``(B, C_in, H, W) -> (B, C, H/s, W/s)``. It takes the place of a bottleneck's 3x3 convolution and
its BN-ReLU. With R = radix and K = cardinality:

    U       = ReLU(BN(conv3x3(x)))          one 3x3 conv, R·K groups, stride s, R·C channels: the splits
                                            U_0..U_{R-1} (B, C, H', W') in order; cardinal group k of
                                            split r comes from conv group r·K + k
    s       = GAP(sum_r U_r)                (B, C); s^k its k-th cardinal group of C/K channels
    z^k     = ReLU(BN(W1^k s^k + b1^k))     W1^k: C/K -> d/K, d = max(R·C_in / reduction, min_inner)
    a^k_r   = softmax over r of (W2^k z^k + b2^k)_r     W2^k: d/K -> R·C/K; sigmoid when R = 1
    V^k     = sum_r a^k_r · U^k_r,   V = [V^0; ...; V^{K-1}]    (B, C, H', W')

ResNeSt-50 is the paper's "2s1x64d" setting: R = 2, K = 1, 64 channels in the first stage; reduction 4
and min_inner 32 are the authors' ``SplAtConv2d`` defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class SplitAttention(nn.Module):
    """R splits of a grouped 3x3 conv, mixed per channel by a softmax over the radix in each cardinal group."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        radix: int = 2,
        cardinality: int = 1,
        reduction: int = 4,
        min_inner: int = 32,
    ) -> None:
        super().__init__()
        positive = min(in_channels, channels, stride, radix, cardinality, reduction, min_inner) > 0
        require(positive, "SplitAttention", "channels, stride, radix, cardinality, reduction and min_inner must be positive")
        inner = max(in_channels * radix // reduction, min_inner)
        divisible = in_channels % (radix * cardinality) == 0 and channels % cardinality == 0 and inner % cardinality == 0
        require(
            divisible,
            "SplitAttention",
            f"radix x cardinality ({radix}x{cardinality}) must divide in_channels ({in_channels}), "
            f"and cardinality channels ({channels}) and the inner width ({inner})",
        )
        self.in_channels = in_channels
        self.channels = channels
        self.radix = radix
        self.cardinality = cardinality
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, radix * channels, 3, stride, padding=1, groups=radix * cardinality, bias=False),
            nn.BatchNorm2d(radix * channels),
            nn.ReLU(inplace=True),
        )
        self.fc1 = nn.Sequential(
            nn.Conv2d(channels, inner, 1, groups=cardinality), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)
        )
        self.fc2 = nn.Conv2d(inner, radix * channels, 1, groups=cardinality)

    def weights(self, logits: Tensor) -> Tensor:
        """fc2's output (B, R·C, 1, 1), cardinal-group-major -> split weights a (B, R, C, 1, 1), radix-major."""
        grouped = logits.view(logits.shape[0], self.cardinality, self.radix, -1)  # (B, K, R, C/K)
        weights = torch.softmax(grouped, dim=2) if self.radix > 1 else torch.sigmoid(grouped)
        return weights.transpose(1, 2).reshape(logits.shape[0], self.radix, self.channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> V, (B, C, H/s, W/s)."""
        check_feature_map(x, self.in_channels, "SplitAttention")
        u = self.conv(x)
        splits = u.view(x.shape[0], self.radix, self.channels, *u.shape[2:])  # (B, R, C, H', W')
        pooled = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)
        return (splits * self.weights(self.fc2(self.fc1(pooled)))).sum(dim=1)
