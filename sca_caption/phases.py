"""The two ways an epoch trains, chosen once per epoch by the trainer: ``CrossEntropyPhase``
(teacher forcing on (image, caption) samples) and ``SelfCriticalPhase`` (sampled captions of each
image follow the CIDEr-D reward, ``sca_caption.self_critical``). Each knows its samples, their
order in an epoch, its learning rate and its optimizer step; and ``batch_loader``, the one batch
iterator of training and of the validation loss (``validation_loss``).

Data parallel: ``SCACaptioner.loss`` returns sums; each process divides its summed word losses
by the token count of the global batch (and its per-image terms by the global batch size) and
multiplies by the number of processes, because DDP averages the gradients: the average is then
the gradient of the global-batch mean, the same as one process computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sca_caption.config import ExperimentConfig, TrainConfig
from sca_caption.data.caption_dataset import (
    CaptionBatch, CaptionSamples, ImageBatch, ImageSamples, epoch_order, image_order, shard,
)
from sca_caption.data.vocab import Vocab
from sca_caption.distributed import Processes
from sca_caption.errors import main_process_takes_interrupts
from sca_caption.models.captioner import SCACaptioner
from sca_caption.optimization import learning_rate, optimizer_step
from sca_caption.rewards import CiderD
from sca_caption.self_critical import (
    dropout_rate, entropy_sum, policy_loss, reference_cross_entropy, rollout, teacher_forced_log_probs,
)

# steps.csv: the self-critical steps (entropy: the mean per sampled token of its distribution's;
# cross_entropy: the references' per token, where train.scst_xe_weight mixes it in)
STEP_COLUMNS = ("step", "reward", "baseline", "sample_length", "entropy", "cross_entropy")


def batch_loader(samples: Dataset, shares: list[list[int]], num_workers: int, device: torch.device) -> DataLoader:
    """``samples[share]`` for each index list of ``shares`` (this process's share of each global
    batch), loaded in ``num_workers`` worker processes (0: here)."""
    return DataLoader(
        samples, sampler=shares, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=main_process_takes_interrupts,
    )


@torch.no_grad()
def validation_loss(
    model: SCACaptioner, samples: CaptionSamples, batch_size: int, processes: Processes, num_workers: int, bf16: bool
) -> float:
    """Teacher-forced word cross-entropy per token over the validation captions ``samples``, in
    batches of ``batch_size`` shared out among the processes."""
    model.eval()
    count, rank, world, device = len(samples), processes.rank, processes.world, processes.device
    batches = [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    shares = [share for share in (shard(b, rank, world) for b in batches) if share]
    total, tokens = 0.0, 0
    for batch in batch_loader(samples, shares, num_workers, device):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sums = model.loss(model(batch.features, batch.captions), batch.captions, Vocab.pad, batch.tags)
        total += float(sums.words)
        tokens += sums.tokens
    total = processes.sum(torch.tensor(total, dtype=torch.float64))  # float64: one process's sum exactly
    return total / max(processes.sum(torch.tensor(float(tokens), dtype=torch.float64)), 1)


def cross_entropy_step(
    model: SCACaptioner,
    forward_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: CaptionBatch,
    pad: int,
    tokens: int,
    images: int,
    world: int,
    train: TrainConfig,
) -> Tensor:
    """One teacher-forced optimizer step on ``batch``, this process's share of a global batch of
    ``tokens`` target tokens and ``images`` captions; returns this share's (detached) loss.

    DDP averages the processes' gradients: scaled by the world size, the average is the gradient
    of the global batch's mean (module docstring)."""
    with torch.autocast(batch.captions.device.type, dtype=torch.bfloat16, enabled=train.bf16):
        output = forward_module(batch.features, batch.captions)
        sums = model.loss(output, batch.captions, pad, batch.tags, train.label_smoothing)
    loss = sums.mean(tokens, images) * world
    optimizer_step(model, optimizer, loss, train.grad_clip)
    return loss.detach()


