"""A^2 double attention, non-local, criss-cross and residual attention blocks against their equations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sca_caption.models.blocks import AttentionModule, CrissCrossAttention, DoubleAttention, NonLocal, ResidualUnit


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution on (B, C_in, M) columns -> (B, C_out, M)."""
    out = torch.einsum("oc,bcm->bom", conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[None, :, None]


# --- A^2 --------------------------------------------------------------------------------------


def test_double_attention_matches_gather_then_distribute() -> None:
    block = DoubleAttention(8, features=3, descriptors=2)
    x = torch.randn(2, 8, 3, 4)
    flat = x.flatten(2)
    a = conv1x1(flat, block.phi)
    b = torch.softmax(conv1x1(flat, block.theta), dim=2)  # over the 12 locations
    v = torch.softmax(conv1x1(flat, block.rho), dim=1)  # over the 2 descriptors
    g = torch.einsum("bml,bnl->bmn", a, b)  # g_mn = sum_l a_ml b_nl
    z = torch.einsum("bmn,bnl->bml", g, v)  # z_ml = sum_n g_mn v_nl
    expected = x + conv1x1(z, block.project).view(2, 8, 3, 4)
    torch.testing.assert_close(block(x), expected)
    torch.testing.assert_close(b.sum(dim=2), torch.ones(2, 2))
    torch.testing.assert_close(v.sum(dim=1), torch.ones(2, 12))


def test_double_attention_orders_agree() -> None:
    gather_first = DoubleAttention(16, order="gather_first").double()
    pairwise_first = DoubleAttention(16, order="pairwise_first").double()
    pairwise_first.load_state_dict(gather_first.state_dict())
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(gather_first(x), pairwise_first(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(gather_first(x), x)


# --- non-local --------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_fresh_non_local_is_the_identity(train: bool) -> None:
    block = NonLocal(8).train(train)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x), x)


def test_non_local_attention_rows_are_softmax_of_embedded_dot_products() -> None:
    block = NonLocal(8)
    x = torch.randn(2, 8, 3, 5)
    f = block.attention(x)
    assert f.shape == (2, 15, 15)
    torch.testing.assert_close(f.sum(dim=2), torch.ones(2, 15))
    theta, phi = conv1x1(x.flatten(2), block.theta), conv1x1(x.flatten(2), block.phi)
    torch.testing.assert_close(f, torch.softmax(torch.einsum("bci,bcj->bij", theta, phi), dim=2))


def test_non_local_output_is_residual_of_batchnormed_projection() -> None:
    block = NonLocal(8, inner=4).eval()
    with torch.no_grad():
        block.bn.weight.uniform_(0.5, 1.5)
        block.bn.bias.normal_()
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 3, 3)
    flat = x.flatten(2)
    f = block.attention(x)
    y = torch.einsum("bij,bcj->bci", f, conv1x1(flat, block.g))  # y_i = sum_j f_ij g_j
    wy = conv1x1(y, block.w_z)
    bn = block.bn
    normed = (wy - bn.running_mean[:, None]) / (bn.running_var[:, None] + bn.eps).sqrt()
    expected = flat + normed * bn.weight[:, None] + bn.bias[:, None]
    torch.testing.assert_close(block(x), expected.view(2, 8, 3, 3))


# --- criss-cross ------------------------------------------------------------------------------


def criss_cross_pass_by_hand(block: CrissCrossAttention, x: torch.Tensor, self_twice: bool = False) -> torch.Tensor:
    """One pass, position by position: softmax over u's column (u left out) and u's row (u kept)."""
    b, _, h, w = x.shape
    q, k, v = (conv1x1(x.flatten(2), conv).view(b, -1, h, w) for conv in (block.query, block.key, block.value))
    y = x.clone()
    for i in range(h):
        for j in range(w):
            column = [(i2, j) for i2 in range(h) if i2 != i or self_twice]
            omega = column + [(i, j2) for j2 in range(w)]
            energy = torch.stack([(q[:, :, i, j] * k[:, :, p, r]).sum(dim=1) for p, r in omega], dim=1)
            weights = torch.softmax(energy, dim=1)  # (B, |omega|)
            gathered = sum(weights[:, n, None] * v[:, :, p, r] for n, (p, r) in enumerate(omega))
            y[:, :, i, j] = block.gamma * gathered + x[:, :, i, j]
    return y


