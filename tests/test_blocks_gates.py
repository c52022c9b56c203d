"""SE, CBAM, BAM, ECA, GC, GSoP and triplet attention against their equations, written out with functional ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from block_support import bn, randomise_norms
from sca_caption.models.blocks import (
    BAM,
    CBAM,
    ECA,
    GSoP,
    GlobalContext,
    SqueezeExcitation,
    TripletAttention,
    centred_covariance,
    eca_kernel_size,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def fc(z: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 convolution applied to vectors (B, C_in) -> (B, C_out)."""
    out = z @ conv.weight[:, :, 0, 0].T
    return out if conv.bias is None else out + conv.bias


# --- SE ---------------------------------------------------------------------------------------


def test_se_is_input_times_sigmoid_mlp_of_mean() -> None:
    se = SqueezeExcitation(8, reduction=2)
    x = torch.randn(2, 8, 5, 4)
    s = torch.sigmoid(fc(torch.relu(fc(x.mean(dim=(2, 3)), se.fc1)), se.fc2))
    assert se.fc1.out_channels == 4
    torch.testing.assert_close(se(x), x * s[:, :, None, None])


# --- CBAM -------------------------------------------------------------------------------------


def cbam_by_hand(cbam: CBAM, x: Tensor) -> Tensor:
    first, _, second = cbam.channel_gate.mlp

    def mlp(v: Tensor) -> Tensor:
        return fc(torch.relu(fc(v, first)), second)

    channel = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    refined = x * channel[:, :, None, None]
    descriptor = torch.cat([refined.mean(dim=1, keepdim=True), refined.amax(dim=1, keepdim=True)], dim=1)
    conv = cbam.spatial_gate.conv
    spatial = torch.sigmoid(F.conv2d(descriptor, conv.weight, conv.bias, padding=3))
    return refined * spatial


def test_cbam_is_channel_gate_then_spatial_gate() -> None:
    cbam = CBAM(8, reduction=2, spatial_kernel=7)
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(cbam(x), cbam_by_hand(cbam, x))


def test_cbam_spatial_descriptor_stacks_mean_before_max() -> None:
    cbam = CBAM(4, reduction=2, spatial_kernel=3)
    gate = cbam.spatial_gate
    with torch.no_grad():
        gate.conv.weight.zero_()
        gate.conv.bias.zero_()
        gate.conv.weight[0, 0, 1, 1] = 1.0  # centre tap of the first descriptor map only
    x = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(gate(x), torch.sigmoid(torch.tensor(4.0)).view(1, 1, 1, 1))


# --- BAM --------------------------------------------------------------------------------------


def bam_branches_by_hand(bam: BAM, x: Tensor) -> tuple[Tensor, Tensor]:
    first, _, second = bam.channel_branch.mlp
    mc = fc(torch.relu(fc(x.mean(dim=(2, 3)), first)), second)[:, :, None, None]
    mc = bn(mc, bam.channel_branch.bn)
    body = bam.spatial_branch.body
    h = torch.relu(bn(F.conv2d(x, body[0].weight), body[1]))
    h = torch.relu(bn(F.conv2d(h, body[3].weight, padding=4, dilation=4), body[4]))
    h = torch.relu(bn(F.conv2d(h, body[6].weight, padding=4, dilation=4), body[7]))
    ms = bn(F.conv2d(h, body[9].weight), body[10])
    return mc, ms


def test_bam_adds_the_branches_as_in_the_paper() -> None:
    bam = randomise_norms(BAM(32, reduction=16, dilation=4))
    x = torch.randn(2, 32, 9, 9)
    mc, ms = bam_branches_by_hand(bam, x)
    assert mc.shape == (2, 32, 1, 1) and ms.shape == (2, 1, 9, 9)
    torch.testing.assert_close(bam(x), x + x * torch.sigmoid(mc + ms))
    multiplicative = x + x * torch.sigmoid(mc * ms)
    assert (bam(x) - multiplicative).abs().max() > 1e-2


def test_bam_spatial_branch_uses_dilation_four() -> None:
    bam = BAM(32)
    convs = [m for m in bam.spatial_branch.modules() if isinstance(m, nn.Conv2d)]
    dilated = [m for m in convs if m.kernel_size == (3, 3)]
    assert [m.dilation for m in dilated] == [(4, 4), (4, 4)]
    assert bam.spatial_branch.body[0].out_channels == 2


# --- ECA --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "k"), [(64, 3), (128, 5), (256, 5), (512, 5), (2048, 7)])
def test_eca_kernel_size_follows_the_formula(channels: int, k: int) -> None:
    assert eca_kernel_size(channels) == k
    assert ECA(channels).conv.kernel_size == (k,)


def test_eca_kernel_size_can_be_fixed_as_in_the_released_eca_resnets() -> None:
    assert ECA(256, kernel_size=3).conv.kernel_size == (3,)  # the formula would give 5


