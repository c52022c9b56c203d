"""Global Context block (Cao et al., GCNet, ICCV Workshops 2019).

Signature: ``GlobalContext(channels: int, reduction: int = 16)``; ``(B, C, H, W) -> (B, C, H, W)``.

    a_j = softmax_j(W_k x_j)                                 context modelling, one weight per location
    c   = sum_j a_j x_j                                      (B, C, 1, 1)
    t   = W_v2 ReLU(LN(W_v1 c))                              transform C -> C/r -> C, LN over [C/r, 1, 1]
    z_i = x_i + t                                            fusion by broadcast addition

W_k has no bias: a constant added to every location's logit cancels in the softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class GlobalContext(nn.Module):
    """Adds one transformed, attention-pooled context vector to every location."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        require(reduction > 0, "GlobalContext", f"reduction must be positive, got {reduction}")
        hidden = channels // reduction
        require(
            hidden >= 2,
            "GlobalContext",
            f"channels // reduction = {channels} // {reduction} must be at least 2 "
            "(a LayerNorm over one value is constant)",
        )
        self.channels = channels
        self.key = nn.Conv2d(channels, 1, kernel_size=1, bias=False)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def context(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> attention-pooled context c, (B, C, 1, 1)."""
        check_feature_map(x, self.channels, "GlobalContext")
        weights = torch.softmax(self.key(x).flatten(1), dim=1)  # (B, HW)
        return torch.einsum("bcn,bn->bc", x.flatten(2), weights)[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> x + transform(context(x)), (B, C, H, W)."""
        return x + self.transform(self.context(x))
