"""Non-local block, embedded Gaussian form (Wang et al., CVPR 2018).

Signature: ``NonLocal(channels: int, inner: int | None = None)``; ``(B, C, H, W) -> (B, C, H, W)``.
``inner`` defaults to C/2.

    f_ij = softmax_j(theta(x_i)^T phi(x_j))     (B, M, M) over the M = H·W locations, rows sum to 1
    y_i  = sum_j f_ij g(x_j)                     (B, C/2, M)
    z    = BN(W_z y) + x                         residual

theta, phi, g and W_z are 1x1 convolutions. The BN's scale starts at zero, so a fresh block is the
identity and can be dropped into a pretrained network. phi has no bias: it would add
theta(x_i)^T b, constant over j, which the softmax cancels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class NonLocal(nn.Module):
    """Every location attends to every other location (self-attention over space)."""

    def __init__(self, channels: int, inner: int | None = None) -> None:
        super().__init__()
        inner = max(1, channels // 2) if inner is None else inner
        positive = channels > 0 and inner > 0
        require(positive, "NonLocal", f"channels ({channels}) and inner ({inner}) must be positive")
        self.channels = channels
        self.theta = nn.Conv2d(channels, inner, kernel_size=1)
        self.phi = nn.Conv2d(channels, inner, kernel_size=1, bias=False)
        self.g = nn.Conv2d(channels, inner, kernel_size=1)
        self.w_z = nn.Conv2d(inner, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)

    def attention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> f, (B, M, M) with M = H·W; row i is location i's weights over locations."""
        check_feature_map(x, self.channels, "NonLocal")
        query = self.theta(x).flatten(2)
        key = self.phi(x).flatten(2)
        return torch.softmax(query.transpose(1, 2) @ key, dim=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> BN(W_z y) + x, (B, C, H, W)."""
        f = self.attention(x)
        y = self.g(x).flatten(2) @ f.transpose(1, 2)  # y_i = sum_j f_ij g_j, (B, C/2, M)
        return x + self.bn(self.w_z(y.reshape(x.shape[0], -1, *x.shape[2:])))