def test_eca_is_a_zero_padded_1d_conv_over_pooled_channels() -> None:
    eca = ECA(8)  # log2(8) = 3, (3 + 1) / 2 = 2 -> k = 3
    assert eca.kernel_size == 3
    x = torch.randn(2, 8, 3, 4)
    pooled = x.mean(dim=(2, 3)).tolist()
    w = eca.conv.weight.view(3).tolist()
    gate = torch.zeros(2, 8)
    for b in range(2):
        padded = [0.0] + pooled[b] + [0.0]
        for c in range(8):
            gate[b, c] = w[0] * padded[c] + w[1] * padded[c + 1] + w[2] * padded[c + 2]
    torch.testing.assert_close(eca(x), x * torch.sigmoid(gate)[:, :, None, None])


# --- GC ---------------------------------------------------------------------------------------


def test_gc_adds_the_transformed_softmax_context() -> None:
    gc = randomise_norms(GlobalContext(8, reduction=2))
    x = torch.randn(2, 8, 4, 3)
    flat = x.flatten(2)  # (B, C, M)
    weights = torch.softmax(torch.einsum("c,bcm->bm", gc.key.weight.view(8), flat), dim=1)
    context = (flat * weights[:, None, :]).sum(dim=2)  # (B, C)
    first, norm, _, second = gc.transform
    hidden = F.layer_norm(fc(context, first), [4], norm.weight.view(4), norm.bias.view(4), norm.eps)
    transform = fc(torch.relu(hidden), second)
    torch.testing.assert_close(gc(x), x + transform[:, :, None, None])


# --- GSoP -------------------------------------------------------------------------------------


def test_covariance_is_the_centred_covariance_over_locations() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [2.0, 0.0, 2.0, 0.0]]).view(1, 2, 2, 2)
    # channel means 3 and 1; deviations (-2, -1, 0, 3) and (1, -1, 1, -1); divide by M = 4
    expected = torch.tensor([[[14 / 4, -4 / 4], [-4 / 4, 4 / 4]]])
    torch.testing.assert_close(centred_covariance(x), expected)


def test_covariance_matches_a_loop_over_entries() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    flat = x.flatten(2)
    mean = flat.mean(dim=2)
    loop = torch.zeros(2, 3, 3, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                products = [(flat[b, i, m] - mean[b, i]) * (flat[b, j, m] - mean[b, j]) for m in range(20)]
                loop[b, i, j] = sum(products) / 20
    torch.testing.assert_close(centred_covariance(x), loop)


def test_gsop_gate_is_rowwise_conv_of_the_covariance() -> None:
    gsop = randomise_norms(GSoP(6, reduced=4, expansion=2))
    x = torch.randn(2, 6, 5, 5)
    conv, reduce_bn, _ = gsop.reduce
    reduced = torch.relu(bn(F.conv2d(x, conv.weight), reduce_bn))
    flat = reduced.flatten(2)
    centred = flat - flat.mean(dim=2, keepdim=True)
    cov = centred @ centred.transpose(1, 2) / 25  # (B, 4, 4)
    rows = bn(cov.unsqueeze(-1), gsop.row_bn).squeeze(-1)  # BN per covariance row
    kernel = gsop.row_conv.weight.view(4, 2, 4)  # row i -> 2 outputs, each a dot product with row i
    rowwise = torch.einsum("iqj,bij->biq", kernel, rows).reshape(2, 8) + gsop.row_conv.bias
    weights = torch.sigmoid(fc(torch.relu(rowwise), gsop.expand))
    torch.testing.assert_close(gsop(x), x * weights[:, :, None, None])


# --- triplet attention ------------------------------------------------------------------------


def plane_gate(gate: nn.Module, pooled_max: Tensor, pooled_mean: Tensor) -> Tensor:
    """sigmoid(BN(conv([max; mean]))) for one (B, P, Q) plane pair -> (B, P, Q)."""
    z = torch.stack([pooled_max, pooled_mean], dim=1)
    k = gate.conv.kernel_size[0]
    return torch.sigmoid(bn(F.conv2d(z, gate.conv.weight, padding=k // 2), gate.bn))[:, 0]


def triplet_by_hand(block: TripletAttention, x: Tensor, zpool_order: str = "max_mean") -> Tensor:
    """The three branches with the Z-pools taken by explicit loops over the pooled axis."""
    b, c, h, w = x.shape

    def pools(values: list[Tensor]) -> tuple[Tensor, Tensor]:
        top = values[0]
        for v in values[1:]:
            top = torch.maximum(top, v)
        mean = sum(values) / len(values)
        return (top, mean) if zpool_order == "max_mean" else (mean, top)

    cw = plane_gate(block.cw, *pools([x[:, :, i, :] for i in range(h)]))  # (B, C, W): pooled over H
    hc = plane_gate(block.hc, *pools([x[:, :, :, j].transpose(1, 2) for j in range(w)]))  # (B, H, C)
    hw = plane_gate(block.hw, *pools([x[:, k] for k in range(c)]))  # (B, H, W)
    y = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            y[:, :, i, j] = x[:, :, i, j] * (cw[:, :, j] + hc[:, i, :] + hw[:, i, j][:, None]) / 3
    return y


def test_triplet_attention_averages_the_three_plane_gates() -> None:
    block = randomise_norms(TripletAttention(4, kernel_size=3))
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(block(x), triplet_by_hand(block, x))
    # mutation: a Z-pool that stacks the mean before the max is a different block
    assert (block(x) - triplet_by_hand(block, x, zpool_order="mean_max")).abs().max() > 1e-2
