"""The training loop: per epoch one phase (cross-entropy or self-critical, ``phases``), then
validation, early stopping, and the run's files.

One run writes into its output folder:

    last.pt         the latest state (every ``train.checkpoint_every`` steps, every validation and
                    every epoch end)
    best.pt         the state at the validation with the best ``train.early_stop_metric``
    log.csv         one row per epoch end, or with ``train.val_every`` one per validation: step,
                    learning rate, losses and time since the previous row, validation scores
    steps.csv       self-critical epochs: per step the mean reward, baseline, sample length and
                    entropy (and the references' cross-entropy where ``train.scst_xe_weight`` mixes it in)
    test_scores.json  the best checkpoint's scores on the test split, at the end
    events.*        TensorBoard scalars, where ``torch.utils.tensorboard`` imports

Exact resumption: the sample order of an epoch is a function of (seed, epoch), the global torch
RNG (which draws the dropout masks) is reseeded with (seed, step, rank) before every step, and the
learning rate is a function of the step. So a run resumed from ``last.pt`` (which stores the step, the epoch's order
and the position in it) trains on exactly the batches, with exactly the masks and learning
rates, that the interrupted run would have, and ends with the same weights, where both run with
the same number of CPU threads (the float sums' order follows it: ``sca_caption.threads`` picks
the free cores at each start, so set ``OMP_NUM_THREADS`` for bit-for-bit repeats).

Validation: after every ``train.eval_every``-th epoch and the last (a row of log.csv per epoch,
its validation columns empty where none ran); or, with ``train.val_every``, after every
``val_every``-th optimizer step, wherever in an epoch it falls, and after the last epoch (a row
per validation only). ``train.patience`` counts validations either way. A validation is taken
before the step's last.pt is written, so a resumed run never skips one.

Self-critical training (``train.scst_after``, ``sca_caption.self_critical``): from that epoch on,
each step samples ``train.scst_samples`` captions of each of ``train.scst_images`` (default
``data.batch_size``) training images
and follows the CIDEr-D reward (document frequencies of the training references, cached beside the
vocabulary; ``train.scst_reward_end``: ``<end>`` counted as a word) at the constant learning rate ``train.scst_lr`` (fine-tuned backbone stages: times
``train.upper_lr_scale``, as in cross-entropy epochs) and dropout ``train.scst_dropout``, its
log-probabilities from a teacher-forced pass or the sampling pass (``train.scst_log_probs``), plus
``train.scst_xe_weight`` times the reference captions' cross-entropy. The
first self-critical epoch starts from the best cross-entropy epoch's weights (``best.pt``) with a
fresh optimizer; cross-entropy early stopping moves on to it. ``init_from`` (``--init-from``) starts a run from another run's
weights instead, e.g. ``train.scst_after=0`` on a finished cross-entropy run. The tag head
(``model.num_tags``) learns in cross-entropy epochs only: the policy loss is the reward's alone.

Ctrl-C or SIGTERM: the step in progress is finished, saved in ``last.pt``, and the run stops with
one line saying how to continue (``--resume``); a second Ctrl-C stops at once. A step whose loss
is not finite (a learning rate far too high) stops the run at once, saving nothing.

Data parallel (see ``distributed``): ``data.batch_size`` is the global batch, shared out among the
processes sample by sample (``phases`` scales each process's loss so DDP's average of the
gradients is the global batch's). Only rank 0 writes files; every process validates (rank 0's
scores count), so none waits long for another in a collective call.
"""

from __future__ import annotations

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
from sca_caption.config import ExperimentConfig, write_config
from sca_caption.data.caption_dataset import global_batches, shard
from sca_caption.decoding import DecodeSettings
from sca_caption.distributed import Processes
from sca_caption.errors import SCACaptionError, first_line
from sca_caption.evaluation import SplitEvaluation, evaluate_model
from sca_caption.io_utils import atomic_write_json, atomic_write_text
from sca_caption.locks import exclusive
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.models.captioner import SCACaptioner
from sca_caption.optimization import make_optimizer, set_learning_rate, step_seed
from sca_caption.phases import STEP_COLUMNS, CrossEntropyPhase, SelfCriticalPhase, batch_loader, validation_loss
from sca_caption.prepare import PreparedData
from sca_caption.rewards import CiderD, build_or_load_cider, cider_cache_path, train_references
from sca_caption.self_critical import greedy_reward
from sca_caption.training_log import LOG_COLUMNS, summary, table, tensorboard

