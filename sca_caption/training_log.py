"""What a training run reports: log.csv and steps.csv (``table``), the one-line epoch summary,
and TensorBoard scalars where ``torch.utils.tensorboard`` imports."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

LOG_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "val_loss",
    "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "shapes_accuracy",
    "seconds",
    # self-critical runs, at each validation: the greedy reward of train.scst_probe_images training
    # images, the reward of the validation captions (both CIDEr-D with the training split's
    # document frequencies), the policy's mean entropy per sampled token since the previous row
    "probe_reward", "val_reward", "entropy",
)


def summary(row: dict[str, float], metric: str, improved: bool) -> str:
    """One line per epoch: losses and the validation scores (x100 like papers print them)."""
    parts = [f"epoch {int(row['epoch'])}", f"step {int(row['step'])}", f"train loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.3f}")
        for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "shapes_accuracy"):
            if key in row:
                parts.append(f"{key} {100 * row[key]:.1f}")
        for key in ("probe_reward", "val_reward", "entropy"):
            if key in row:
                parts.append(f"{key} {row[key]:.3f}")
        if improved:
            parts.append(f"(best {metric})")
    parts.append(f"{row['seconds']:.0f}s")
    return ", ".join(parts)


def table(rows: list[dict[str, float]], columns: tuple[str, ...] = LOG_COLUMNS) -> str:
    """``rows`` as CSV text with the header ``columns`` (missing values empty)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``out``, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out))
