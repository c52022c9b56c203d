"""Parameter and multiply-add counting against hand counts and torchvision's published figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sca_caption._torchvision import import_torchvision
from sca_caption.models.complexity import count_macs, count_parameters


def test_conv_linear_grouped_and_transposed_layers_by_hand() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),  # 8 x 10 x 10 outputs, 3*3*3 MACs each
        nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1, groups=4),  # 8 x 5 x 5, (8/4)*9 each
        nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2),  # 8 x 5 x 5 inputs, 4*2*2 each
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 10 * 10, 7),
    )
    expected = 8 * 100 * 27 + 8 * 25 * 18 + 8 * 25 * 16 + 7 * 400
    assert count_macs(model, torch.rand(1, 3, 10, 10)) == expected
    assert count_macs(model, torch.rand(3, 3, 10, 10)) == 3 * expected


def test_a_module_used_twice_is_counted_twice_and_its_parameters_once() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 5, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Twice()
    assert count_macs(model, torch.rand(1, 5)) == 2 * 25
    assert count_parameters(model) == 25
    assert not model.fc._forward_hooks  # hooks are removed afterwards


def test_resnet50_matches_torchvision_published_figures() -> None:
    meta = import_torchvision().models.ResNet50_Weights.IMAGENET1K_V1.meta
    model = import_torchvision().models.resnet50().eval()
    assert count_parameters(model) == meta["num_params"]
    assert count_macs(model, torch.rand(1, 3, 224, 224)) / 1e9 == pytest.approx(meta["_ops"], abs=5e-4)
