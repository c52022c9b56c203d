"""Bottleneck ResNets as tapped backbones: ResNet-50/101/152 (He et al., 2016) and attention ResNets.

Every variant is a ``ResNetSpec`` built by one builder on torchvision's ``ResNet`` class, so state
dicts keep torchvision's keys (``layer4.2.conv3.weight``; ``fc.*`` is ignored). A spec says where
its attention block goes, at one of three sites of a bottleneck (timm's ``attn_layer`` idea):

- ``branch``: on the residual branch after the last BN, before the addition, as ``layerL.B.attention``
  (SE, CBAM, ECA, GC, triplet, GSoP). Built with the bottleneck, so torchvision's initialisation
  covers it, as in these papers' code.
- ``after``: on the block's output, after the addition and ReLU, i.e. between residual blocks, as
  ``layerL.B.after_block`` (BAM at stage ends, non-local, A^2, criss-cross). Added after
  torchvision's initialisation, so each keeps its own (non-local's zero BN scale and criss-cross's
  zero gamma make a fresh block the identity, as their papers require).
- ``conv2``: in place of the 3x3 conv and its BN-ReLU (SK, split attention); ``bn2`` becomes the
  identity, and the ReLU after it is a no-op on their non-negative outputs.

Where each paper puts its block, and the parameters with the 1000-way classifier: ours, and the
paper's where a table gives one for this architecture (``tests/test_backbones.py`` checks them;
"quoted" marks a figure taken as commonly cited, the table not re-read for it):

    name               block and sites                                                 ours     paper
    se_resnet50/101    SE r16, every bottleneck (Hu et al., 2018)                      28.09M   28.09M
                                                                                       49.33M   49.33M quoted
    cbam_resnet50/101  CBAM r16, every bottleneck (Woo et al., 2018)                   28.09M   28.09M
                                                                                       49.33M   49.33M quoted
    eca_resnet50/101   ECA, every bottleneck, k per stage 3,5,5,7 / 3,3,5,7 as in the  +80      +80
                       released models (Wang et al., 2020; the increments over the     +157
                       plain ResNets: their 24.37M / 42.49M totals undercount those)
    gc_resnet50        GC r16 after the last 1x1 conv of every res3-res5 bottleneck
                       (Cao et al., 2019, "c3-c5, r16")                                28.08M   28.08M quoted
    triplet_resnet50   triplet k = 7, every bottleneck (Misra et al., 2021, Table 1)   25.56M   25.56M
    gsop_resnet50      GSoP-Net1: GSoP c' = 128 in each stage's last bottleneck, res5
                       at stride 16, as the authors' code (Gao et al., 2019)           28.28M   28.29M quoted
    bam_resnet50       BAM r16 d4 after res2, res3, res4 (Park et al., 2018)           25.92M   25.92M quoted
    nonlocal_resnet50  non-local after blocks 1, 3 of res3 and 1, 3, 5 of res4: the
                       5-block setting of Wang et al., 2018 (video; no ImageNet table) 32.91M   -
    a2_resnet50        A^2, m = n = C/4, at the non-local sites (Chen et al., 2018;
                       their ImageNet model's placement is not reproduced here)        29.23M   -
    cc_resnet50        criss-cross R = 2 before res4's last bottleneck (Huang et al.,
                       2019 put it on a segmentation head; here it takes non-local's
                       1-block site in a classification ResNet)                        26.87M   -
    sknet50/101        SK M2 G32 r16 L32 in every bottleneck of ResNeXt-50/101 32x4d   27.48M   27.5M
                       (Li et al., 2019, Tables 1 and 2)                               48.74M   48.9M
    resnest50          split attention 2s1x64d in every bottleneck, with the paper's
                       ResNet-D stem (3x3 convs 32-32-64), average-pool shortcuts and
                       3x3 average-pool downsampling after the split (Zhang et al.,
                       2020)                                                           27.48M   27.5M quoted

Not registered: GSoP-Net2, which is GSoP-Net1 without res5's GSoP and with a covariance-pooling
classifier head (the part a backbone drops); ResNeSt-101, whose 64-wide deep stem feeds 128 channels
into res2, which torchvision's ResNet does not build.

Taps, at 224 px (Caffe names): res2 256x56, res3 512x28, res4 1024x14, res5a 2048x7, res5b 2048x7,
res5c_branch2b (the last bottleneck's hidden map, the input of its last 1x1 conv; 512 channels in
ResNet-50) and res5c 2048x7; res5 is 14x14 where the last stage keeps stride 1 (gsop_resnet50).
``res5c`` reads ``res5b`` as its shortcut, so the prefix for ``[res5c_branch2b, res5c]`` outputs
both ``res5c_branch2b`` and ``res5b``. Only the plain ResNets have official weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from sca_caption._torchvision import import_torchvision
from sca_caption.models.backbones.base import IMAGENET, Plain, Stage, TapInfo, TappedBackbone, register_backbone
from sca_caption.models.backbones.weights import IMAGENET as IMAGENET_WEIGHTS
from sca_caption.models.backbones.weights import WeightsLayout, WeightsSpec, load_weights
from sca_caption.models.blocks import (
    BAM,
    CBAM,
    ECA,
    GSoP,
    CrissCrossAttention,
    DoubleAttention,
    GlobalContext,
    NonLocal,
    SelectiveKernel,
    SplitAttention,
    SqueezeExcitation,
    TripletAttention,
)

Pick = Callable[[int, int], bool]  # (block index in its stage, blocks in the stage) -> placed there?


def every_block(index: int, count: int) -> bool:
    return True


def last_block(index: int, count: int) -> bool:
    return index == count - 1


def before_last_block(index: int, count: int) -> bool:
    return index == count - 2


def every_other_block(index: int, count: int) -> bool:
    """Blocks 1, 3, 5, ...: the non-local code's ``i % 2 == 1``."""
    return index % 2 == 1


