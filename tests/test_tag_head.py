"""The CSRA tag head: tag vocabulary, targets, the head on the unattended top map, loss and mAP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_backbone import NAME, build_tiny_backbone, tiny_features

from sca_caption.data.corpus import ImageRecord
from sca_caption.data.stopwords import STOPWORDS, is_content_word
from sca_caption.models.blocks.csra import MultiHeadCSRA
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.tag_head import (
    TagHead,
    average_precision,
    tag_loss,
    tag_mean_average_precision,
    tag_targets,
    tag_vocabulary,
)


def record(image_id: str, *captions: str) -> ImageRecord:
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), "train", captions, tuple(tuple(c.split()) for c in captions))


RECORDS = [
    record("1", "a dog runs on the grass", "the brown dog is running"),
    record("2", "a man rides a red bike", "man on a bike"),
    record("3", "two dogs play in the grass", "a dog and a cat s toy"),
]


def test_stopwords_and_content_words() -> None:
    assert {"a", "the", "on", "is", "and", "s"} <= STOPWORDS
    assert not STOPWORDS & {"dog", "red", "running", "grass", "two"}
    assert is_content_word("dog") and is_content_word("4x4")
    assert not is_content_word("the") and not is_content_word("x") and not is_content_word("42")


def test_tag_vocabulary_is_the_most_frequent_content_words() -> None:
    # counts: dog 3, bike 2, grass 2, man 2, then one each (alphabetical on ties)
    assert tag_vocabulary(RECORDS, 4) == ["dog", "bike", "grass", "man"]
    assert tag_vocabulary(RECORDS, 6) == ["dog", "bike", "grass", "man", "brown", "cat"]
    with pytest.raises(ModelConfigError, match="size must be >= 1"):
        tag_vocabulary(RECORDS, 0)


def test_tag_targets_mark_a_tag_present_in_any_caption() -> None:
    targets = tag_targets(RECORDS, ["dog", "bike", "cat", "zebra"])
    expected = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]])
    torch.testing.assert_close(targets, expected)


def test_tag_head_is_multi_head_csra_over_the_map() -> None:
    torch.manual_seed(0)
    head = TagHead(6, 5, heads=2, lam=0.2)
    maps = torch.randn(3, 6, 4, 4)
    reference = MultiHeadCSRA(6, 5, 2, 0.2)
    reference.load_state_dict(head.csra.state_dict())
    logits = head(maps)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits, reference(maps))
    with pytest.raises(ModelConfigError, match="tag_heads must be one of"):
        TagHead(6, 5, heads=5)


def test_captioner_tag_logits_come_from_the_unattended_top_map() -> None:
    layers = ("conv3", "conv4")
    torch.manual_seed(0)
    config = ModelConfig(backbone=NAME, layers=layers, attention_dim=3, hidden_dim=4, embed_dim=4, num_tags=5)
    model = SCACaptioner(config, 9, build_tiny_backbone())
    features = tiny_features(layers)
    caps = torch.tensor([[1, 4, 5], [1, 6, 2], [1, 7, 8]])
    top = model.encoder.upper.stages["conv4"](features["conv3"], features)
    torch.testing.assert_close(model(features, caps).tag_logits, model.tag_head(top))


def test_tag_loss_is_mean_binary_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    by_hand = -(
        torch.log(torch.sigmoid(torch.tensor(2.0)))
        + torch.log(1 - torch.sigmoid(torch.tensor(-1.0)))
        + torch.log(1 - torch.sigmoid(torch.tensor(0.5)))
        + torch.log(torch.sigmoid(torch.tensor(0.0)))
    ) / 4
    torch.testing.assert_close(tag_loss(logits, targets), by_hand)
    torch.testing.assert_close(tag_loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def precision_at_positives(scores: list[float], labels: list[int]) -> float:
    """AP without ties: the mean over positives of the precision at their rank."""
    ranked = sorted(zip(scores, labels), key=lambda pair: -pair[0])
    hits, total = 0, 0.0
    for rank, (_, label) in enumerate(ranked, start=1):
        if label:
            hits += 1
            total += hits / rank
    return total / hits


def test_average_precision_without_ties_matches_the_rank_definition() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.randperm(12).float()
        labels = (torch.rand(12) < 0.4).long()
        labels[0] = 1
        expected = precision_at_positives(scores.tolist(), labels.tolist())
        assert average_precision(scores, labels) == pytest.approx(expected)


def test_average_precision_counts_tied_scores_as_one_threshold() -> None:
    # thresholds 0.9: 1/1 hit; 0.5 (three tied, one hit): 2/4 at recall 1 -> 0.5·1 + 0.5·0.5
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    labels = torch.tensor([1, 0, 1, 0, 0])
    assert average_precision(scores, labels) == pytest.approx(0.75)
    perfect = torch.tensor([1, 1, 0, 0, 0])
    assert average_precision(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), perfect) == pytest.approx(1.0)


def test_mean_average_precision_skips_tags_without_positives() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.3], [0.1, 0.8, 0.4], [0.5, 0.6, 0.1]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    expected = (1.0 + 0.5) / 2  # tag 0: first place; tag 1: its positive ranks second; tag 2 skipped
    assert tag_mean_average_precision(scores, targets) == pytest.approx(expected)
    with pytest.raises(ModelConfigError, match="no tag has a positive"):
        tag_mean_average_precision(scores, torch.zeros(3, 3))
    with pytest.raises(ModelConfigError, match="must both be"):
        tag_mean_average_precision(scores, targets[:, :2])

