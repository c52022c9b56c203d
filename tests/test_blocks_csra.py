"""CSRA and multi-head CSRA against the paper's equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sca_caption.models.blocks import CSRA, HEAD_TEMPERATURES, BlockConfigError, MultiHeadCSRA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def scores_by_hand(head: CSRA, x: torch.Tensor) -> torch.Tensor:
    """s_kj = m_k . x_j / ||m_k||, (B, K, M)."""
    weight = head.classifier.weight[:, :, 0, 0]
    return torch.einsum("kc,bcm->bkm", weight / weight.norm(dim=1, keepdim=True), x.flatten(2))


def test_max_pool_csra_on_hand_computed_numbers() -> None:
    head = CSRA(2, 2, temperature=99, lam=0.5)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]).view(2, 2, 1, 1))
    # unit classifiers (0.6, 0.8) and (0, 1); locations (1, 0), (0, 1), (2, 2)
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]]).view(1, 2, 1, 3)
    # class 0 scores 0.6, 0.8, 2.8: mean 1.4, max 2.8; class 1 scores 0, 1, 2: mean 1, max 2
    torch.testing.assert_close(head(x), torch.tensor([[1.4 + 0.5 * 2.8, 1.0 + 0.5 * 2.0]]))


def test_max_pool_csra_is_mean_plus_lambda_max() -> None:
    head = CSRA(6, 4, temperature=99, lam=0.3)
    x = torch.randn(2, 6, 3, 5)
    s = scores_by_hand(head, x)
    torch.testing.assert_close(head(x), s.mean(dim=2) + 0.3 * s.max(dim=2).values)


def test_csra_with_zero_lambda_is_the_average_pooled_normalised_classifier() -> None:
    head = CSRA(6, 4, temperature=2, lam=0.0)
    x = torch.randn(2, 6, 4, 4)
    weight = F.normalize(head.classifier.weight[:, :, 0, 0], dim=1)
    torch.testing.assert_close(head(x), x.mean(dim=(2, 3)) @ weight.T)


def test_csra_attention_logit_is_softmax_weighted_score() -> None:
    head = CSRA(6, 4, temperature=3, lam=0.2)
    x = torch.randn(2, 6, 3, 3)
    s = scores_by_hand(head, x)
    att = (torch.exp(3 * s) / torch.exp(3 * s).sum(dim=2, keepdim=True) * s).sum(dim=2)
    torch.testing.assert_close(head(x), s.mean(dim=2) + 0.2 * att)


def test_csra_scores_ignore_the_classifier_norm() -> None:
    head = CSRA(6, 4, temperature=1, lam=0.5)
    x = torch.randn(2, 6, 3, 3)
    before = head(x)
    with torch.no_grad():
        head.classifier.weight.mul_(torch.tensor([1.0, 10.0, 0.1, 3.0]).view(4, 1, 1, 1))
    torch.testing.assert_close(head(x), before)


def test_large_temperature_tends_to_max_pooling() -> None:
    soft = CSRA(6, 4, temperature=500, lam=1.0)
    hard = CSRA(6, 4, temperature=99, lam=1.0)
    hard.load_state_dict(soft.state_dict())
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(soft(x), hard(x), atol=1e-2, rtol=0)


@pytest.mark.parametrize("num_heads", sorted(HEAD_TEMPERATURES))
def test_multi_head_csra_sums_its_heads(num_heads: int) -> None:
    mha = MultiHeadCSRA(6, 5, num_heads=num_heads, lam=0.4)
    assert [h.temperature for h in mha.heads] == list(HEAD_TEMPERATURES[num_heads])
    x = torch.randn(2, 6, 3, 4)
    expected = sum(h(x) for h in mha.heads)
    out = mha(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, expected)


def test_multi_head_temperature_sets_are_the_papers() -> None:
    assert HEAD_TEMPERATURES == {
        1: (1,),
        2: (1, 99),
        4: (1, 2, 4, 99),
        6: (1, 2, 3, 4, 5, 99),
        8: (1, 2, 3, 4, 5, 6, 7, 99),
    }


def test_multi_head_csra_rejects_unknown_head_counts() -> None:
    with pytest.raises(BlockConfigError, match="MultiHeadCSRA: num_heads must be one of"):
        MultiHeadCSRA(6, 5, num_heads=3)