@dataclass(frozen=True)
class Placement:
    """``make(channels)`` in each bottleneck of ``stages`` (0-3: res2-res5) that ``pick`` selects."""

    make: Callable[[int], nn.Module]
    stages: tuple[int, ...] = (0, 1, 2, 3)
    pick: Pick = every_block

    def at(self, stage: int, index: int, count: int) -> bool:
        return stage in self.stages and self.pick(index, count)


@dataclass(frozen=True)
class ResNetSpec:
    """A bottleneck ResNet: blocks per stage, ResNeXt grouping, attention sites, stem and strides."""

    layers: tuple[int, int, int, int]
    weights_enum: str | None = None  # torchvision weights enum; None: no official weights
    groups: int = 1
    width_per_group: int = 64
    branch: Placement | None = None
    after: Placement | None = None
    conv2: Callable[[int, int], nn.Module] | None = None  # (width, stride) -> the 3x3 conv's replacement
    resnet_d: bool = False  # deep 3x3 stem and average-pool shortcuts (He et al., "Bag of Tricks", 2019)
    res5_stride: int = 2

    @property
    def plain(self) -> bool:
        return self.branch is None and self.after is None and self.conv2 is None


R50, R101, R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)


def _eca(kernels: tuple[int, int, int, int]) -> Callable[[int], nn.Module]:
    """ECA with kernel ``kernels[s]`` on stage s (256·2^s output channels)."""
    return lambda channels: ECA(channels, kernel_size=kernels[(channels // 256).bit_length() - 1])


def _selective_kernel(width: int, stride: int) -> nn.Module:
    return SelectiveKernel(width, width, stride, branches=2, groups=32, reduction=16, min_dim=32)


def _split_attention(width: int, stride: int) -> nn.Module:
    """Split attention at stride 1, then a 3x3 average pool where the block downsamples (ResNeSt's "avd")."""
    conv = SplitAttention(width, width, radix=2, cardinality=1)
    return conv if stride == 1 else nn.Sequential(conv, nn.AvgPool2d(3, stride, padding=1))


_NON_LOCAL_SITES = {"stages": (1, 2), "pick": every_other_block}
_VARIANTS: dict[str, ResNetSpec] = {
    "resnet50": ResNetSpec(R50, "ResNet50_Weights"),
    "resnet101": ResNetSpec(R101, "ResNet101_Weights"),
    "resnet152": ResNetSpec(R152, "ResNet152_Weights"),
    "se_resnet50": ResNetSpec(R50, branch=Placement(SqueezeExcitation)),
    "se_resnet101": ResNetSpec(R101, branch=Placement(SqueezeExcitation)),
    "cbam_resnet50": ResNetSpec(R50, branch=Placement(CBAM)),
    "cbam_resnet101": ResNetSpec(R101, branch=Placement(CBAM)),
    "eca_resnet50": ResNetSpec(R50, branch=Placement(_eca((3, 5, 5, 7)))),
    "eca_resnet101": ResNetSpec(R101, branch=Placement(_eca((3, 3, 5, 7)))),
    "gc_resnet50": ResNetSpec(R50, branch=Placement(GlobalContext, stages=(1, 2, 3))),
    "triplet_resnet50": ResNetSpec(R50, branch=Placement(TripletAttention)),
    "gsop_resnet50": ResNetSpec(R50, branch=Placement(GSoP, pick=last_block), res5_stride=1),
    "bam_resnet50": ResNetSpec(R50, after=Placement(BAM, stages=(0, 1, 2), pick=last_block)),
    "nonlocal_resnet50": ResNetSpec(R50, after=Placement(NonLocal, **_NON_LOCAL_SITES)),
    "a2_resnet50": ResNetSpec(R50, after=Placement(DoubleAttention, **_NON_LOCAL_SITES)),
    "cc_resnet50": ResNetSpec(R50, after=Placement(CrissCrossAttention, stages=(2,), pick=before_last_block)),
    "sknet50": ResNetSpec(R50, groups=32, width_per_group=4, conv2=_selective_kernel),
    "sknet101": ResNetSpec(R101, groups=32, width_per_group=4, conv2=_selective_kernel),
    "resnest50": ResNetSpec(R50, conv2=_split_attention, resnet_d=True),
}


def bottleneck_hidden(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision bottleneck's first two convs: (B, C_in, H, W) -> relu(bn2(conv2(...))), (B, w, H/s, W/s)."""
    out = block.relu(block.bn1(block.conv1(x)))
    return block.relu(block.bn2(block.conv2(out)))


def bottleneck_output(block: nn.Module, hidden: Tensor, x: Tensor) -> Tensor:
    """The rest of the bottleneck: after_block(relu(attention(bn3(conv3(hidden))) + shortcut(x))), (B, 4w, H/s, W/s).

    ``attention`` and ``after_block`` are the modules a spec placed in the block, where it has them.
    """
    out = block.bn3(block.conv3(hidden))
    attention = getattr(block, "attention", None)
    if attention is not None:
        out = attention(out)
    shortcut = x if block.downsample is None else block.downsample(x)
    out = block.relu(out + shortcut)
    after = getattr(block, "after_block", None)
    return out if after is None else after(out)


@cache
def _attended_bottleneck() -> type[nn.Module]:
    """torchvision's ``Bottleneck``, run through the two functions above."""

    class AttendedBottleneck(import_torchvision().models.resnet.Bottleneck):
        def forward(self, x: Tensor) -> Tensor:
            return bottleneck_output(self, bottleneck_hidden(self, x), x)

    return AttendedBottleneck


class _StageBlocks:
    """The ``block`` torchvision's ``_make_layer`` calls for one stage, once per bottleneck in order:
    builds it and puts in the spec's ``conv2`` and ``branch`` modules."""

    expansion = 4

    def __init__(self, spec: ResNetSpec, stage: int, count: int, block: type[nn.Module]) -> None:
        self.spec, self.stage, self.count, self.block = spec, stage, count, block
        self.built = 0

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        block = self.block(*args, **kwargs)
        if self.spec.conv2 is not None:
            block.conv2 = self.spec.conv2(block.conv2.in_channels, block.conv2.stride[0])
            block.bn2 = nn.Identity()
        branch = self.spec.branch
        if branch is not None and branch.at(self.stage, self.built, self.count):
            block.attention = branch.make(block.bn3.num_features)
        self.built += 1
        return block


def _deep_stem() -> nn.Sequential:
    """ResNet-D's stem: three 3x3 convs, 3 -> 32 (stride 2) -> 32 -> 64; torchvision's ``bn1`` follows."""

    def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        conv = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's init
        return conv

    return nn.Sequential(
        conv(3, 32, 2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        conv(32, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        conv(32, 64),
    )  # fmt: skip


def _average_pool_shortcut(downsample: nn.Sequential) -> nn.Sequential:
    """ResNet-D's projection shortcut: average-pool by the stride, then the 1x1 conv at stride 1 and its BN."""
    conv, norm = downsample
    stride = conv.stride[0]
    pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False), norm)


@cache
def _spec_resnet() -> type[nn.Module]:
    """torchvision's ``ResNet`` built from a ``ResNetSpec``."""
    resnet = import_torchvision().models.resnet

    class SpecResNet(resnet.ResNet):
        def __init__(self, spec: ResNetSpec) -> None:
            self.spec = spec
            block = resnet.Bottleneck if spec.plain else _attended_bottleneck()
            super().__init__(block, list(spec.layers), groups=spec.groups, width_per_group=spec.width_per_group)
            if spec.resnet_d:
                self.conv1 = _deep_stem()
            if spec.after is not None:
                for stage, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
                    for index, bottleneck in enumerate(layer):
                        if spec.after.at(stage, index, len(layer)):
                            bottleneck.after_block = spec.after.make(bottleneck.bn3.num_features)

        def _make_layer(
            self, block: Any, planes: int, blocks: int, stride: int = 1, dilate: bool = False
        ) -> nn.Sequential:
            stage = (planes // 64).bit_length() - 1  # planes 64, 128, 256, 512
            stride = self.spec.res5_stride if stage == 3 else stride
            maker = _StageBlocks(self.spec, stage, blocks, block)
            layer = super()._make_layer(maker, planes, blocks, stride, dilate)
            if self.spec.resnet_d and layer[0].downsample is not None:
                layer[0].downsample = _average_pool_shortcut(layer[0].downsample)
            return layer

    return SpecResNet


def resnet_model(name: str) -> nn.Module:
    """The full torchvision ``ResNet`` (with ``fc``) for ``name``, randomly initialised."""
    return _spec_resnet()(_VARIANTS[name])


def weights_layout(name: str) -> WeightsLayout:
    """Where ``name``'s weights come from; file keys are ``resnet_model(name)``'s."""
    enum = _VARIANTS[name].weights_enum
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
    hidden = res5c.conv3.in_channels
    top = 16 * _VARIANTS[name].res5_stride
    stages: list[tuple[TapInfo, Stage]] = [
        (TapInfo("res2", 256, 4), Plain(stem)),
        (TapInfo("res3", 512, 8), Plain(model.layer2)),
        (TapInfo("res4", 1024, 16), Plain(model.layer3)),
        (TapInfo("res5a", 2048, top), Plain(res5a)),
        (TapInfo("res5b", 2048, top), Plain(res5b)),
        (TapInfo("res5c_branch2b", hidden, top), BottleneckHidden(res5c)),
        (TapInfo("res5c", 2048, top), BottleneckOutput(res5c, "res5b")),
    ]
    return TappedBackbone(name, stages, IMAGENET, input_size=224)


def build_resnet(name: str, weights: WeightsSpec) -> TappedBackbone:
    """``name`` with ``weights`` (None, "imagenet" or a torchvision-keyed state dict file)."""
    model = resnet_model(name)
    load_weights(model, weights, weights_layout(name))
    return tapped_resnet(name, model)


def _register(name: str) -> None:
    official = _VARIANTS[name].weights_enum is not None

    def build(weights: WeightsSpec = IMAGENET_WEIGHTS if official else None) -> TappedBackbone:
        return build_resnet(name, weights)

    default = "torchvision's IMAGENET1K_V1 weights" if official else "no official weights: None or a local state dict"
    build.__doc__ = f"{name}, as the module docstring describes ({default})."
    register_backbone(name)(build)


for _name in _VARIANTS:
    _register(_name)
