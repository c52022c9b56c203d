"""The training loop: teacher forcing, per-epoch validation with beam search, checkpoints.

One run writes into its output folder:

    last.pt         the latest state (every ``train.checkpoint_every`` steps and every epoch end)
    best.pt         the state after the epoch with the best validation ``train.early_stop_metric``
    log.csv         one row per epoch: learning rate, losses, validation scores, time
    steps.csv       self-critical epochs: per step the mean reward, baseline and sample length
    test_scores.json  the best checkpoint's scores on the test split, at the end
    events.*        TensorBoard scalars, where ``torch.utils.tensorboard`` imports

Exact resumption: the sample order of an epoch is a function of (seed, epoch), the global torch
RNG (which draws the dropout masks) is reseeded with (seed, step, rank) before every step, and the
learning rate is a function of the step. So a run resumed from ``last.pt`` (which stores the step, the epoch's order
and the position in it) trains on exactly the batches, with exactly the masks and learning
rates, that the interrupted run would have, and ends with the same weights.

Self-critical training (``train.scst_after``, ``sca_caption.self_critical``): from that epoch on,
each step samples ``train.scst_samples`` captions of each of ``data.batch_size`` training images
and follows the CIDEr-D reward (document frequencies of the training references, cached beside the
vocabulary) at the constant learning rate ``train.scst_lr`` (fine-tuned backbone stages: times
``train.upper_lr_scale``, as in cross-entropy epochs) and dropout ``train.scst_dropout``. The
first self-critical epoch starts from the best cross-entropy epoch's weights (``best.pt``) with a
fresh optimizer; cross-entropy early stopping moves on to it. ``init_from`` (``--init-from``) starts a run from another run's
weights instead, e.g. ``train.scst_after=0`` on a finished cross-entropy run.

Ctrl-C or SIGTERM: the step in progress is finished, saved in ``last.pt``, and the run stops with
one line saying how to continue (``--resume``); a second Ctrl-C stops at once.

Data parallel (see ``distributed``): ``data.batch_size`` is the global batch, shared out among the
processes sample by sample. ``SCACaptioner.loss`` returns sums; each process divides its summed
word losses by the token count of the global batch (and its per-image terms by the global batch
size) and multiplies by the number of processes, because DDP averages the gradients: the average
is then the gradient of the global-batch mean, the same as one process computes.
"""

from __future__ import annotations

import csv
import io
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from sca_caption.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_captioner,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sca_caption.config import ExperimentConfig, TrainConfig, decoding_limit, write_config
from sca_caption.data.caption_dataset import (
    CaptionBatch,
    ImageBatch,
    epoch_order,
    global_batches,
    image_order,
    shard,
)
from sca_caption.data.errors import DataError
from sca_caption.decoding import DecodeSettings
from sca_caption.distributed import Processes
from sca_caption.errors import first_line, main_process_takes_interrupts
from sca_caption.evaluation import SplitEvaluation, evaluate_model
from sca_caption.io_utils import atomic_write_json, atomic_write_text
from sca_caption.locks import exclusive
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.models.captioner import SCACaptioner
from sca_caption.prepare import PreparedData
from sca_caption.rewards import CiderD, build_or_load_cider, cider_cache_path, train_references
from sca_caption.self_critical import dropout_rate, policy_loss, rollout

# Settings that do not change what the weights become, so a resumed run may change them.
RESUMABLE_CHANGES = frozenset(
    {
        "data.data_root", "data.feature_cache", "data.num_workers",
        "train.patience", "train.log_every", "train.eval_every", "train.meteor",
        "train.checkpoint_every", "model.kernels",
        *(f"decode.{name}" for name in DecodeSettings.__dataclass_fields__),  # validation decoding
    }
)
LOG_COLUMNS = (
    "epoch", "step", "lr", "train_loss", "val_loss",
    "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "shapes_accuracy",
    "seconds",
)
STEP_COLUMNS = ("step", "reward", "baseline", "sample_length")
LOWER_IS_BETTER = ("loss",)


class TrainingError(DataError):
    """A run that cannot start or continue as asked; the message is one line."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: the step in progress was finished and saved in last.pt."""


