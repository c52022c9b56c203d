"""The CSRA tag head: multi-label tags predicted from the top layer's unattended map.

Tags are the K most frequent content words of the training captions (``STOPWORDS`` left out);
an image has a tag when any of its captions contains the word. A ``MultiHeadCSRA`` (Zhu & Wu,
ICCV 2021) turns the top attended layer's map, before any attention, (B, C, H, W) into tag logits
(B, K), trained with a binary cross-entropy that the captioner adds to its loss with its own
weight; the tags' mean average precision measures it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption.data.corpus import ImageRecord
from sca_caption.data.stopwords import is_content_word
from sca_caption.models.blocks.csra import HEAD_TEMPERATURES, MultiHeadCSRA
from sca_caption.models.errors import ModelConfigError


def tag_vocabulary(records: Iterable[ImageRecord], size: int) -> list[str]:
    """The ``size`` most frequent content words over all captions of ``records`` (pass the
    training split), most frequent first, ties in alphabetical order."""
    if size < 1:
        raise ModelConfigError(f"tag vocabulary size must be >= 1; got {size}")
    counts = Counter(
        token for record in records for caption in record.tokens for token in caption if is_content_word(token)
    )
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [word for word, _ in ranked[:size]]


def tag_targets(records: Sequence[ImageRecord], tags: Sequence[str]) -> Tensor:
    """Multi-label targets (N, K) in {0, 1}: 1 where any caption of image n contains tag k."""
    column = {tag: k for k, tag in enumerate(tags)}
    targets = torch.zeros(len(records), len(tags))
    for n, record in enumerate(records):
        present = {column[token] for caption in record.tokens for token in caption if token in column}
        targets[n, sorted(present)] = 1.0
    return targets


class TagHead(nn.Module):
    """Multi-head CSRA over a feature map: (B, C, H, W) -> tag logits (B, K)."""

    def __init__(self, channels: int, num_tags: int, heads: int = 1, lam: float = 0.1) -> None:
        super().__init__()
        if heads not in HEAD_TEMPERATURES:
            raise ModelConfigError(f"tag_heads must be one of {sorted(HEAD_TEMPERATURES)}; got {heads}")
        self.csra = MultiHeadCSRA(channels, num_tags, heads, lam)

    def forward(self, maps: Tensor) -> Tensor:
        """Unattended top map (B, C, H, W) -> tag logits (B, K)."""
        return self.csra(maps)


def tag_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of tag logits (B, K) against targets (B, K) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of one tag: scores (N,) ranked against labels (N,) in {0, 1}.

    Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds, highest first, so tied scores
    count as one threshold (the definition scikit-learn uses). Needs at least one positive.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = scores[order]
    hits = labels[order].to(torch.float64)
    positives = hits.sum()
    if positives == 0:
        raise ModelConfigError("average precision: the tag has no positive image")
    true_positives = hits.cumsum(0)
    seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    threshold_end = torch.ones(len(ranked), dtype=torch.bool)
    threshold_end[:-1] = ranked[1:] != ranked[:-1]
    precision = true_positives[threshold_end] / seen[threshold_end]
    recall = true_positives[threshold_end] / positives
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum())


def tag_mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over tags of their average precision: scores (N, K), targets (N, K) in {0, 1}.

    Tags without any positive image are left out (their precision is undefined).
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ModelConfigError(
            f"tag mAP: scores and targets must both be (N, K); got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    present = [k for k in range(targets.shape[1]) if bool(targets[:, k].any())]
    if not present:
        raise ModelConfigError("tag mAP: no tag has a positive image")
    return sum(average_precision(scores[:, k], targets[:, k]) for k in present) / len(present)
