"""What ``GET /v1/model`` says about the checkpoint beyond the model itself: its file name and the
scores recorded in it: a training checkpoint's (the early-stopping metric, the best epoch and
score, and that epoch's validation scores, from the trainer's bookkeeping in ``extra``), or an
exported model file's test scores (``sca_caption.export``: ``test`` and ``test_split``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sca_caption.checkpoint import load_checkpoint

NOT_SCORES = ("epoch", "step", "lr", "train_loss", "seconds")


@dataclass(frozen=True)
class ModelCard:
    checkpoint: str
    scores: dict[str, Any] = field(default_factory=dict)


def model_card(path: Path) -> ModelCard:
    """The card of the checkpoint at ``path`` (a ``CheckpointError`` if it cannot be read)."""
    checkpoint = load_checkpoint(path)
    extra = checkpoint.extra
    scores: dict[str, Any] = {}
    if extra.get("best_score") is not None:
        metric = checkpoint.config.get("train", {}).get("early_stop_metric")
        if metric is not None:
            scores["early_stop_metric"] = metric
        scores["best_epoch"] = extra["best_epoch"]
        scores["best_score"] = extra["best_score"]
        best = [row for row in extra.get("history", []) if row.get("epoch") == extra["best_epoch"]]
        if best:
            scores["validation"] = {k: v for k, v in best[0].items() if k not in NOT_SCORES and v is not None}
    if "test_scores" in extra:
        scores["test_split"] = extra.get("test_split")
        scores["test"] = extra["test_scores"]
    return ModelCard(path.name, scores)
