"""Class-specific residual attention head (Zhu & Wu, ICCV 2021).

Signatures: ``CSRA(in_channels: int, num_classes: int, temperature: float = 1.0, lam: float = 0.1)``
and ``MultiHeadCSRA(in_channels: int, num_classes: int, num_heads: int = 1, lam: float = 0.1)``;
both map features ``(B, C, H, W)`` to logits ``(B, K)``.

For class k with classifier weights m_k (a bias-free 1x1 convolution) and the M = H·W locations:

    s_kj   = m_k^T x_j / ||m_k||                  score of location j, classifier L2-normalised
    base_k = (1/M) sum_j s_kj                     average pooling
    a_kj   = softmax_j(T · s_kj)                  class-specific attention over locations
    att_k  = sum_j a_kj s_kj
    y_k    = base_k + lam · att_k

T = 99 stands for T -> infinity, where att_k = max_j s_kj (the paper's convention, also used by its
code). A multi-head CSRA sums the logits of heads with the temperatures of ``HEAD_TEMPERATURES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require

MAX_POOL_TEMPERATURE = 99.0
HEAD_TEMPERATURES: dict[int, tuple[float, ...]] = {
    1: (1,),
    2: (1, 99),
    4: (1, 2, 4, 99),
    6: (1, 2, 3, 4, 5, 99),
    8: (1, 2, 3, 4, 5, 6, 7, 99),
}


class CSRA(nn.Module):
    """One CSRA head: average-pooled class scores plus lam times attention-pooled class scores."""

    def __init__(
        self, in_channels: int, num_classes: int, temperature: float = 1.0, lam: float = 0.1
    ) -> None:
        super().__init__()
        require(
            in_channels > 0 and num_classes > 0 and temperature > 0,
            "CSRA",
            f"in_channels ({in_channels}), num_classes ({num_classes}) and temperature ({temperature}) "
            "must be positive",
        )
        self.in_channels = in_channels
        self.temperature = temperature
        self.lam = lam
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)

    def scores(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> per-location class scores s with unit-norm classifiers, (B, K, H·W)."""
        check_feature_map(x, self.in_channels, "CSRA")
        weight = F.normalize(self.classifier.weight, dim=1)
        return F.conv2d(x, weight).flatten(2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits base + lam · att, (B, K)."""
        s = self.scores(x)
        base = s.mean(dim=2)
        if self.temperature == MAX_POOL_TEMPERATURE:
            att = s.amax(dim=2)
        else:
            att = (torch.softmax(self.temperature * s, dim=2) * s).sum(dim=2)
        return base + self.lam * att


class MultiHeadCSRA(nn.Module):
    """Sum of CSRA heads, one per temperature in ``HEAD_TEMPERATURES[num_heads]``."""

    def __init__(self, in_channels: int, num_classes: int, num_heads: int = 1, lam: float = 0.1) -> None:
        super().__init__()
        require(
            num_heads in HEAD_TEMPERATURES,
            "MultiHeadCSRA",
            f"num_heads must be one of {sorted(HEAD_TEMPERATURES)}; got {num_heads}",
        )
        self.heads = nn.ModuleList(
            CSRA(in_channels, num_classes, temperature, lam) for temperature in HEAD_TEMPERATURES[num_heads]
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> summed head logits, (B, K)."""
        return torch.stack([head(x) for head in self.heads]).sum(dim=0)