# Settings that do not change what the weights become, so a resumed run may change them.
RESUMABLE_CHANGES = frozenset(
    {
        "data.data_root", "data.feature_cache", "data.num_workers",
        "train.patience", "train.log_every", "train.eval_every", "train.meteor",
        "train.checkpoint_every", "train.scst_probe_images", "model.kernels",
        *(f"decode.{name}" for name in DecodeSettings.__dataclass_fields__),  # validation decoding
    }
)
LOWER_IS_BETTER = ("loss",)


class TrainingError(SCACaptionError):
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

    ``history``: the rows of log.csv; ``epoch_loss``, ``epoch_steps``, ``epoch_seconds``: the
    running sum of the step losses since the previous row, their count and the training time;
    ``steps``: the rows of steps.csv; ``best_epoch``, ``best_step``: where the best validation was;
    ``validated_step``: the step after which the last validation ran (kept on every process).
    """

    best_score: float | None = None
    best_epoch: int = -1
    best_step: int = -1
    validated_step: int = -1
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


def build_model(config: ExperimentConfig, vocab_size: int, backbone_weights: str) -> SCACaptioner:
    """The captioner of ``config``, seeded with ``train.seed``. ``backbone_weights``: those the
    feature cache was made with ("imagenet", a path, or "none" for the extractor's seed-0 random
    init), so the backbone stages inside the model continue the cached ones."""
    backbone = build_cache_backbone(config.model.backbone, backbone_weights)
    torch.manual_seed(config.train.seed)
    return SCACaptioner(config.model, vocab_size, backbone)


def resume_checkpoint(out: Path, config: ExperimentConfig) -> Path:
    """``out/last.pt``, the checkpoint ``--resume`` continues with ``config``: a ``TrainingError``
    when there is none, a ``CheckpointError`` when it was trained with other settings than
    ``config`` (other than ``RESUMABLE_CHANGES``), before anything is prepared for the run."""
    last = _last_checkpoint(out)
    load_checkpoint(last, expect_config=_resumed_settings(config))
    return last


def _last_checkpoint(out: Path) -> Path:
    """``out/last.pt``; a ``TrainingError`` when there is none."""
    last = Path(out) / "last.pt"
    if not last.exists():
        raise TrainingError(f"{last}: nothing to resume (no last.pt in {out})")
    return last


def _resumed_settings(config: ExperimentConfig) -> dict[str, Any]:
    """``config`` as a dict without ``RESUMABLE_CHANGES``: what a resumed run must share with ``last.pt``."""
    expected = config.to_dict()
    for name in RESUMABLE_CHANGES:
        section, key = name.split(".")
        del expected[section][key]
    return expected


def improves(score: float, best: float | None, metric: str) -> bool:
    """Whether validation ``score`` of ``metric`` beats the ``best`` so far (None: no score yet)."""
    return best is None or (score < best if metric in LOWER_IS_BETTER else score > best)


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
        init_from: Path | None = None,
    ) -> None:
        """``init_from``: a checkpoint whose model weights a new run starts from (same model and vocabulary)."""
        self.config = config
        self._signals: list[str] = []  # SIGINT / SIGTERM received while ``run`` trains
        self.data = data
        self.out = Path(out)
        self.proc = processes
        self.device = processes.device
        self.progress = progress and processes.is_main
        self.log = log if processes.is_main else (lambda _: None)
        train, model = config.train, config.model
        if processes.distributed and train.scst_after is not None and train.scst_log_probs == "sample":
            raise TrainingError(
                "train.scst_log_probs sample takes its gradient outside DDP's forward: run it in one process, "
                "or use train.scst_log_probs=teacher"
            )

        self.vocab = data.vocab
        self.cache = data.open_cache()
        splits, length = config.data, config.data.max_length
        self.tags = data.tags(splits.train_split, model.num_tags) if model.num_tags else []
        train_samples = data.caption_samples(splits.train_split, self.cache, length, self.tags)
        self.val_records = data.split(splits.val_split)
        self.val_samples = data.caption_samples(splits.val_split, self.cache, length, self.tags)
        if not len(train_samples):
            raise TrainingError(f"no training samples: split {config.data.train_split!r} has no cached images")

        self.model = build_model(config, len(self.vocab), config.data.backbone_weights).to(self.device)
        self.cache.check_computed_by(self.model.encoder.features_fingerprint, "this run's")
        self.forward_module: nn.Module = self.model
        if processes.distributed:  # the tag head has no gradient where its loss is off or self-critical
            unused = model.num_tags > 0 and (model.tag_loss_weight == 0 or train.scst_after is not None)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
        self.cross_entropy = CrossEntropyPhase(
            config, self.model, self.forward_module, train_samples, processes, self._steps(len(train_samples), config.data.batch_size)
        )
        self.self_critical: SelfCriticalPhase | None = None
        self.val_reward: CiderD | None = None  # the reward of the validation captions (self-critical runs)
        if train.scst_after is not None:
            images = data.image_samples(splits.train_split, self.cache, length)
            reward = self._reward()
            self.self_critical = SelfCriticalPhase(config, self.model, self.forward_module, images, processes, reward, self.vocab)
            references = train_references(data.records, self.vocab, splits.val_split)
            self.val_reward = CiderD(references, reward.df.extended(references))

        self.optimizer = make_optimizer(self.model, train.lr, train.weight_decay)
        self.books = Bookkeeping()
        self.at = Position(0, 0, self._phase(0).order(0), 0)
        last = self.out / "last.pt"
        if resume:  # _restore compares the settings as resume_checkpoint does: one load here
            self._restore(_last_checkpoint(self.out))
        elif last.exists():
            raise TrainingError(f"{last} exists: pass --resume to continue that run, or --out for a new one")
        elif init_from is not None:
            self._initialise(init_from)
        self.writer: Any = None  # TensorBoard, opened by ``run``

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until ``train.epochs`` or early stopping, then score the best model on the test
        split; one run at a time per output folder (``locks.exclusive`` on ``OUT/.run.lock``)."""
        busy = f"{self.out}: another training run is writing this folder"
        with exclusive(self.out / ".run.lock", self.proc, busy), _signals_noted(self._signals):
            if self.proc.is_main:
                write_config(self.out / "config.yaml", self.config)
                self.writer = tensorboard(self.out)
            train = self.config.train
            phase = self._phase(self.at.epoch)
            samples = f"{len(phase.samples)} {'images, self-critically' if phase is self.self_critical else 'captions'}"
            self.log(
                f"training on {samples} ({self._steps(len(phase.samples), phase.batch_size)} steps per epoch, "
                f"{self.proc.world} process(es), {self.device}), validating on {len(self.val_records)} images"
            )
            while self.at.epoch < train.epochs and not self.books.stopped:
                if not self._train_epoch(self._phase(self.at.epoch)):
                    continue  # a validation within the epoch moved on: early stopping or self-critical epochs
                epoch = self.at.epoch + 1
                if train.val_every is None:
                    validate = epoch % train.eval_every == 0 or epoch == train.epochs
                    self._record(self._validate() if validate else None, epoch_end=True)
                elif epoch == train.epochs and not self._validated_now():
                    self._record(self._validate(), epoch_end=True)
                else:  # no row at this epoch end
                    self._start_epoch(epoch)
                    self._write_row(None, False)
            test_scores = self._test() if self.proc.is_main else {}
            if self.writer is not None:
                self.writer.close()
            return TrainResult(self.out, self.books.best_score, self.books.best_epoch, test_scores, self.books.history)

    def _train_epoch(self, phase: CrossEntropyPhase | SelfCriticalPhase) -> bool:
        """Train ``phase`` from the current position to the end of the epoch (True), or until a
        validation (``train.val_every``) moves on to another epoch or stops the run (False)."""
        data, train, at = self.config.data, self.config.train, self.at
        if phase is self.self_critical and at.epoch == train.scst_after and at.done == 0:
            self._start_self_critical()
        batches = global_batches(at.order, at.done, phase.batch_size, self.proc.world)
        shares = [shard(b, self.proc.rank, self.proc.world) for b in batches]
        steps = self._steps(len(phase.samples), phase.batch_size)
        bar = tqdm(
            total=steps, initial=steps - len(batches), unit="step",
            desc=f"epoch {at.epoch + 1}/{train.epochs}", disable=not self.progress, dynamic_ncols=True,
        )
        self.forward_module.train()
        began = started = time.perf_counter()  # began: of the samples-per-second; started: of books.epoch_seconds
        trained = 0
        with bar:
            for global_batch, batch in zip(batches, batch_loader(phase.samples, shares, data.num_workers, self.device)):
                set_learning_rate(self.optimizer, phase.learning_rate(at.step), train.upper_lr_scale)
                torch.manual_seed(step_seed(train.seed, at.step, self.proc.rank))
                loss, rewards = phase.step(self.optimizer, global_batch, batch.to(self.device))
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"{self.out}: the training loss is {loss} at step {at.step + 1} (epoch {at.epoch + 1}): "
                        "stopped without saving it; lower train.lr or set train.grad_clip"
                    )
                at.step += 1
                at.done += len(global_batch)
                self.books.epoch_loss += loss
                self.books.epoch_steps += 1
                if rewards is not None:
                    self._note_rewards(rewards)
                trained += len(global_batch)
                rate = trained / max(time.perf_counter() - began, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", samples_per_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                if at.step % train.log_every == 0:
                    self._log_step(loss, rate)
                mid_epoch = at.done < len(at.order)
                if train.val_every is not None and at.step % train.val_every == 0:
                    self.books.epoch_seconds += time.perf_counter() - started
                    if self._record(self._validate(), epoch_end=False):
                        return False
                    self.forward_module.train()
                    started = time.perf_counter()
                elif train.checkpoint_every and at.step % train.checkpoint_every == 0 and mid_epoch and self.proc.is_main:
                    self._save(self.out / "last.pt")
                self._stop_if_signalled(started)
        self.books.epoch_seconds += time.perf_counter() - started
        return True

    def _stop_if_signalled(self, started: float) -> None:
        """Where Ctrl-C or SIGTERM arrived (on rank 0) during the step just taken: keep it in
        last.pt and stop (``TrainingInterrupted``)."""
        if not self.proc.main_says(bool(self._signals)):
            return
        self.books.epoch_seconds += time.perf_counter() - started
        last = self.out / "last.pt"
        if self.proc.is_main:
            self._save(last)
        self.proc.barrier()
        raise TrainingInterrupted(
            f"{self.out}: stopped by {self._signals[0] if self._signals else 'another process'} after step "
            f"{self.at.step}; {last} holds it: continue with --resume"
        )

    def _start_self_critical(self) -> None:
        """The switch from cross-entropy: the best epoch's weights, a fresh optimizer, patience anew."""
        best = self.out / "best.pt"
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best).model)
        self.optimizer = make_optimizer(self.model, self.config.train.scst_lr, self.config.train.weight_decay)
        self.books.bad_evaluations = 0
        self.log(f"epoch {self.at.epoch + 1}: self-critical training from {best if best.exists() else 'the current weights'}")

    def _note_rewards(self, rewards: dict[str, float]) -> None:
        """The self-critical step just taken: its row of steps.csv, and TensorBoard scalars."""
        self.books.steps.append({"step": self.at.step, **rewards})
        if self.writer is not None:
            for key, value in rewards.items():
                self.writer.add_scalar(f"scst/{key}", value, self.at.step)

    def _log_step(self, loss: float, rate: float) -> None:
        """Every ``log_every`` steps: TensorBoard scalars, and a line where there is no progress bar."""
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.at.step)
            self.writer.add_scalar("train/lr", self._lr(), self.at.step)
        if not self.progress:
            self.log(f"epoch {self.at.epoch + 1} step {self.at.step}: loss {loss:.3f}, lr {self._lr():.2e}, {rate:.0f} captions/s")

    # -- validation, early stopping, epoch end, test -------------------------------------------

    def _validate(self) -> SplitEvaluation:
        """Captions and scores of the validation split and its loss (``scores["loss"]``). Every
        process decodes the split (METEOR on rank 0 only, whose scores count), so that none waits
        for rank 0 in a collective call; the loss is computed over the processes' shares."""
        evaluation = self._evaluate(self.model, self.config.data.val_split, meteor=self.proc.is_main)
        data, proc = self.config.data, self.proc
        evaluation.scores["loss"] = validation_loss(
            self.model, self.val_samples, data.batch_size, proc, data.num_workers, self.config.train.bf16
        )
        return evaluation

    def _evaluate(self, model: SCACaptioner, split: str, meteor: bool = True) -> SplitEvaluation:
        """Beam-search captions of ``split`` with the run's decoding settings, and their scores."""
        config = self.config
        return evaluate_model(
            model, self.vocab, config, self.data.records, self.cache, split, device=self.device,
            meteor=meteor and config.train.meteor, bf16=config.train.bf16, progress=self.progress,
        )

    def _record(self, evaluation: SplitEvaluation | None, epoch_end: bool) -> bool:
        """A row of log.csv for the training since the previous one and ``evaluation`` (None: not
        validated): early stopping, the next epoch (where ``epoch_end``, or where cross-entropy
        ran out of patience), the run's files. Whether training moves on from this epoch now."""
        row = self._row(evaluation)
        if evaluation is not None:
            self.books.validated_step = self.at.step
        improved, skip = self._judge(row)
        self.books.epoch_loss, self.books.epoch_steps, self.books.epoch_seconds = 0.0, 0, 0.0
        if epoch_end or skip:
            self._start_epoch(self.config.train.scst_after if skip else self.at.epoch + 1)
        self._write_row(row, improved)
        return skip or self.books.stopped

    def _validated_now(self) -> bool:
        """Whether the last validation ran after the step just taken (on every process alike:
        log.csv's rows are rank 0's)."""
        return self.books.validated_step == self.at.step

    def _row(self, evaluation: SplitEvaluation | None) -> dict[str, float]:
        """The log row of the training since the previous row (validation columns empty where not validated)."""
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
            if self.self_critical is not None:  # every process, like validation: none waits long for rank 0
                row.update(self._reward_columns(evaluation))
        return row

    def _reward_columns(self, evaluation: SplitEvaluation) -> dict[str, float]:
        """A self-critical run's validation columns (see ``LOG_COLUMNS``): ``probe_reward`` (where
        ``train.scst_probe_images``), ``val_reward``, and ``entropy`` (where self-critical steps
        ran since the previous row)."""
        assert self.self_critical is not None and self.val_reward is not None
        train, phase = self.config.train, self.self_critical
        columns: dict[str, float] = {}
        if train.scst_probe_images:
            columns["probe_reward"] = greedy_reward(
                self.model, phase.samples, train.scst_probe_images, phase.batch_size, phase.reward,
                self.config.decoding_limit, self.vocab, self.device, train.bf16,
            )
        ids = [r.image_id for r in self.val_records if r.image_id in evaluation.captions]
        if ids:
            texts = [evaluation.captions[i].split() for i in ids]
            words = [self.vocab.encode(text, len(text))[1:] for text in texts]  # the words and <end>
            width = max(map(len, words))
            tokens = torch.tensor([w + [self.vocab.pad] * (width - len(w)) for w in words])
            position = {r.image_id: m for m, r in enumerate(self.val_records)}
            images = torch.tensor([position[i] for i in ids])
            columns["val_reward"] = float(self.val_reward.score(tokens, images).mean())
        since = self.books.history[-1]["step"] if self.books.history else 0
        entropies = [s["entropy"] for s in self.books.steps if s["step"] > since]
        if entropies:
            columns["entropy"] = sum(entropies) / len(entropies)
        return columns

    def _judge(self, row: dict[str, float]) -> tuple[bool, bool]:
        """Early stopping on rank 0's ``row``: whether it is the best so far, and whether
        cross-entropy ran out of patience (train ``train.scst_after`` next). Sets
        ``books.stopped`` on every process."""
        train, books = self.config.train, self.books
        improved = skip = False
        score = row.get("val_loss" if train.early_stop_metric == "loss" else train.early_stop_metric)
        if self.proc.is_main and score is not None:
            improved = improves(score, books.best_score, train.early_stop_metric)
            if improved:
                books.best_score, books.best_epoch, books.bad_evaluations = score, self.at.epoch + 1, 0
                books.best_step = self.at.step
            else:
                books.bad_evaluations += 1
            books.stopped = train.patience is not None and books.bad_evaluations >= train.patience
            if books.stopped and train.scst_after is not None and self._phase(self.at.epoch) is self.cross_entropy:
                books.stopped, skip = False, True  # cross-entropy is done: self-critical training next
        books.stopped = self.proc.main_says(books.stopped)
        return improved, self.proc.main_says(skip)

    def _start_epoch(self, epoch: int) -> None:
        """Move the position to the start of ``epoch``."""
        self.at = Position(epoch, self.at.step, self._phase(epoch).order(epoch), 0)

    def _write_row(self, row: dict[str, float] | None, improved: bool) -> None:
        """Rank 0: ``row``'s summary line, log.csv and TensorBoard scalars (None: no row),
        best.pt (where ``improved``), last.pt and steps.csv; then every process waits for it."""
        train, books = self.config.train, self.books
        if self.proc.is_main:
            if row is not None:
                books.history.append(row)
                self.log(summary(row, train.early_stop_metric, improved))
            if improved:
                self._save(self.out / "best.pt")
            self._save(self.out / "last.pt")
            if row is not None:
                atomic_write_text(self.out / "log.csv", table(books.history))
            if books.steps:
                atomic_write_text(self.out / "steps.csv", table(books.steps, STEP_COLUMNS))
            if self.writer is not None and row is not None:
                x = int(row["epoch"] if train.val_every is None else row["step"])
                for key, value in row.items():
                    if key not in ("epoch", "step"):
                        self.writer.add_scalar(f"epoch/{key}", value, x)
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
        checkpoint = load_checkpoint(  # on the CPU
            path, expect_config=_resumed_settings(self.config), expect_vocab=self.vocab.words
        )
        samples = self._phase(checkpoint.epoch).samples
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

    def _initialise(self, path: Path) -> None:
        """Start from the model weights of another run's checkpoint ``path``."""
        model = {k: v for k, v in self.config.to_dict()["model"].items() if k != "kernels"}
        checkpoint = load_checkpoint(path, expect_config={"model": model}, expect_vocab=self.vocab.words)
        self.model.load_state_dict(checkpoint.model)
        self.log(f"starting from the weights of {path} (epoch {checkpoint.epoch}, step {checkpoint.step})")

    # -- helpers ----------------------------------------------------------------------------------

    def _phase(self, epoch: int) -> CrossEntropyPhase | SelfCriticalPhase:
        """How ``epoch`` trains: self-critically from ``train.scst_after`` on, else cross-entropy."""
        after = self.config.train.scst_after
        if self.self_critical is not None and after is not None and epoch >= after:
            return self.self_critical
        return self.cross_entropy

    def _steps(self, samples: int, batch_size: int) -> int:
        """Optimizer steps of an epoch over ``samples`` samples in global batches of ``batch_size``."""
        return len(global_batches(torch.arange(samples), 0, batch_size, self.proc.world))

    def _reward(self) -> CiderD:
        """CIDEr-D against the training references; the main process builds the document-frequency
        cache beside the vocabulary, the others then read it."""
        references = train_references(self.data.records, self.vocab, self.config.data.train_split)
        end_word = self.config.train.scst_reward_end
        path = cider_cache_path(self.data.vocab_path, end_word)
        return self.proc.main_first(lambda: build_or_load_cider(path, self.vocab, references, end_word))

    def _lr(self) -> float:
        """The captioner's learning rate (group 0; fine-tuned stages run at ``upper_lr_scale`` times it)."""
        return float(self.optimizer.param_groups[0]["lr"])
