"""Attention ResNets: every block sits where its paper puts it and runs once per forward; the
ResNeSt and GSoP-Net recipes; blocks added between residual blocks start as the identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sca_caption.models.backbones import build_backbone
from sca_caption.models.backbones.resnet import resnet_model
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

R50 = (3, 4, 6, 3)
NON_LOCAL_SITES = [f"layer{s}.{b}.after_block" for s, b in [(2, 1), (2, 3), (3, 1), (3, 3), (3, 5)]]


def every_bottleneck(site: str, stages: tuple[int, ...] = (1, 2, 3, 4)) -> list[str]:
    return [f"layer{s}.{b}.{site}" for s in stages for b in range(R50[s - 1])]


RESNEST_SPLITS = [name + (".0" if name.endswith(("layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2")) else "")
                  for name in every_bottleneck("conv2")]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "block", "expected"),
    [
        ("se_resnet50", SqueezeExcitation, every_bottleneck("attention")),
        ("cbam_resnet50", CBAM, every_bottleneck("attention")),
        ("eca_resnet50", ECA, every_bottleneck("attention")),
        ("triplet_resnet50", TripletAttention, every_bottleneck("attention")),
        ("gc_resnet50", GlobalContext, every_bottleneck("attention", stages=(2, 3, 4))),
        ("gsop_resnet50", GSoP, ["layer1.2.attention", "layer2.3.attention", "layer3.5.attention", "layer4.2.attention"]),
        ("bam_resnet50", BAM, ["layer1.2.after_block", "layer2.3.after_block", "layer3.5.after_block"]),
        ("nonlocal_resnet50", NonLocal, NON_LOCAL_SITES),
        ("a2_resnet50", DoubleAttention, NON_LOCAL_SITES),
        ("cc_resnet50", CrissCrossAttention, ["layer3.4.after_block"]),
        ("sknet50", SelectiveKernel, every_bottleneck("conv2")),
        ("resnest50", SplitAttention, RESNEST_SPLITS),
    ],
)
def test_each_block_sits_where_its_paper_puts_it_and_runs_once(
    name: str, block: type[nn.Module], expected: list[str]
) -> None:
    torch.manual_seed(0)
    model = resnet_model(name).eval()
    placed = {n: m for n, m in model.named_modules() if isinstance(m, block)}
    assert list(placed) == expected
    calls = dict.fromkeys(placed, 0)
    for n, m in placed.items():
        m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1))
    with torch.inference_mode():
        model(torch.rand(1, 3, 64, 64))
    assert set(calls.values()) == {1}


def test_eca_kernels_are_the_released_ones_per_stage() -> None:
    with torch.device("meta"):
        model = resnet_model("eca_resnet50")
    kernels = [m.kernel_size for m in model.modules() if isinstance(m, ECA)]
    assert kernels == [3] * 3 + [5] * 4 + [5] * 6 + [7] * 3


def test_sknet_is_resnext_32x4d_with_sk_in_place_of_the_3x3_conv() -> None:
    with torch.device("meta"):
        model = resnet_model("sknet50")
    first = model.layer1[0]
    assert isinstance(first.bn2, nn.Identity) and first.conv2.channels == 128  # ResNeXt-50 32x4d widths
    assert model.layer4[0].conv2.paths[0][0].stride == (2, 2)


def test_resnest50_has_the_deep_stem_average_pool_shortcuts_and_pooled_downsampling() -> None:
    with torch.device("meta"):
        model = resnet_model("resnest50")
    stem = [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in model.conv1 if isinstance(m, nn.Conv2d)]
    assert stem == [(32, 3, 2), (32, 3, 1), (64, 3, 1)]
    pool, conv, _ = model.layer2[0].downsample
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and conv.stride == (1, 1)
    split, avd = model.layer2[0].conv2
    assert split.conv[0].stride == (1, 1) and (avd.kernel_size, avd.stride) == (3, 2)
    assert isinstance(model.layer1[0].downsample[0], nn.AvgPool2d)  # stride 1: a 1x1 pool, as in the paper's code


def test_gsop_net_keeps_res5_at_stride_16() -> None:
    backbone = build_backbone("gsop_resnet50", weights=None)
    assert [backbone.tap_info[t].stride for t in ("res4", "res5a", "res5c")] == [16, 16, 16]


@pytest.mark.parametrize("name", ["nonlocal_resnet50", "cc_resnet50"])
def test_fresh_blocks_between_residual_blocks_are_the_identity(name: str) -> None:
    torch.manual_seed(0)
    model = resnet_model(name).eval()
    plain = resnet_model("resnet50").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".after_block." not in k})
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(x))
