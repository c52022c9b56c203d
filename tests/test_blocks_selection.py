"""Selective kernel and split attention against their equations, with the branch mixing written as loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from block_support import bn, randomise_norms
from sca_caption.models.blocks import SelectiveKernel, SplitAttention


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def softmax_list(logits: list[Tensor]) -> list[Tensor]:
    """Softmax across a list of same-shape tensors, written out."""
    exps = [torch.exp(v) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


# --- selective kernel -------------------------------------------------------------------------


def sk_branches_by_hand(sk: SelectiveKernel, x: Tensor, stride: int) -> list[Tensor]:
    """U_m = ReLU(BN(grouped 3x3 conv with dilation m + 1)), each (B, C, H', W')."""
    out = []
    for m, (conv, norm, _) in enumerate(sk.paths):
        u = F.conv2d(x, conv.weight, stride=stride, padding=m + 1, dilation=m + 1, groups=conv.groups)
        out.append(torch.relu(bn(u, norm)))
    return out


def sk_logits_by_hand(sk: SelectiveKernel, u: list[Tensor]) -> list[Tensor]:
    """A_m z for each branch m, (B, C) each, with z = ReLU(BN(W_z GAP(sum_m U_m)))."""
    conv, norm, _ = sk.squeeze
    s = sum(u).mean(dim=(2, 3))
    z = torch.relu(bn(s @ conv.weight[:, :, 0, 0].T, norm))
    select = sk.select.weight[:, :, 0, 0]  # rows m*C .. (m+1)*C - 1 are A_m
    c = sk.channels
    return [z @ select[m * c : (m + 1) * c].T for m in range(len(u))]


@pytest.mark.parametrize("stride", [1, 2])
def test_selective_kernel_is_the_softmax_mix_of_its_branches(stride: int) -> None:
    sk = randomise_norms(SelectiveKernel(8, 12, stride=stride, branches=3, groups=4, reduction=2, min_dim=5))
    x = torch.randn(2, 8, 7, 6)
    u = sk_branches_by_hand(sk, x, stride)
    weights = softmax_list(sk_logits_by_hand(sk, u))
    expected = sum(w[:, :, None, None] * branch for w, branch in zip(weights, u))
    torch.testing.assert_close(sk(x), expected)
    assert sk.squeeze[0].out_channels == 6  # d = max(12 / 2, 5)
    # mutation: a softmax across the channels instead of across the branches is a different block
    broken = sum(torch.softmax(a, dim=1)[:, :, None, None] * branch for a, branch in zip(sk_logits_by_hand(sk, u), u))
    assert (sk(x) - broken).abs().max() > 1e-2


def test_selective_kernel_branches_widen_the_receptive_field_by_dilation() -> None:
    sk = SelectiveKernel(32, 32, branches=2)  # SKNet-50 settings: M = 2, G = 32, r = 16, L = 32
    convs = [path[0] for path in sk.paths]
    assert [(c.kernel_size, c.dilation, c.groups) for c in convs] == [((3, 3), (1, 1), 32), ((3, 3), (2, 2), 32)]
    assert sk.squeeze[0].out_channels == 32  # d = max(32 / 16, L = 32)


def test_selective_kernel_with_equal_logits_averages_the_branches() -> None:
    sk = randomise_norms(SelectiveKernel(8, 8, groups=2, reduction=2, min_dim=2))
    with torch.no_grad():
        sk.select.weight.zero_()
    x = torch.randn(2, 8, 5, 5)
    u0, u1 = sk_branches_by_hand(sk, x, 1)
    torch.testing.assert_close(sk(x), (u0 + u1) / 2)


# --- split attention --------------------------------------------------------------------------


def split_attention_by_hand(block: SplitAttention, x: Tensor, stride: int) -> Tensor:
    """The docstring's equations with every group, split and channel indexed explicitly."""
    r_count, k_count, c = block.radix, block.cardinality, block.channels
    conv, norm, _ = block.conv
    per_in, per_out = x.shape[1] // (r_count * k_count), c // k_count
    groups = []
    for g in range(r_count * k_count):  # conv group g reads input chunk g, writes output chunk g
        weight = conv.weight[g * per_out : (g + 1) * per_out]
        groups.append(F.conv2d(x[:, g * per_in : (g + 1) * per_in], weight, stride=stride, padding=1))
    u = torch.relu(bn(torch.cat(groups, dim=1), norm))
    split = [u[:, r * c : (r + 1) * c] for r in range(r_count)]
    s = sum(split).mean(dim=(2, 3))  # (B, C)
    fc1, fc1_norm, _ = block.fc1
    inner = fc1.out_channels
    out = torch.zeros_like(split[0])
    for k in range(k_count):
        sk = s[:, k * per_out : (k + 1) * per_out]
        rows1 = slice(k * inner // k_count, (k + 1) * inner // k_count)
        h = sk @ fc1.weight[rows1, :, 0, 0].T + fc1.bias[rows1]
        z = torch.relu(bn(h, _slice_bn(fc1_norm, rows1)))
        rows2 = slice(k * r_count * per_out, (k + 1) * r_count * per_out)
        logits = z @ block.fc2.weight[rows2, :, 0, 0].T + block.fc2.bias[rows2]  # (B, R*C/K): [r][c]
        per_split = [logits[:, r * per_out : (r + 1) * per_out] for r in range(r_count)]
        weights = softmax_list(per_split) if r_count > 1 else [torch.sigmoid(per_split[0])]
        for r in range(r_count):
            channels = slice(k * per_out, (k + 1) * per_out)
            out[:, channels] += weights[r][:, :, None, None] * split[r][:, channels]
    return out


def _slice_bn(norm: torch.nn.BatchNorm2d, rows: slice) -> torch.nn.BatchNorm2d:
    part = torch.nn.BatchNorm2d(rows.stop - rows.start, eps=norm.eps).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(part, name).copy_(getattr(norm, name)[rows])
    return part


@pytest.mark.parametrize(("radix", "cardinality", "stride"), [(2, 1, 1), (2, 2, 2), (3, 2, 1), (1, 2, 1)])
def test_split_attention_matches_the_equations(radix: int, cardinality: int, stride: int) -> None:
    block = randomise_norms(SplitAttention(12, 8, stride=stride, radix=radix, cardinality=cardinality, min_inner=10))
    x = torch.randn(2, 12, 6, 5)
    torch.testing.assert_close(block(x), split_attention_by_hand(block, x, stride))


def test_split_attention_reads_fc2_cardinal_group_major() -> None:
    block = randomise_norms(SplitAttention(8, 8, radix=2, cardinality=2, min_inner=4))
    x = torch.randn(2, 8, 5, 5)
    u = block.conv(x).view(2, 2, 8, 5, 5)
    logits = block.fc2(block.fc1(u.sum(dim=1).mean(dim=(2, 3), keepdim=True)))
    # mutation: reading fc2's output as radix-major (split r = channels r*C .. ) mixes the wrong logits
    broken = torch.softmax(logits.view(2, 2, 8, 1, 1), dim=1)
    assert (block(x) - (u * broken).sum(dim=1)).abs().max() > 1e-2
    torch.testing.assert_close(block.weights(logits).sum(dim=1), torch.ones(2, 8, 1, 1))


def test_resnest_split_attention_sizes() -> None:
    block = SplitAttention(64, 64)  # ResNeSt-50 stage 1: 2s1x64d
    assert block.conv[0].weight.shape == (128, 32, 3, 3)  # two splits, each from half the input channels
    assert block.fc1[0].out_channels == 32  # max(64 * 2 / 4, 32)
    assert SplitAttention(512, 512).fc1[0].out_channels == 256
