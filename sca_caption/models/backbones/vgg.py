"""VGG-16 and VGG-19 (Simonyan & Zisserman, 2015) as tapped backbones, from torchvision's layers.

Only the convolutional part is kept (torchvision's ``features``); files keep torchvision's keys
(``features.N.weight``) and their ``classifier.*`` keys are ignored. Taps, at 224 px:

    pool1 64x112, pool2 128x56, pool3 256x28, pool4 512x14,
    conv5_1, conv5_2, conv5_3 (, conv5_4 for VGG-19) 512x14 after ReLU, pool5 512x7.

SCA-CNN on VGG-19 attends ``conv5_4`` (one layer), ``conv5_3, conv5_4`` (two) or
``conv5_2, conv5_3, conv5_4`` (three).
"""

from __future__ import annotations

from torch import nn

from sca_caption._torchvision import import_torchvision
from sca_caption.models.backbones.base import IMAGENET, Plain, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import IMAGENET as IMAGENET_WEIGHTS
from sca_caption.models.backbones.weights import WeightsLayout, WeightsSpec, load_weights

# backbone name -> (torchvision config key, torchvision weights enum)
_VARIANTS = {"vgg16": ("D", "VGG16_Weights"), "vgg19": ("E", "VGG19_Weights")}


def vgg_features(name: str) -> nn.Sequential:
    """torchvision's VGG feature stack for ``name`` with torchvision's random init:
    (B, 3, H, W) -> (B, 512, H/32, W/32)."""
    vgg = import_torchvision().models.vgg
    features = vgg.make_layers(vgg.cfgs[_VARIANTS[name][0]], batch_norm=False)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def weights_layout(name: str) -> WeightsLayout:
    """Where ``name``'s weights come from and how their keys map onto ``vgg_features(name)``."""
    enum = getattr(import_torchvision().models, _VARIANTS[name][1])
    return WeightsLayout(name, enum.IMAGENET1K_V1.url, key_prefix="features.", head_prefixes=("classifier.",))


def tapped_vgg(name: str, features: nn.Sequential) -> TappedBackbone:
    """Cut a VGG feature stack into stages ending at the pools and at every block-5 ReLU."""
    stages: list[tuple[TapInfo, Plain]] = []
    start, block, conv, channels = 0, 1, 0, 3
    for index, layer in enumerate(features):
        tap = None
        if isinstance(layer, nn.Conv2d):
            conv, channels = conv + 1, layer.out_channels
        elif isinstance(layer, nn.ReLU) and block == 5:
            tap = f"conv5_{conv}"
        elif isinstance(layer, nn.MaxPool2d):
            tap = f"pool{block}"
            block, conv = block + 1, 0
        if tap is not None:
            stride = 2 ** (block - 1)
            stages.append((TapInfo(tap, channels, stride), Plain(features[start : index + 1])))
            start = index + 1
    return TappedBackbone(name, stages, IMAGENET, input_size=224)


def build_vgg(name: str, weights: WeightsSpec) -> TappedBackbone:
    """``name`` with ``weights`` (None, "imagenet" or a torchvision-keyed state dict file)."""
    features = vgg_features(name)
    load_weights(features, weights, weights_layout(name))
    return tapped_vgg(name, features)


@register_backbone("vgg16")
def vgg16(weights: WeightsSpec = IMAGENET_WEIGHTS) -> TappedBackbone:
    """VGG-16 (torchvision ``IMAGENET1K_V1`` weights by default)."""
    return build_vgg("vgg16", weights)


@register_backbone("vgg19")
def vgg19(weights: WeightsSpec = IMAGENET_WEIGHTS) -> TappedBackbone:
    """VGG-19 (torchvision ``IMAGENET1K_V1`` weights by default), SCA-CNN's VGG backbone."""
    return build_vgg("vgg19", weights)