@contextmanager
def _signals_noted(received: list[str]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM are appended to ``received`` by name (the trainer
    stops at the next step boundary); a second one interrupts at once. Only the main thread can
    take signals: elsewhere the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(number: int, _: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(number).name)

    previous = {number: signal.signal(number, note) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@dataclass
class Bookkeeping:
    """The trainer's own state, stored in a checkpoint's ``extra`` (plain values only).

    ``history``: one dict per finished epoch (the rows of log.csv); ``epoch_loss``, ``epoch_steps``:
    the running sum of the current epoch's step losses and their count; ``steps``: the rows of
    steps.csv.
    """

    best_score: float | None = None
    best_epoch: int = -1
    bad_evaluations: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    epoch_seconds: float = 0.0
    steps: list[dict[str, float]] = field(default_factory=list)  # self-critical rows of steps.csv


@dataclass
class Position:
    """Where training stands: the epoch in progress, optimizer steps taken, the epoch's sample
    order and how many of its samples were trained on."""

    epoch: int
    step: int
    order: Tensor
    done: int


@dataclass
class TrainResult:
    """The outcome of a run: its folder, best validation score and epoch, and test scores."""

    out: Path
    best_score: float | None
    best_epoch: int
    test_scores: dict[str, float]
    history: list[dict[str, float]]


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


def build_model(config: ExperimentConfig, vocab_size: int, backbone_weights: str) -> SCACaptioner:
    """The captioner of ``config``, seeded with ``train.seed``. ``backbone_weights``: those the
    feature cache was made with ("imagenet", a path, or "none" for the extractor's seed-0 random
    init), so the backbone stages inside the model continue the cached ones."""
    backbone = build_cache_backbone(config.model.backbone, backbone_weights)
    torch.manual_seed(config.train.seed)
    return SCACaptioner(config.model, vocab_size, backbone)


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


def cross_entropy_step(
    model: SCACaptioner,
    ddp: nn.Module,
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
        output = ddp(batch.features, batch.captions)
        sums = model.loss(output, batch.captions, pad, batch.tags, train.label_smoothing)
    loss = sums.mean(tokens, images) * world
    optimizer_step(model, optimizer, loss, train.grad_clip)
    return loss.detach()


def resume_checkpoint(out: Path) -> Path:
    """``out/last.pt``, the checkpoint ``--resume`` continues; a ``TrainingError`` when there is none."""
    last = Path(out) / "last.pt"
    if not last.exists():
        raise TrainingError(f"{last}: nothing to resume (no last.pt in {out})")
    return last


def check_training_settings(config: ExperimentConfig) -> None:
    """Refuse (``TrainingError``, one line) settings that cannot work together."""
    train, splits = config.train, config.data
    for role in ("val_split", "test_split"):
        if getattr(splits, role) == splits.train_split:
            raise TrainingError(f"data.{role} is {splits.train_split!r}, the training split: pick another split")
    metric = train.early_stop_metric
    if metric == "METEOR" and not config.train.meteor:
        raise TrainingError("train.early_stop_metric is METEOR but train.meteor is false")
    if metric == "shapes_accuracy" and config.data.dataset != "shapes":
        raise TrainingError(f"train.early_stop_metric shapes_accuracy needs the shapes dataset, not {config.data.dataset}")
    if train.scst_after is not None and train.scst_after >= train.epochs:
        raise TrainingError(f"train.scst_after is {train.scst_after}: it must be below train.epochs ({train.epochs})")
    if train.label_smoothing > 0 and cross_entropy_epochs(train) == 0:
        raise TrainingError("train.label_smoothing smooths the cross-entropy epochs' loss, and train.scst_after 0 leaves none")
    if train.upper_lr_scale != 1.0 and not config.model.finetune_upper:
        raise TrainingError("train.upper_lr_scale is the learning rate of fine-tuned backbone stages: it needs model.finetune_upper true")
    if train.scst_after is not None and train.scst_baseline == "mean" and train.scst_samples < 2:
        raise TrainingError("train.scst_baseline mean needs train.scst_samples >= 2 (the mean of the other samples)")


class Trainer:
    """Trains one experiment into ``out``; ``run()`` does the whole loop (see the module docstring)."""

    def __init__(
        self,
        config: ExperimentConfig,
        data: PreparedData,
        out: Path,
        processes: Processes,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = print,
        on_step: Callable[[int], None] | None = None,
        init_from: Path | None = None,
    ) -> None:
        """``on_step(step)`` runs after each optimizer step (and any checkpoint of that step);
        ``init_from``: a checkpoint whose model weights a new run starts from (same model and vocabulary)."""
        self.config = config
        self.on_step = on_step
        self._signals: list[str] = []  # SIGINT / SIGTERM received while ``run`` trains
        self.data = data
        self.out = Path(out)
        self.proc = processes
        self.device = processes.device
        self.progress = progress and processes.is_main
        self.log = log if processes.is_main else (lambda _: None)
        check_training_settings(config)
        train = config.train

        self.vocab = data.vocab
        self.cache = data.open_cache()
        splits, length = config.data, config.data.max_length
        self.tags = data.tags(splits.train_split, config.model.num_tags) if config.model.num_tags else []
        self.train_samples = data.caption_samples(splits.train_split, self.cache, length, self.tags)
        self.val_records = data.split(splits.val_split)
        self.val_samples = data.caption_samples(splits.val_split, self.cache, length, self.tags)
        if not len(self.train_samples):
            raise TrainingError(f"no training samples: split {config.data.train_split!r} has no cached images")
        self.steps_per_epoch = self._steps(len(self.train_samples))
        self.train_images = data.image_samples(splits.train_split, self.cache)
        self.reward = self._reward() if train.scst_after is not None else None

        self.model = build_model(config, len(self.vocab), config.data.backbone_weights).to(self.device)
        self.cache.check_prefix(self.model.encoder.features_fingerprint, "this run's")
        self.optimizer = make_optimizer(self.model, train.lr, train.weight_decay)
        self.books = Bookkeeping()
        self.at = Position(0, 0, self._order(0), 0)
        last = self.out / "last.pt"
        if resume:
            self._restore(resume_checkpoint(self.out))
        elif last.exists():
            raise TrainingError(f"{last} exists: pass --resume to continue that run, or --out for a new one")
        elif init_from is not None:
            self._initialise(init_from)
        self.ddp: nn.Module = self.model
        if processes.distributed:
            unused = config.model.num_tags > 0 and config.model.tag_loss_weight == 0
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
        self.writer: Any = None  # TensorBoard, opened by ``run``

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until ``train.epochs`` or early stopping, then score the best model on the test
        split; one run at a time per output folder (``locks.exclusive`` on ``OUT/.run.lock``)."""
        busy = f"{self.out}: another training run is writing this folder"
        with exclusive(self.out / ".run.lock", self.proc, busy), _signals_noted(self._signals):
            if self.proc.is_main:
                write_config(self.out / "config.yaml", self.config)
                self.writer = _tensorboard(self.out)
            return self._run()

    def _run(self) -> TrainResult:
        train = self.config.train
        critical = self._self_critical(self.at.epoch)
        samples = f"{len(self.train_images)} images, self-critically" if critical else f"{len(self.train_samples)} captions"
        steps = self._steps(len(self.train_images if critical else self.train_samples))
        self.log(
            f"training on {samples} ({steps} steps per epoch, {self.proc.world} process(es), {self.device}), "
            f"validating on {len(self.val_records)} images"
        )
        while self.at.epoch < train.epochs and not self.books.stopped:
            self._train_epoch()
            epoch = self.at.epoch
            validate = (epoch + 1) % train.eval_every == 0 or epoch + 1 == train.epochs
            row = self._epoch_row(self._validate() if validate else None)
            self._end_epoch(row)
        test_scores = self._test() if self.proc.is_main else {}
        if self.writer is not None:
            self.writer.close()
        return TrainResult(self.out, self.books.best_score, self.books.best_epoch, test_scores, self.books.history)

    def _train_epoch(self) -> None:
        data, train = self.config.data, self.config.train
        critical = self._self_critical(self.at.epoch)
        if critical and self.at.epoch == train.scst_after and self.at.done == 0:
            self._start_self_critical()
        samples = self.train_images if critical else self.train_samples
        steps = self._steps(len(samples))
        batches = global_batches(self.at.order, self.at.done, data.batch_size, self.proc.world)
        loader = DataLoader(
            samples,
            sampler=[shard(b, self.proc.rank, self.proc.world) for b in batches],
            batch_size=None,
            num_workers=data.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=main_process_takes_interrupts,
        )
        bar = tqdm(
            total=steps, initial=steps - len(batches), unit="step",
            desc=f"epoch {self.at.epoch + 1}/{train.epochs}", disable=not self.progress, dynamic_ncols=True,
        )
        self.ddp.train()
        started = time.perf_counter()
        trained = 0
        with bar:
            for global_batch, batch in zip(batches, loader):
                loss = self._self_critical_step(batch) if critical else self._train_step(global_batch, batch)
                self.at.step += 1
                self.at.done += len(global_batch)
                self.books.epoch_loss += loss
                self.books.epoch_steps += 1
                trained += len(global_batch)
                rate = trained / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", samples_per_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if self.at.step % train.log_every == 0:
                    self._log_step(loss, rate)
                mid_epoch = self.at.done < len(self.at.order)
                if train.checkpoint_every and self.at.step % train.checkpoint_every == 0 and mid_epoch:
                    self._save(self.out / "last.pt")
                if self.on_step is not None:
                    self.on_step(self.at.step)
                if self.proc.main_says(bool(self._signals)):
                    self._stop_at_step(started)
        self.books.epoch_seconds += time.perf_counter() - started

    def _stop_at_step(self, started: float) -> None:
        """Ctrl-C or SIGTERM arrived during the step just taken: keep it in last.pt and stop."""
        self.books.epoch_seconds += time.perf_counter() - started
        last = self.out / "last.pt"
        if self.proc.is_main:
            self._save(last)
        self.proc.barrier()
        raise TrainingInterrupted(
            f"{self.out}: stopped by {self._signals[0] if self._signals else 'another process'} after step "
            f"{self.at.step}; {last} holds it: continue with --resume"
        )

    def _train_step(self, global_batch: list[int], batch: CaptionBatch) -> float:
        """One optimizer step on this process's share ``batch`` of ``global_batch``; returns the
        global batch's loss."""
        train = self.config.train
        set_learning_rate(self.optimizer, learning_rate(self.at.step, train, self.steps_per_epoch), train.upper_lr_scale)
        torch.manual_seed(step_seed(train.seed, self.at.step, self.proc.rank))
        tokens = self.train_samples.target_count(global_batch)
        loss = cross_entropy_step(
            self.model, self.ddp, self.optimizer, batch.to(self.device), self.vocab.pad, tokens, len(global_batch),
            self.proc.world, train,
        )
        return self.proc.sum(loss / self.proc.world)

    def _self_critical_step(self, batch: ImageBatch) -> float:
        """One self-critical optimizer step on this process's images ``batch``; returns the global
        batch's loss (per counted token)."""
        train, world = self.config.train, self.proc.world
        set_learning_rate(self.optimizer, train.scst_lr, train.upper_lr_scale)
        torch.manual_seed(step_seed(train.seed, self.at.step, self.proc.rank))
        batch = batch.to(self.device)
        assert self.reward is not None
        with dropout_rate(self.model, train.scst_dropout):
            run = rollout(
                self.model, batch.features, batch.images, reward=self.reward, samples=train.scst_samples,
                baseline=train.scst_baseline, max_length=decoding_limit(self.config), vocab=self.vocab,
            )
            tokens = self.proc.sum(torch.tensor(float(run.tokens)))
            rows = self.proc.sum(torch.tensor(float(len(run.reward))))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=train.bf16):
                loss = policy_loss(self.ddp, batch.features, run, train.scst_samples, self.vocab) / tokens * world
        optimizer_step(self.model, self.optimizer, loss, train.grad_clip)
        row = {
            "step": self.at.step + 1,
            "reward": self.proc.sum(run.reward.sum()) / rows,
            "baseline": self.proc.sum(run.baseline.sum()) / rows,
            "sample_length": tokens / rows,
        }
        self.books.steps.append(row)
        if self.writer is not None:
            for key in STEP_COLUMNS[1:]:
                self.writer.add_scalar(f"scst/{key}", row[key], self.at.step + 1)
        return self.proc.sum(loss.detach() / world)

    def _start_self_critical(self) -> None:
        """The switch from cross-entropy: the best epoch's weights, a fresh optimizer, patience anew."""
        best = self.out / "best.pt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best).model)
        self.optimizer = make_optimizer(self.model, self.config.train.scst_lr, self.config.train.weight_decay)
        self.books.bad_evaluations = 0
        self.log(f"epoch {self.at.epoch + 1}: self-critical training from {best if best.exists() else 'the current weights'}")

    def _log_step(self, loss: float, rate: float) -> None:
        """Every ``log_every`` steps: TensorBoard scalars, and a line where there is no progress bar."""
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.at.step)
            self.writer.add_scalar("train/lr", self._lr(), self.at.step)
        if not self.progress:
            self.log(f"epoch {self.at.epoch + 1} step {self.at.step}: loss {loss:.3f}, lr {self._lr():.2e}, {rate:.0f} captions/s")

    # -- validation, epoch end, test ---------------------------------------------------------

    def _validate(self) -> SplitEvaluation | None:
        """Rank 0 captions and scores the validation split; the other processes get None."""
        if not self.proc.is_main:
            return None
        evaluation = self._evaluate(self.model, self.config.data.val_split)
        evaluation.scores["loss"] = self._val_loss()
        return evaluation

    def _evaluate(self, model: SCACaptioner, split: str) -> SplitEvaluation:
        """Beam-search captions of ``split`` with the run's decoding settings, and their scores."""
        config = self.config
        return evaluate_model(
            model, self.vocab, config, self.data.records, self.cache, split,
            device=self.device, meteor=config.train.meteor, bf16=config.train.bf16, progress=self.progress,
        )

    @torch.no_grad()
    def _val_loss(self) -> float:
        """Teacher-forced word cross-entropy per token over the validation captions."""
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.config.data.batch_size
        for start in range(0, len(self.val_samples), size):
            indices = list(range(start, min(start + size, len(self.val_samples))))
            batch = self.val_samples[indices].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.train.bf16):
                output = self.model(batch.features, batch.captions)
                sums = self.model.loss(output, batch.captions, self.vocab.pad, batch.tags)
            total += float(sums.words)
            tokens += sums.tokens
        return total / max(tokens, 1)

    def _epoch_row(self, evaluation: SplitEvaluation | None) -> dict[str, float]:
        """The log row of the epoch just trained (validation columns empty where not validated)."""
        books = self.books
        row: dict[str, float] = {
            "epoch": self.at.epoch + 1,
            "step": self.at.step,
            "lr": self._lr(),
            "train_loss": books.epoch_loss / max(books.epoch_steps, 1),
            "seconds": books.epoch_seconds,
        }
        if evaluation is not None:
            row["val_loss"] = evaluation.scores["loss"]
            row.update({k: v for k, v in evaluation.scores.items() if k in LOG_COLUMNS})
        return row

    def _end_epoch(self, row: dict[str, float]) -> None:
        """Early-stopping bookkeeping, best.pt, log.csv and last.pt for the next epoch."""
        train = self.config.train
        books = self.books
        improved = skip = False
        if self.proc.is_main:
            score = row.get("val_loss" if train.early_stop_metric == "loss" else train.early_stop_metric)
            if score is not None:
                better = books.best_score is None or (
                    score < books.best_score if train.early_stop_metric in LOWER_IS_BETTER else score > books.best_score
                )
                if better:
                    books.best_score, books.best_epoch, books.bad_evaluations = score, self.at.epoch + 1, 0
                    improved = True
                else:
                    books.bad_evaluations += 1
                books.stopped = train.patience is not None and books.bad_evaluations >= train.patience
                if books.stopped and train.scst_after is not None and not self._self_critical(self.at.epoch):
                    books.stopped, skip = False, True  # cross-entropy is done: self-critical training next
            books.history.append(row)
            self.log(_summary(row, train.early_stop_metric, improved))
        books.stopped = self.proc.main_says(books.stopped)
        following = train.scst_after if self.proc.main_says(skip) else self.at.epoch + 1
        books.epoch_loss, books.epoch_steps, books.epoch_seconds = 0.0, 0, 0.0
        self.at = Position(following, self.at.step, self._order(following), 0)
        if self.proc.is_main:
            if improved:
                self._save(self.out / "best.pt")
            self._save(self.out / "last.pt")
            atomic_write_text(self.out / "log.csv", _csv(books.history))
            if books.steps:
                atomic_write_text(self.out / "steps.csv", _csv(books.steps, STEP_COLUMNS))
            if self.writer is not None:
                for key, value in row.items():
                    if key not in ("epoch", "step"):
                        self.writer.add_scalar(f"epoch/{key}", value, int(row["epoch"]))
            if books.stopped:
                self.log(f"early stopping: no {train.early_stop_metric} gain in {books.bad_evaluations} evaluation(s)")
        self.proc.barrier()

    def _test(self) -> dict[str, float]:
        """Scores of the best checkpoint (or the last weights, if none was kept) on the test split."""
        best = self.out / "best.pt"
        model = load_captioner(best, self.device)[0] if best.exists() else self.model
        evaluation = self._evaluate(model, self.config.data.test_split)
        atomic_write_json(self.out / "test_scores.json", evaluation.scores)
        return evaluation.scores

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(self, path: Path) -> None:
        extra = asdict(self.books)
        extra["tags"] = list(self.tags)
        save_checkpoint(
            path,
            Checkpoint(
                model=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                epoch=self.at.epoch,
                step=self.at.step,
                data_order=self.at.order,
                data_position=self.at.done,
                rng=capture_rng_state(),
                config=self.config.to_dict(),
                vocab=list(self.vocab.words),
                extra=extra,
            ),
        )

    def _restore(self, path: Path) -> None:
        expected = self.config.to_dict()
        for name in RESUMABLE_CHANGES:
            section, key = name.split(".")
            del expected[section][key]
        checkpoint = load_checkpoint(path, expect_config=expected, expect_vocab=self.vocab.words)  # on the CPU
        samples = self.train_images if self._self_critical(checkpoint.epoch) else self.train_samples
        if len(checkpoint.data_order) != len(samples):
            raise CheckpointError(
                f"{path}: checkpoint does not match this run: it orders {len(checkpoint.data_order)} "
                f"training samples, this run has {len(samples)}"
            )
        self.model.load_state_dict(checkpoint.model)
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer)
        except (KeyError, TypeError, ValueError) as error:  # e.g. a fine-tuning run from before the upper stages had their own group
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this run's parameter groups ({first_line(error)}); "
                "start the run anew, or from its weights with --init-from"
            ) from None
        restore_rng_state(checkpoint.rng)
        extra = dict(checkpoint.extra)
        extra.pop("tags", None)
        self.books = Bookkeeping(**extra)
        self.at = Position(checkpoint.epoch, checkpoint.step, checkpoint.data_order, checkpoint.data_position)
        self.log(f"resuming {path}: epoch {self.at.epoch + 1}, step {self.at.step}, {self.at.done} captions into the epoch")

    # -- helpers ----------------------------------------------------------------------------------

    def _order(self, epoch: int) -> Tensor:
        train = self.config.train
        if self._self_critical(epoch):
            return image_order(len(self.train_images), train.seed, epoch)
        return epoch_order(self.train_samples.targets, train.seed, epoch, self.config.data.batch_size)

    def _self_critical(self, epoch: int) -> bool:
        """Whether ``epoch`` trains self-critically."""
        after = self.config.train.scst_after
        return after is not None and epoch >= after

    def _steps(self, samples: int) -> int:
        """Optimizer steps of an epoch over ``samples`` samples."""
        return len(global_batches(torch.arange(samples), 0, self.config.data.batch_size, self.proc.world))

    def _reward(self) -> CiderD:
        """CIDEr-D against the training references; the main process builds the document-frequency
        cache beside the vocabulary, the others then read it."""
        references = train_references(self.data.records, self.vocab, self.config.data.train_split)
        path = cider_cache_path(self.data.vocab_path)
        return self.proc.main_first(lambda: build_or_load_cider(path, self.vocab, references))

    def _initialise(self, path: Path) -> None:
        """Start from the model weights of another run's checkpoint ``path``."""
        model = {k: v for k, v in self.config.to_dict()["model"].items() if k != "kernels"}
        checkpoint = load_checkpoint(path, expect_config={"model": model}, expect_vocab=self.vocab.words)
        self.model.load_state_dict(checkpoint.model)
        self.log(f"starting from the weights of {path} (epoch {checkpoint.epoch}, step {checkpoint.step})")

    def _lr(self) -> float:
        """The captioner's learning rate (group 0; fine-tuned stages run at ``upper_lr_scale`` times it)."""
        return float(self.optimizer.param_groups[0]["lr"])


def _summary(row: dict[str, float], metric: str, improved: bool) -> str:
    """One line per epoch: losses and the validation scores (x100 like papers print them)."""
    parts = [f"epoch {int(row['epoch'])}", f"step {int(row['step'])}", f"train loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.3f}")
        for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "shapes_accuracy"):
            if key in row:
                parts.append(f"{key} {100 * row[key]:.1f}")
        if improved:
            parts.append(f"(best {metric})")
    parts.append(f"{row['seconds']:.0f}s")
    return ", ".join(parts)


def _csv(rows: list[dict[str, float]], columns: tuple[str, ...] = LOG_COLUMNS) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``out``, or None where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out))
