"""Model size and cost: parameter count and multiply-adds of one forward call.

Multiply-adds are counted with forward hooks on the layers that dominate a CNN's cost:
convolutions (including grouped/depthwise and transposed ones) and linear layers, one per weight
use; biases, normalisation, activations, pooling, interpolation and element-wise products are not
counted (the convention behind the usual "4.1 GFLOPs" of ResNet-50). A module called several
times in one forward is counted every time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def layer_macs(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    """Multiply-adds of one call of a conv or linear ``layer`` (0 for any other layer)."""
    if isinstance(layer, _CONV):
        return output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, _CONV_TRANSPOSE):
        return inputs[0].numel() * (layer.out_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    return 0


def count_macs(module: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """Multiply-adds of ``module(*inputs, **kwargs)``, summed over the batch (pass a batch of one
    for a per-image figure). Runs the module once without gradients."""
    total = 0

    def add(layer: nn.Module, layer_inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        total += layer_macs(layer, layer_inputs, output)

    counted = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
    handles = [m.register_forward_hook(add) for m in module.modules() if isinstance(m, counted)]
    try:
        with torch.no_grad():
            module(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total
