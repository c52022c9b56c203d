"""A^2 double attention block (Chen et al., NeurIPS 2018).

Signature: ``DoubleAttention(channels: int, features: int | None = None, descriptors: int | None = None,
order: str = "gather_first")``; ``(B, C, H, W) -> (B, C, H, W)``. ``features`` (m) and
``descriptors`` (n) default to C/4.

With the M = H·W locations as columns:

    A = phi(X)                      (B, m, M)   feature maps
    B = softmax over M of theta(X)  (B, n, M)   attention maps, one distribution over locations each
    V = softmax over n of rho(X)    (B, n, M)   per location, a distribution over the n descriptors
    G = A · B^T                     (B, m, n)   gather: second-order (bilinear) pooling
    Z = G · V                       (B, m, M)   distribute
    Y = X + conv1x1(Z)                          m -> C, residual

``order`` picks the evaluation order of A · B^T · V: "gather_first" computes (A · B^T) · V, cost
O(m·n·M); "pairwise_first" computes A · (B^T · V) through the M x M matrix B^T · V, cost
O(n·M² + m·M²). Both give the same Z. theta has no bias: a per-map constant cancels in the
softmax over locations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require

ORDERS = ("gather_first", "pairwise_first")


class DoubleAttention(nn.Module):
    """Gather global descriptors by bilinear pooling, distribute them back with per-location attention."""

    def __init__(
        self,
        channels: int,
        features: int | None = None,
        descriptors: int | None = None,
        order: str = "gather_first",
    ) -> None:
        super().__init__()
        features = max(1, channels // 4) if features is None else features
        descriptors = max(1, channels // 4) if descriptors is None else descriptors
        require(
            channels > 0 and features > 0 and descriptors > 0,
            "DoubleAttention",
            f"channels ({channels}), features ({features}) and descriptors ({descriptors}) must be positive",
        )
        known = ", ".join(ORDERS)
        require(order in ORDERS, "DoubleAttention", f"order must be one of {known}; got {order!r}")
        self.channels = channels
        self.order = order
        self.phi = nn.Conv2d(channels, features, kernel_size=1)
        self.theta = nn.Conv2d(channels, descriptors, kernel_size=1, bias=False)
        self.rho = nn.Conv2d(channels, descriptors, kernel_size=1)
        self.project = nn.Conv2d(features, channels, kernel_size=1)

    def maps(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> A (B, m, M), attention maps B (B, n, M), attention vectors V (B, n, M)."""
        check_feature_map(x, self.channels, "DoubleAttention")
        feats = self.phi(x).flatten(2)
        gather_attention = torch.softmax(self.theta(x).flatten(2), dim=2)
        distribute_attention = torch.softmax(self.rho(x).flatten(2), dim=1)
        return feats, gather_attention, distribute_attention

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> X + conv1x1(Z), (B, C, H, W)."""
        a, b, v = self.maps(x)
        if self.order == "gather_first":
            z = (a @ b.transpose(1, 2)) @ v
        else:
            z = a @ (b.transpose(1, 2) @ v)
        return x + self.project(z.reshape(x.shape[0], -1, *x.shape[2:]))