@pytest.mark.parametrize("train", [True, False])
def test_fresh_criss_cross_is_the_identity(train: bool) -> None:
    block = CrissCrossAttention(8).train(train)
    x = torch.randn(2, 8, 4, 3)
    assert torch.equal(block(x), x)


def test_criss_cross_is_two_shared_passes_over_row_and_column() -> None:
    block = CrissCrossAttention(8, reduction=2)
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 8, 3, 4)
    once = criss_cross_pass_by_hand(block, x)
    torch.testing.assert_close(block(x), criss_cross_pass_by_hand(block, once))
    # mutations: one pass only, or u counted in both its row and its column, are different blocks
    assert (block(x) - once).abs().max() > 1e-2
    twice = criss_cross_pass_by_hand(block, criss_cross_pass_by_hand(block, x, True), True)
    assert (block(x) - twice).abs().max() > 1e-2


def test_criss_cross_weights_cover_row_and_column_once() -> None:
    block = CrissCrossAttention(8, reduction=2)
    column, row = block.attention(torch.randn(2, 8, 3, 4))
    assert column.shape == (2, 3, 4, 3) and row.shape == (2, 3, 4, 4)
    torch.testing.assert_close(column.sum(dim=3) + row.sum(dim=3), torch.ones(2, 3, 4))
    own = column[:, torch.arange(3), :, torch.arange(3)]  # column weight of u itself
    assert torch.equal(own, torch.zeros_like(own))


# --- residual attention -----------------------------------------------------------------------


def force_mask(module: AttentionModule, logit: float) -> None:
    last = module.mask.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)


@pytest.mark.parametrize(("skips", "size"), [(2, 16), (1, 8), (0, 4), (2, 7)])
def test_attention_module_with_zero_mask_returns_its_trunk(skips: int, size: int) -> None:
    module = AttentionModule(8, skips=skips, p=0).eval()
    force_mask(module, -1e4)
    x = torch.randn(2, 8, size, size)
    torch.testing.assert_close(module(x), module.trunk(x))


def test_attention_module_is_one_plus_mask_times_trunk_between_pre_and_post_units() -> None:
    module = AttentionModule(8, skips=1).eval()
    x = torch.randn(2, 8, 8, 8)
    pre = module.pre(x)
    mask = module.mask(pre)
    assert mask.shape == x.shape and 0 < mask.min() and mask.max() < 1
    torch.testing.assert_close(module(x), module.post((1 + mask) * module.trunk(pre)))
    force_mask(module, 1e4)  # mask = 1 doubles the trunk
    torch.testing.assert_close(module(x), module.post(2 * module.trunk(pre)))


def test_attention_module_has_the_papers_unit_counts() -> None:
    module = AttentionModule(8, skips=2)  # stage 1: p = 1, t = 2, r = 1
    assert (len(module.pre), len(module.trunk), len(module.post)) == (1, 2, 1)
    assert len(module.mask.down) == len(module.mask.skip) == len(module.mask.up) == 2
    assert [len(d[1]) for d in module.mask.down] == [1, 1] and len(module.mask.bottom[1]) == 2
    pools = [m for m in module.mask.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3  # 56 -> 28 -> 14 -> 7 in stage 1


def test_residual_unit_is_identity_plus_bottleneck() -> None:
    unit = ResidualUnit(8, 8).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        unit.conv3.weight.zero_()
    torch.testing.assert_close(unit(x), x)
    assert unit.conv2.out_channels == 2


def test_residual_unit_projects_the_preactivated_input_when_the_shape_changes() -> None:
    unit = ResidualUnit(8, 16, stride=2).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        unit.conv3.weight.zero_()
    pre = torch.relu(unit.bn1(x))
    torch.testing.assert_close(unit(x), unit.shortcut(pre))
    assert unit(x).shape == (2, 16, 3, 3)
