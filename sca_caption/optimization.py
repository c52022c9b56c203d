"""The optimizer, its learning-rate schedule and one optimizer step: what both training phases
(``phases``) share."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sca_caption.config import TrainConfig
from sca_caption.models.captioner import SCACaptioner


def learning_rate(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then constant, cosine (falling to 0 one step after the last) or step-wise decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        total = max(1, cross_entropy_epochs(config) * steps_per_epoch - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / total)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.lr * config.decay_factor ** (step // steps_per_epoch // config.decay_every)
    return config.lr


def cross_entropy_epochs(config: TrainConfig) -> int:
    """The epochs trained with cross-entropy: all of them, or those before ``scst_after``."""
    return config.epochs if config.scst_after is None else min(config.epochs, config.scst_after)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the dropout generator for optimizer step ``step`` on process ``rank``."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def make_optimizer(model: SCACaptioner, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters: group 0 the captioner's own, group 1 (only
    where ``model.finetune_upper`` leaves them trainable) the backbone stages' (``set_learning_rate``)."""
    upper = {id(p) for p in model.encoder.upper.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [[p for p in trainable if id(p) not in upper], [p for p in trainable if id(p) in upper]]
    return torch.optim.AdamW([{"params": g} for g in groups if g], lr=lr, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float, upper_lr_scale: float) -> None:
    """``lr`` for the captioner's parameters, ``upper_lr_scale`` × ``lr`` for the fine-tuned
    backbone stages (``make_optimizer``'s groups)."""
    for group, scale in zip(optimizer.param_groups, (1.0, upper_lr_scale)):
        group["lr"] = lr * scale


def optimizer_step(model: SCACaptioner, optimizer: torch.optim.Optimizer, loss: Tensor, grad_clip: float | None) -> None:
    """Backward from ``loss``, the gradient norm clipped at ``grad_clip`` (None: not), one step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