class CrossEntropyPhase:
    """Teacher forcing on every (image, caption) pair of the training split, at the scheduled
    learning rate (``optimization.learning_rate``)."""

    def __init__(
        self, config: ExperimentConfig, model: SCACaptioner, forward_module: nn.Module, samples: CaptionSamples,
        processes: Processes, steps_per_epoch: int,
    ) -> None:
        self.config, self.model, self.forward_module, self.samples, self.proc = config, model, forward_module, samples, processes
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = config.data.batch_size  # captions per global batch

    def order(self, epoch: int) -> Tensor:
        """The epoch's sample order: captions of similar length batched together."""
        return epoch_order(self.samples.targets, self.config.train.seed, epoch, self.config.data.batch_size)

    def learning_rate(self, step: int) -> float:
        return learning_rate(step, self.config.train, self.steps_per_epoch)

    def step(self, optimizer: torch.optim.Optimizer, global_batch: list[int], batch: CaptionBatch) -> tuple[float, None]:
        """One optimizer step on this process's share ``batch`` of ``global_batch``; returns the
        global batch's loss (and no steps.csv row)."""
        world = self.proc.world
        tokens = self.samples.target_count(global_batch)
        loss = cross_entropy_step(
            self.model, self.forward_module, optimizer, batch, Vocab.pad, tokens, len(global_batch), world, self.config.train
        )
        return self.proc.sum(loss / world), None


class SelfCriticalPhase:
    """``train.scst_samples`` sampled captions of each of ``train.scst_images`` training images
    per step follow the CIDEr-D ``reward`` at the constant learning rate ``train.scst_lr``, dropout
    ``train.scst_dropout``, log-probabilities from ``train.scst_log_probs``, plus
    ``train.scst_xe_weight`` times the references' cross-entropy."""

    def __init__(
        self, config: ExperimentConfig, model: SCACaptioner, forward_module: nn.Module, samples: ImageSamples,
        processes: Processes, reward: CiderD, vocab: Vocab,
    ) -> None:
        self.config, self.model, self.forward_module, self.samples, self.proc = config, model, forward_module, samples, processes
        self.reward, self.vocab = reward, vocab
        self.batch_size = config.train.scst_images or config.data.batch_size  # images per global batch

    def order(self, epoch: int) -> Tensor:
        """The epoch's image order."""
        return image_order(len(self.samples), self.config.train.seed, epoch)

    def learning_rate(self, step: int) -> float:
        return self.config.train.scst_lr

    def step(
        self, optimizer: torch.optim.Optimizer, global_batch: list[int], batch: ImageBatch
    ) -> tuple[float, dict[str, float]]:
        """One optimizer step on this process's images ``batch``; returns the global batch's loss
        (per counted token) and its steps.csv row without the step (mean reward, baseline, length,
        entropy, and the references' cross-entropy per token where it is mixed in)."""
        train, world, sum_ = self.config.train, self.proc.world, self.proc.sum
        from_sample = train.scst_log_probs == "sample"
        references = batch.references if train.scst_xe_weight > 0 else None
        autocast = torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=train.bf16)
        with dropout_rate(self.model, train.scst_dropout), autocast:  # sampling and the loss: one precision
            run = rollout(
                self.model, batch.features, batch.images, reward=self.reward, samples=train.scst_samples,
                baseline=train.scst_baseline, max_length=self.config.decoding_limit, vocab=self.vocab, grad=from_sample,
            )
            tokens = sum_(torch.tensor(float(run.tokens)))
            rows = sum_(torch.tensor(float(len(run.reward))))
            if run.log_probs is not None:  # train.scst_log_probs sample
                log_probs = run.log_probs
                words = None if references is None else reference_cross_entropy(self.forward_module, batch.features, references)
            else:
                log_probs, words = teacher_forced_log_probs(
                    self.forward_module, batch.features, run.captions, train.scst_samples, self.vocab, references
                )
            loss = policy_loss(log_probs, run, self.vocab) / tokens * world
            if words is not None:
                reference_tokens = max(sum_(torch.tensor(float((references[:, :, 1:] != Vocab.pad).sum()))), 1.0)
                cross_entropy = words / reference_tokens * world
                loss = loss + train.scst_xe_weight * cross_entropy
        optimizer_step(self.model, optimizer, loss, train.grad_clip)
        row = {
            "reward": sum_(run.reward.sum()) / rows,
            "baseline": sum_(run.baseline.sum()) / rows,
            "sample_length": tokens / rows,
            "entropy": sum_(entropy_sum(log_probs, run, self.vocab)) / tokens,
        }
        if words is not None:
            row["cross_entropy"] = sum_(cross_entropy.detach() / world)
        return sum_(loss.detach() / world), row
