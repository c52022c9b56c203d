"""Every block: output shape, gradients reaching every parameter, one-line errors on bad input."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from sca_caption.models.blocks import (
    BAM,
    CBAM,
    CSRA,
    ECA,
    CrissCrossAttention,
    GSoP,
    AttentionModule,
    BlockConfigError,
    DoubleAttention,
    GlobalContext,
    MultiHeadCSRA,
    NonLocal,
    ResidualUnit,
    SelectiveKernel,
    SplitAttention,
    SqueezeExcitation,
    TripletAttention,
)

C = 32
SHAPE_KEEPING: dict[str, Callable[[], nn.Module]] = {
    "se": lambda: SqueezeExcitation(C, reduction=4),
    "cbam": lambda: CBAM(C, reduction=4),
    "bam": lambda: BAM(C, reduction=4),
    "eca": lambda: ECA(C),
    "gc": lambda: GlobalContext(C, reduction=4),
    "gsop": lambda: GSoP(C, reduced=8),
    "a2_gather_first": lambda: DoubleAttention(C, order="gather_first"),
    "a2_pairwise_first": lambda: DoubleAttention(C, order="pairwise_first"),
    "non_local": lambda: NonLocal(C),
    "residual_attention": lambda: AttentionModule(C, skips=1),
    "residual_unit": lambda: ResidualUnit(C, C),
    "selective_kernel": lambda: SelectiveKernel(C, C, groups=4, reduction=4, min_dim=4),
    "split_attention": lambda: SplitAttention(C, C),
    "split_attention_radix1": lambda: SplitAttention(C, C, radix=1, cardinality=2),
    "triplet": lambda: TripletAttention(C),
    "criss_cross": lambda: CrissCrossAttention(C),
}
CLASSIFIERS: dict[str, Callable[[], nn.Module]] = {
    "csra_softmax": lambda: CSRA(C, 5, temperature=2, lam=0.3),
    "csra_max": lambda: CSRA(C, 5, temperature=99, lam=0.3),
    "multi_head_csra": lambda: MultiHeadCSRA(C, 5, num_heads=4),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomise_parameters(module: nn.Module) -> nn.Module:
    """Move every parameter off its initial value (zero-initialised scales would block gradients)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


@pytest.mark.parametrize("name", sorted(SHAPE_KEEPING))
def test_block_keeps_the_input_shape(name: str) -> None:
    x = torch.randn(2, C, 8, 6)
    assert SHAPE_KEEPING[name]()(x).shape == x.shape


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifier_head_gives_one_logit_per_class(name: str) -> None:
    assert CLASSIFIERS[name]()(torch.randn(2, C, 4, 3)).shape == (2, 5)


@pytest.mark.parametrize("name", sorted(SHAPE_KEEPING | CLASSIFIERS))
def test_gradients_reach_every_parameter_and_the_input(name: str) -> None:
    block = randomise_parameters((SHAPE_KEEPING | CLASSIFIERS)[name]()).train()
    x = torch.randn(2, C, 8, 6, requires_grad=True)
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    dead = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient for {dead}"


@pytest.mark.parametrize("name", sorted(SHAPE_KEEPING | CLASSIFIERS))
def test_wrong_channel_count_is_a_one_line_block_error(name: str) -> None:
    block = (SHAPE_KEEPING | CLASSIFIERS)[name]()
    message = rf"expected a \(B, {C}, H, W\) tensor, got shape \(2, 7, 4, 4\)"
    with pytest.raises(BlockConfigError, match=message):
        block(torch.randn(2, 7, 4, 4))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SqueezeExcitation(0), "SqueezeExcitation: channels"),
        (lambda: CBAM(8, spatial_kernel=4), "CBAM: spatial_kernel must be a positive odd number"),
        (lambda: BAM(8, dilation=0), "BAM: channels"),
        (lambda: ECA(0), "ECA: channels"),
        (lambda: GlobalContext(16, reduction=16), "GlobalContext: channels // reduction"),
        (lambda: GSoP(8, reduced=0), "GSoP: channels"),
        (lambda: DoubleAttention(8, order="sideways"), "DoubleAttention: order must be one of"),
        (lambda: NonLocal(8, inner=0), "NonLocal: channels"),
        (lambda: AttentionModule(8, skips=-1), "AttentionModule: need channels"),
        (lambda: ResidualUnit(8, 2), "ResidualUnit: need"),
        (lambda: CSRA(8, 3, temperature=0), "CSRA: in_channels"),
        (lambda: ECA(8, kernel_size=4), "ECA: the kernel size must be a positive odd number"),
        (lambda: SelectiveKernel(8, 8, groups=3), "SelectiveKernel: groups \\(3\\) must divide"),
        (lambda: SelectiveKernel(8, 8, branches=0), "SelectiveKernel: channels, stride"),
        (lambda: SplitAttention(6, 8, radix=4), "SplitAttention: radix x cardinality \\(4x1\\)"),
        (lambda: SplitAttention(8, 8, radix=0), "SplitAttention: channels, stride"),
        (lambda: TripletAttention(8, kernel_size=2), "TripletAttention: kernel_size must be a positive odd"),
        (lambda: CrissCrossAttention(4, reduction=8), "CrissCrossAttention: channels \\(4\\) must be at least"),
        (lambda: CrissCrossAttention(8, recurrence=0), "CrissCrossAttention: reduction"),
    ],
)
def test_impossible_settings_raise_block_errors(build: Callable[[], nn.Module], message: str) -> None:
    with pytest.raises(BlockConfigError, match=message):
        build()
