"""ResNet-50/101/152 (He et al., 2016) and SE-/CBAM-ResNet-50 as tapped backbones.

Built with torchvision's ``ResNet`` class, so state dicts keep torchvision's keys (``layer4.2.conv3
.weight``; ``fc.*`` is ignored). SE-ResNet (Hu et al., 2018) and CBAM-ResNet (Woo et al., 2018)
put their block on every bottleneck's residual branch after the last batch norm, before the
addition; its parameters sit under ``layerL.B.attention.*``. Taps, at 224 px (Caffe names):

    res2 256x56, res3 512x28, res4 1024x14, res5a 2048x7, res5b 2048x7,
    res5c_branch2b 512x7 (the last bottleneck after conv2-bn2-relu, the input of its last 1x1 conv),
    res5c 2048x7.

``res5c`` reads ``res5b`` as its shortcut, so the prefix for ``[res5c_branch2b, res5c]`` outputs
both ``res5c_branch2b`` and ``res5b``.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Mapping

from torch import Tensor, nn

from sca_caption._torchvision import import_torchvision
from sca_caption.models.backbones.base import IMAGENET, Plain, Stage, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import IMAGENET as IMAGENET_WEIGHTS
from sca_caption.models.backbones.weights import WeightsLayout, WeightsSpec, load_weights
from sca_caption.models.blocks import CBAM, SqueezeExcitation

# blocks per stage, torchvision weights enum (None: no official weights)
_VARIANTS = {
    "resnet50": ([3, 4, 6, 3], "ResNet50_Weights"),
    "resnet101": ([3, 4, 23, 3], "ResNet101_Weights"),
    "resnet152": ([3, 8, 36, 3], "ResNet152_Weights"),
    "se_resnet50": ([3, 4, 6, 3], None),
    "cbam_resnet50": ([3, 4, 6, 3], None),
}
# attention block on each bottleneck's residual branch, built from the branch's channel count
_ATTENTION: dict[str, Callable[[int], nn.Module]] = {"se_resnet50": SqueezeExcitation, "cbam_resnet50": CBAM}


def bottleneck_hidden(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision bottleneck's first two convs: (B, C_in, H, W) -> relu(bn2(conv2(...))), (B, w, H/s, W/s)."""
    out = block.relu(block.bn1(block.conv1(x)))
    return block.relu(block.bn2(block.conv2(out)))


def bottleneck_output(block: nn.Module, hidden: Tensor, x: Tensor) -> Tensor:
    """The rest of the bottleneck: relu(attention(bn3(conv3(hidden))) + shortcut(x)), (B, 4w, H/s, W/s).

    ``attention`` is the block's SE/CBAM module where it has one.
    """
    out = block.bn3(block.conv3(hidden))
    attention = getattr(block, "attention", None)
    if attention is not None:
        out = attention(out)
    shortcut = x if block.downsample is None else block.downsample(x)
    return block.relu(out + shortcut)


@cache
def attended_bottleneck(name: str) -> type[nn.Module]:
    """torchvision's ``Bottleneck`` with ``name``'s attention block before the residual addition."""
    make_attention = _ATTENTION[name]

    class AttendedBottleneck(import_torchvision().models.resnet.Bottleneck):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.attention = make_attention(self.bn3.num_features)

        def forward(self, x: Tensor) -> Tensor:
            return bottleneck_output(self, bottleneck_hidden(self, x), x)

    return AttendedBottleneck


def resnet_model(name: str) -> nn.Module:
    """The full torchvision ``ResNet`` (with ``fc``) for ``name``, randomly initialised."""
    resnet = import_torchvision().models.resnet
    blocks, _ = _VARIANTS[name]
    block = attended_bottleneck(name) if name in _ATTENTION else resnet.Bottleneck
    return resnet.ResNet(block, blocks)


def weights_layout(name: str) -> WeightsLayout:
    """Where ``name``'s weights come from; file keys are ``resnet_model(name)``'s."""
    enum = _VARIANTS[name][1]
    url = getattr(import_torchvision().models, enum).IMAGENET1K_V1.url if enum else None
    return WeightsLayout(name, url, head_prefixes=("fc.",))


class BottleneckHidden(Stage):
    """Bottleneck up to its last 1x1 conv: (B, C_in, H, W) -> (B, w, H/s, W/s)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:
        return bottleneck_hidden(self.block, x)


class BottleneckOutput(Stage):
    """Bottleneck from its hidden map to the output; the shortcut is the tap ``block_input``.

    (B, w, H, W) hidden -> (B, 4w, H, W).
    """

    def __init__(self, block: nn.Module, block_input: str) -> None:
        super().__init__()
        self.block = block
        self.side_inputs = (block_input,)

    def forward(self, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:
        return bottleneck_output(self.block, x, taps[self.side_inputs[0]])


def tapped_resnet(name: str, model: nn.Module) -> TappedBackbone:
    """Cut a torchvision ResNet (three blocks in ``layer4``) into the taps listed above."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    res5a, res5b, res5c = model.layer4
    hidden = res5c.conv2.out_channels
    stages: list[tuple[TapInfo, Stage]] = [
        (TapInfo("res2", 256, 4), Plain(stem)),
        (TapInfo("res3", 512, 8), Plain(model.layer2)),
        (TapInfo("res4", 1024, 16), Plain(model.layer3)),
        (TapInfo("res5a", 2048, 32), Plain(res5a)),
        (TapInfo("res5b", 2048, 32), Plain(res5b)),
        (TapInfo("res5c_branch2b", hidden, 32), BottleneckHidden(res5c)),
        (TapInfo("res5c", 2048, 32), BottleneckOutput(res5c, "res5b")),
    ]
    return TappedBackbone(name, stages, IMAGENET, input_size=224)


def build_resnet(name: str, weights: WeightsSpec) -> TappedBackbone:
    """``name`` with ``weights`` (None, "imagenet" or a torchvision-keyed state dict file)."""
    model = resnet_model(name)
    load_weights(model, weights, weights_layout(name))
    return tapped_resnet(name, model)


@register_backbone("resnet50")
def resnet50(weights: WeightsSpec = IMAGENET_WEIGHTS) -> TappedBackbone:
    """ResNet-50 (torchvision ``IMAGENET1K_V1`` weights by default)."""
    return build_resnet("resnet50", weights)


@register_backbone("resnet101")
def resnet101(weights: WeightsSpec = IMAGENET_WEIGHTS) -> TappedBackbone:
    """ResNet-101 (torchvision ``IMAGENET1K_V1`` weights by default)."""
    return build_resnet("resnet101", weights)


@register_backbone("resnet152")
def resnet152(weights: WeightsSpec = IMAGENET_WEIGHTS) -> TappedBackbone:
    """ResNet-152 (torchvision ``IMAGENET1K_V1`` weights by default), SCA-CNN's ResNet backbone."""
    return build_resnet("resnet152", weights)


@register_backbone("se_resnet50")
def se_resnet50(weights: WeightsSpec = None) -> TappedBackbone:
    """SE-ResNet-50, reduction 16 (no official weights: None or a local state dict)."""
    return build_resnet("se_resnet50", weights)


@register_backbone("cbam_resnet50")
def cbam_resnet50(weights: WeightsSpec = None) -> TappedBackbone:
    """CBAM-ResNet-50, reduction 16, 7x7 spatial kernel (no official weights: None or a local state dict)."""
    return build_resnet("cbam_resnet50", weights)
