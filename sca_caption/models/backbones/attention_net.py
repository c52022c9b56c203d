"""Residual Attention Network, Attention-56 and Attention-92 (Wang et al., CVPR 2017), ImageNet layout.

The paper's Table 2 at 224 px, built from the pre-activation ``ResidualUnit`` and ``AttentionModule``
(p=1, t=2, r=1) of ``sca_caption.models.blocks``:

    stem     conv 7x7/2, 64 - BN - ReLU - max-pool 3x3/2                   64 x 56
    stage1   residual unit -> 256, then 1 (56) / 1 (92) attention modules  256 x 56  (mask: 2 skips)
    stage2   residual unit /2 -> 512, then 1 / 2 attention modules         512 x 28  (1 skip)
    stage3   residual unit /2 -> 1024, then 1 / 3 attention modules        1024 x 14 (no skip)
    stage4   residual units /2 -> 2048, x3                                  2048 x 7
    final    BN - ReLU (the units are pre-activation, so their sum is not yet normalised)
    fc       global average pool, 1000-way linear (dropped by the backbone)

Parameters with the 1000-way fc: Attention-56 31.81M (paper 31.9M), Attention-92 52.47M (paper
51.3M, 2.3% more). The layers are those of the authors' released Attention-92 deploy prototxt; the
paper's figure is about one stage-3 residual unit (1.12M) smaller, and this module keeps the
released network rather than guess which unit the count left out.

Taps: ``stage1, stage2, stage3`` (after the stage's last attention module), ``stage4a, stage4b,
stage4c`` (the three top units' raw outputs) and ``final`` (stage4c after BN-ReLU). There are no
official PyTorch weights; ``weights`` is None or a state dict of ``ResidualAttentionNet`` keys.
"""

from __future__ import annotations

from torch import Tensor, nn

from sca_caption.models.backbones.base import IMAGENET, Plain, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import WeightsLayout, WeightsSpec, load_weights
from sca_caption.models.blocks import AttentionModule, ResidualUnit

# attention modules in stages 1, 2, 3
_MODULES = {"attention56": (1, 1, 1), "attention92": (1, 2, 3)}
# stage output channels; mask-branch skips per stage so that every mask bottoms out at 7x7 (224 px)
_CHANNELS = (256, 512, 1024, 2048)
_SKIPS = (2, 1, 0)


class ResidualAttentionNet(nn.Module):
    """The ImageNet classifier: images (B, 3, 224, 224), normalised -> logits (B, num_classes)."""

    def __init__(self, modules_per_stage: tuple[int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        c1, c2, c3, c4 = _CHANNELS
        self.stage1 = _attention_stage(64, c1, 1, modules_per_stage[0], _SKIPS[0])
        self.stage2 = _attention_stage(c1, c2, 2, modules_per_stage[1], _SKIPS[1])
        self.stage3 = _attention_stage(c2, c3, 2, modules_per_stage[2], _SKIPS[2])
        self.stage4 = nn.Sequential(ResidualUnit(c3, c4, stride=2), ResidualUnit(c4, c4), ResidualUnit(c4, c4))
        self.final = nn.Sequential(nn.BatchNorm2d(c4), nn.ReLU(inplace=True))
        self.fc = nn.Linear(c4, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> final features (B, 2048, H/32, W/32)."""
        x = self.stage3(self.stage2(self.stage1(self.stem(images))))
        return self.final(self.stage4(x))

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> logits (B, num_classes)."""
        return self.fc(self.features(images).mean(dim=(2, 3)))


def _attention_stage(c_in: int, c_out: int, stride: int, modules: int, skips: int) -> nn.Sequential:
    """A residual unit to ``c_out`` channels, then ``modules`` attention modules at that size."""
    return nn.Sequential(
        ResidualUnit(c_in, c_out, stride=stride), *(AttentionModule(c_out, skips) for _ in range(modules))
    )


def attention_model(name: str) -> ResidualAttentionNet:
    """The full classifier for ``name``, randomly initialised."""
    return ResidualAttentionNet(_MODULES[name])


def tapped_attention_net(name: str, model: ResidualAttentionNet) -> TappedBackbone:
    """Cut a ``ResidualAttentionNet`` into the taps listed above (``fc`` is left out)."""
    c1, c2, c3, c4 = _CHANNELS
    unit_a, unit_b, unit_c = model.stage4
    stages = [
        (TapInfo("stage1", c1, 4), Plain(nn.Sequential(model.stem, model.stage1))),
        (TapInfo("stage2", c2, 8), Plain(model.stage2)),
        (TapInfo("stage3", c3, 16), Plain(model.stage3)),
        (TapInfo("stage4a", c4, 32), Plain(unit_a)),
        (TapInfo("stage4b", c4, 32), Plain(unit_b)),
        (TapInfo("stage4c", c4, 32), Plain(unit_c)),
        (TapInfo("final", c4, 32), Plain(model.final)),
    ]
    return TappedBackbone(name, stages, IMAGENET, input_size=224)


def build_attention_net(name: str, weights: WeightsSpec) -> TappedBackbone:
    """``name`` with ``weights``: None (random init) or a ``ResidualAttentionNet`` state dict file."""
    model = attention_model(name)
    load_weights(model, weights, WeightsLayout(name, imagenet_url=None, head_prefixes=("fc.",)))
    return tapped_attention_net(name, model)


@register_backbone("attention56")
def attention56(weights: WeightsSpec = None) -> TappedBackbone:
    """Attention-56 (no official weights: None or a local state dict)."""
    return build_attention_net("attention56", weights)


@register_backbone("attention92")
def attention92(weights: WeightsSpec = None) -> TappedBackbone:
    """Attention-92 (no official weights: None or a local state dict)."""
    return build_attention_net("attention92", weights)
