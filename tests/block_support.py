"""Helpers for the block tests: non-trivial norm statistics and eval-mode BatchNorm written out."""

from __future__ import annotations

from torch import Tensor, nn


def randomise_norms(module: nn.Module) -> nn.Module:
    """Give every BatchNorm/LayerNorm non-trivial affine parameters and running statistics, then eval()."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.3)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.3)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def bn(x: Tensor, m: nn.BatchNorm2d) -> Tensor:
    """Eval-mode BatchNorm written out: (x - mean) / sqrt(var + eps) * gamma + beta, per channel (dim 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = (m.running_var + m.eps).rsqrt() * m.weight
    return (x - m.running_mean.view(shape)) * scale.view(shape) + m.bias.view(shape)
