"""Global second-order pooling channel attention (Gao et al., CVPR 2019, GSoP-Net1 block).

Signature: ``GSoP(channels: int, reduced: int = 128, expansion: int = 4)``;
``(B, C, H, W) -> (B, C, H, W)``.

    X   = ReLU(BN(conv1x1(x)))                         reduce C -> c' (c' = ``reduced``), (B, c', M), M = H·W
    S   = (1/M) (X - mean_M X)(X - mean_M X)^T         centred covariance over locations, (B, c', c')
    r   = ReLU(rowconv(BN(S)))                         row i of S is channel i: a (c' x 1) conv with
                                                       groups = c' maps each row to ``expansion`` values,
                                                       (B, expansion·c', 1, 1)
    w   = sigmoid(conv1x1(r))                          (B, C, 1, 1)
    y   = x · w

The BN over the covariance rows follows the authors' released code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sca_caption.models.blocks.errors import check_feature_map, require


def centred_covariance(x: Tensor) -> Tensor:
    """(B, c, H, W) -> (B, c, c): (1/M) sum over the M = H·W locations of (x_j - mean)(x_j - mean)^T."""
    flat = x.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    return centred @ centred.transpose(1, 2) / flat.shape[2]


class GSoP(nn.Module):
    """Channel gate from row-wise convolutions over the channel covariance matrix."""

    def __init__(self, channels: int, reduced: int = 128, expansion: int = 4) -> None:
        super().__init__()
        require(
            channels > 0 and reduced > 0 and expansion > 0,
            "GSoP",
            f"channels ({channels}), reduced ({reduced}) and expansion ({expansion}) must be positive",
        )
        self.channels = channels
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, reduced, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(inplace=True),
        )
        self.row_bn = nn.BatchNorm2d(reduced)
        self.row_conv = nn.Conv2d(reduced, expansion * reduced, kernel_size=(reduced, 1), groups=reduced)
        self.expand = nn.Conv2d(expansion * reduced, channels, kernel_size=1)

    def gate(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channel weights w, (B, C, 1, 1) in (0, 1)."""
        check_feature_map(x, self.channels, "GSoP")
        cov = centred_covariance(self.reduce(x)).unsqueeze(-1)  # (B, c', c', 1): row i is channel i
        rows = torch.relu(self.row_conv(self.row_bn(cov)))
        return torch.sigmoid(self.expand(rows))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> x · w, (B, C, H, W)."""
        return x * self.gate(x)
