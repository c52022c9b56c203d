"""Recurrent criss-cross attention (Huang et al., CCNet, ICCV 2019).

Signature: ``CrissCrossAttention(channels: int, reduction: int = 8, recurrence: int = 2)``;
``(B, C, H, W) -> (B, C, H, W)``. One pass, for each position u = (i, j):

    Omega(u) = {(i', j): i' != i} + {(i, j')}       u's column without u, then u's row with u:
                                                    H + W - 1 positions, u counted once
    A_uv     = softmax over v in Omega(u) of Q_u · K_v      Q, K: 1x1 convs C -> C/r
    y_u      = gamma · sum_{v in Omega(u)} A_uv V_v + x_u   V: 1x1 conv C -> C, gamma a learned scalar

The block applies that pass ``recurrence`` times with the same weights (R = 2 in the paper, which
then reaches every position from every other). gamma starts at zero, as in the authors' code, so a
fresh block is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


class CrissCrossAttention(nn.Module):
    """Each position attends to its row and column; repeated so information crosses the whole map."""

    def __init__(self, channels: int, reduction: int = 8, recurrence: int = 2) -> None:
        super().__init__()
        positive = reduction > 0 and recurrence > 0
        require(positive, "CrissCrossAttention", f"reduction ({reduction}) and recurrence ({recurrence}) must be positive")
        require(channels >= reduction, "CrissCrossAttention", f"channels ({channels}) must be at least reduction ({reduction})")
        self.channels = channels
        self.recurrence = recurrence
        self.query = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.key = nn.Conv2d(channels, channels // reduction, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> A over u's column (B, H, W, H) and over u's row (B, H, W, W).

        Entry [b, i, j, k] weights position (k, j), resp. (i, k), for u = (i, j); the column
        weight of u itself is zero, and each u's weights sum to one over both.
        """
        check_feature_map(x, self.channels, "CrissCrossAttention")
        q, k = self.query(x), self.key(x)
        column = torch.einsum("bcij,bckj->bijk", q, k)
        own = torch.eye(x.shape[2], dtype=torch.bool, device=x.device)[:, None, :]  # (H, 1, H): k == i
        column = column.masked_fill(own, float("-inf"))
        row = torch.einsum("bcij,bcik->bijk", q, k)
        weights = torch.softmax(torch.cat([column, row], dim=3), dim=3)
        return weights[..., : x.shape[2]], weights[..., x.shape[2] :]

    def step(self, x: Tensor) -> Tensor:
        """One criss-cross pass: gamma · sum_v A_uv V_v + x, (B, C, H, W)."""
        column, row = self.attention(x)
        v = self.value(x)
        gathered = torch.einsum("bijk,bckj->bcij", column, v) + torch.einsum("bijk,bcik->bcij", row, v)
        return self.gamma * gathered + x

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> ``recurrence`` passes with shared weights, (B, C, H, W)."""
        for _ in range(self.recurrence):
            x = self.step(x)
        return x
