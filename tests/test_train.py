"""Training pieces: learning-rate schedule, deterministic sample order, the DDP loss normalisation,
training samples, checkpoint contents, and the train CLI's refusals."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from sca_caption import train
from sca_caption.checkpoint import load_captioner, load_checkpoint
from sca_caption.config import ExperimentConfig, TrainConfig, load_config
from sca_caption.data.caption_dataset import (
    CaptionBatch, CaptionSamples, ImageSamples, epoch_order, global_batches, shard,
)
from sca_caption.data.corpus import records_in_split
from sca_caption.data.features import FeatureCache
from sca_caption.data.vocab import Vocab
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.prepare import prepare
from sca_caption.optimization import learning_rate, make_optimizer
from sca_caption.phases import cross_entropy_step
from tiny_backbone import build_tiny_backbone, tiny_features
from train_support import TinyShapes, tiny_shapes  # noqa: F401


def test_learning_rate_warms_up_then_follows_the_schedule():
    cosine = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", epochs=3)
    assert [learning_rate(s, cosine, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, cosine, 10) == 1.0
    assert learning_rate(4 + 13, cosine, 10) == pytest.approx(0.5)  # half way through 26 steps
    assert learning_rate(30, cosine, 10) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr=1.0, schedule="step", decay_every=2, decay_factor=0.5)
    assert [learning_rate(s, step, 10) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert learning_rate(1000, TrainConfig(lr=0.3, schedule="constant"), 10) == 0.3


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = torch.randint(1, 20, (100,), generator=torch.Generator().manual_seed(0))
    order = epoch_order(lengths, seed=3, epoch=1, batch_size=8)
    assert torch.equal(order, epoch_order(lengths, seed=3, epoch=1, batch_size=8))
    assert torch.equal(order.sort().values, torch.arange(100))
    assert not torch.equal(order, epoch_order(lengths, seed=3, epoch=2, batch_size=8))
    assert not torch.equal(order, epoch_order(lengths, seed=4, epoch=1, batch_size=8))


def test_epoch_order_batches_captions_of_similar_length():
    """With all samples in one sorting window, the batches cut the length-sorted samples into
    consecutive runs: no two batches' length ranges overlap, and the short last batch is last."""
    lengths = torch.randint(1, 20, (100,), generator=torch.Generator().manual_seed(1))
    batches = global_batches(epoch_order(lengths, seed=0, epoch=0, batch_size=8), 0, 8)
    assert [len(b) for b in batches] == [8] * 12 + [4]
    ranges = [(int(lengths[b].min()), int(lengths[b].max())) for b in batches]
    assert all(a[1] <= b[0] or b[1] <= a[0] for i, a in enumerate(ranges) for b in ranges[i + 1 :])
    assert ranges != sorted(ranges)  # the batches themselves are shuffled


def test_global_batches_continue_from_a_position_and_shards_cover_them():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    batches = global_batches(order, 4, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sum(batches, []) == order[4:].tolist()
    assert [len(b) for b in global_batches(order, 4, 3, world=2)] == [3, 3]  # a 1-sample tail is dropped
    shares = [shard(batches[0], rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batches[0]) and len(shares[0]) == 2


def _tiny_captioner() -> SCACaptioner:
    torch.manual_seed(0)
    config = ModelConfig(
        backbone="tiny", layers=("conv3", "conv4"), attention_dim=8, hidden_dim=12, embed_dim=6, dropout=0.0,
        doubly_stochastic=0.7, num_tags=3, tag_loss_weight=0.5,
    )
    return SCACaptioner(config, vocab_size=9, backbone=build_tiny_backbone())


def _gradients(model, features, captions, tags, rows, world, normalise=True) -> list[torch.Tensor]:
    model.zero_grad()
    picked = {tap: x[rows] for tap, x in features.items()}
    sums = model.loss(model(picked, captions[rows]), captions[rows], 0, tags[rows])
    if normalise:  # as the trainer does: the global batch's counts, times the world size
        loss = sums.mean(int((captions[:, 1:] != 0).sum()), len(captions)) * world
    else:
        loss = sums.mean()
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_process_shares_average_to_the_global_batch_gradient():
    """DDP averages the processes' gradients: with the global normalisation that average is the
    gradient of the whole batch's loss, words, attention and tag terms alike."""
    model = _tiny_captioner()
    features = tiny_features(("conv3", "conv4"), batch=5)
    captions = torch.tensor(
        [[1, 4, 5, 6, 7, 2], [1, 4, 2, 0, 0, 0], [1, 8, 6, 5, 2, 0], [1, 3, 2, 0, 0, 0], [1, 7, 7, 4, 6, 2]]
    )
    tags = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    everything = list(range(5))
    whole = _gradients(model, features, captions, tags, everything, world=1)
    shares = [_gradients(model, features, captions, tags, shard(everything, r, 2), world=2) for r in range(2)]
    for full, first, second in zip(whole, *shares):
        assert torch.allclose(full, (first + second) / 2, atol=1e-6, rtol=1e-5)
    # Averaging each process's own mean loss (tokens counted per process) is not the same thing.
    naive = [_gradients(model, features, captions, tags, shard(everything, r, 2), 2, normalise=False) for r in range(2)]
    assert not all(torch.allclose(f, (a + b) / 2, atol=1e-6, rtol=1e-5) for f, a, b in zip(whole, *naive))


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_step_follows_the_label_smoothed_loss(smoothing):
    model = _tiny_captioner()
    features = tiny_features(("conv3", "conv4"), batch=2)
    captions = torch.tensor([[1, 4, 5, 2, 0], [1, 8, 6, 5, 2]])
    tags = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    by_hand = model.loss(model(features, captions), captions, 0, tags, smoothing).mean()
    optimizer = make_optimizer(model, lr=0.0, weight_decay=0.0)
    step_loss = cross_entropy_step(
        model, model, optimizer, CaptionBatch(features, captions, tags), 0, 7, 2, 1,
        TrainConfig(label_smoothing=smoothing, grad_clip=None),
    )
    torch.testing.assert_close(step_loss, by_hand.detach())
    if smoothing:
        plain = model.loss(model(features, captions), captions, 0, tags).mean()
        assert not torch.allclose(step_loss, plain.detach())


def test_caption_samples_pair_each_caption_with_its_image_features(tiny_shapes: TinyShapes):
    config = load_config("shapes", overrides=tiny_shapes.overrides(data__max_length=6))
    data = prepare(config, progress=False, log=lambda _: None)
    cache = FeatureCache(data.cache_path)
    records = records_in_split(data.records, "train")
    tags = torch.arange(len(records) * 2, dtype=torch.float32).view(-1, 2)
    samples = CaptionSamples(records, data.vocab, cache, max_length=6, tags=tags)
    assert len(samples) == sum(len(r.tokens) for r in records) and samples.missing == []
    index = [7, 0, 7]  # record 1's third caption, record 0's first, repeated
    batch = samples[index]
    expected = [data.vocab.encode(records[1].tokens[2], 6), data.vocab.encode(records[0].tokens[0], 6)]
    width = max(len(e) for e in expected)
    for row, ids in zip(batch.captions, [expected[0], expected[1], expected[0]]):
        assert row.tolist() == ids + [data.vocab.pad] * (width - len(ids))
    assert batch.captions.shape[1] == width
    assert torch.equal(batch.features["stage7"][1], cache[cache.index_of(records[0].image_id)]["stage7"])
    assert torch.equal(batch.tags, tags[[1, 0, 1]])
    assert samples.target_count(index) == 2 * (len(expected[0]) - 1) + len(expected[1]) - 1


def test_image_samples_carry_each_images_references(tiny_shapes: TinyShapes):
    """Self-critical samples: each image once with its reference captions (max_length words kept),
    (B, M, T) with all-<pad> rows where an image has fewer than M."""
    config = load_config("shapes", overrides=tiny_shapes.overrides(data__max_length=6))
    data = prepare(config, progress=False, log=lambda _: None)
    cache = FeatureCache(data.cache_path)
    records = list(records_in_split(data.records, "train"))
    records[0] = dataclasses.replace(records[0], tokens=records[0].tokens[:1])  # an image with one caption
    samples = ImageSamples(records, data.vocab, cache, max_length=6)
    assert len(samples) == len(records)
    batch = samples[[2, 0]]
    assert torch.equal(batch.images, torch.tensor([2, 0]))
    assert torch.equal(batch.features["stage7"][1], cache[cache.index_of(records[0].image_id)]["stage7"])
    count = max(len(records[2].tokens), 1)
    assert batch.references.shape[:2] == (2, count)
    for row, record in zip(batch.references, (records[2], records[0])):
        for m in range(count):
            ids = data.vocab.encode(record.tokens[m], 6) if m < len(record.tokens) else []
            assert row[m].tolist() == ids + [data.vocab.pad] * (batch.references.shape[2] - len(ids))


@pytest.fixture(scope="module")
def trained(tiny_shapes: TinyShapes, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A one-epoch tiny run in-process (its output folder and settings)."""
    out = tmp_path_factory.mktemp("run") / "out"
    settings = tiny_shapes.overrides(train__epochs=1)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    return out, settings


def test_a_run_writes_checkpoints_log_and_test_scores(trained, capsys):
    out, settings = trained
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "log.csv", "test_scores.json", "config.yaml"}
    checkpoint = load_checkpoint(out / "last.pt")  # weights_only loading
    config = load_config("shapes", overrides=settings)
    assert ExperimentConfig.from_dict(checkpoint.config) == config
    assert (config.model.backbone, config.model.layers) == ("efficientnet_lite0", ("stage7",))
    assert (checkpoint.epoch, checkpoint.step, checkpoint.data_position) == (1, 4, 0)
    data = prepare(config, progress=False, log=lambda _: None)
    train_records = records_in_split(data.records, "train")
    samples = CaptionSamples(train_records, data.vocab, FeatureCache(data.cache_path), config.data.max_length)
    next_epoch = epoch_order(samples.targets, config.train.seed, 1, config.data.batch_size)
    assert torch.equal(checkpoint.data_order, next_epoch)
    assert checkpoint.vocab == list(Vocab.load(data.vocab_path).words)
    model, vocab, loaded_config = load_captioner(out / "last.pt")
    assert loaded_config == config and list(vocab.words) == checkpoint.vocab and not model.training
    assert model.state_dict().keys() == checkpoint.model.keys()
    assert all(torch.equal(v, checkpoint.model[k]) for k, v in model.state_dict().items())
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and math.isfinite(float(rows[0]["CIDEr"]))
    assert float(rows[0]["val_loss"]) < math.log(len(checkpoint.vocab))  # it learnt something


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_rerunning_a_finished_run_redoes_nothing(trained, capsys):
    out, settings = trained
    before = (out / "last.pt").stat().st_mtime_ns
    assert train.main(["--no-progress", "--out", str(out), *settings]) == 0
    assert f"{out} holds a finished run" in capsys.readouterr().out
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_a_second_run_into_an_unfinished_folder_needs_resume(trained, tmp_path, capsys):
    out, settings = trained
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(out / "last.pt", unfinished / "last.pt")  # killed before the end: no test_scores.json
    assert train.main(["--no-progress", "--out", str(unfinished), *settings]) == 2
    assert f"{unfinished / 'last.pt'} exists: pass --resume" in _error_line(capsys)


@pytest.mark.parametrize("key, self_critical, refusal", [
    ("upper_lr_scale", False, None),  # its default is what runs did before it: they resume
    ("scst_dropout", False, None),  # no self-critical epoch: it changed nothing
    ("scst_dropout", True, "train.scst_dropout is None there, 0.0 here"),  # before it, model.dropout: not the default
])
def test_a_run_from_before_a_key_existed_resumes_as_it_was_trained(trained, tmp_path, capsys, key, self_critical, refusal):
    out, settings = trained
    older = tmp_path / "older"
    older.mkdir()
    payload = torch.load(out / "last.pt", weights_only=True)
    del payload["checksum"]  # a file saved before checksums too (edited, it would be refused as corrupt)
    del payload["config"]["train"][key]
    if self_critical:
        payload["config"]["train"]["scst_after"] = 0
        settings = [*settings, "train.scst_after=0"]
    torch.save(payload, older / "last.pt")
    code = train.main(["--no-progress", "--out", str(older), "--resume", *settings])
    if refusal is None:
        assert code == 0 and f"resuming {older / 'last.pt'}" in capsys.readouterr().out
    else:
        assert code == 2 and refusal in _error_line(capsys)


@pytest.mark.parametrize("damage", ["another group", "no params", "no groups"])
def test_an_optimizer_state_of_other_parameter_groups_is_one_line(trained, tmp_path, capsys, damage):
    out, settings = trained
    other = tmp_path / "other"
    other.mkdir()
    payload = torch.load(out / "last.pt", weights_only=True)
    del payload["checksum"]  # as a file saved before checksums (edited, it would be refused as corrupt)
    groups = payload["optimizer"]["param_groups"]
    if damage == "another group":
        groups.append({**groups[0], "params": []})
    elif damage == "no params":
        del groups[0]["params"]
    else:
        del payload["optimizer"]["param_groups"]
    torch.save(payload, other / "last.pt")
    assert train.main(["--no-progress", "--out", str(other), "--resume", *settings]) == 2
    assert f"{other / 'last.pt'}: its optimizer state does not fit this run's parameter groups" in _error_line(capsys)


def test_a_cache_of_another_backbone_prefix_is_refused(tiny_shapes, tmp_path, capsys):
    prefix, _ = build_cache_backbone("efficientnet_lite0", "imagenet").split(("stage7",))
    assert FeatureCache(tiny_shapes.cache).prefix_fingerprint == prefix.fingerprint().hex()
    other = tmp_path / "other.h5"
    shutil.copy(tiny_shapes.cache, other)
    with h5py.File(other, "r+") as f:
        f.attrs["prefix_fingerprint"] = "ab" * 32
    out = tmp_path / "run"
    assert train.main(["--no-progress", "--out", str(out), *tiny_shapes.overrides(data__feature_cache=other)]) == 2
    assert f"{other}: its features were computed by another backbone prefix than this run's (prefix fingerprint abababababab… there" in _error_line(capsys)
    assert not (out / "last.pt").exists()


def test_resume_refuses_another_config_or_vocabulary(trained, capsys):
    out, settings = trained
    wider = [item for item in settings if not item.startswith("model.hidden_dim=")]  # a key is given once
    assert train.main(["--no-progress", "--out", str(out), "--resume", *wider, "model.hidden_dim=48"]) == 2
    assert "checkpoint does not match this run: model.hidden_dim is 32 there, 48 here" in _error_line(capsys)
    assert train.main(["--no-progress", "--out", str(out), "--resume", *settings, "data.max_length=3"]) == 2
    trained_with = load_config("shapes", overrides=settings).data.max_length
    assert f"data.max_length is {trained_with} there, 3 here" in _error_line(capsys)


def test_resume_without_a_checkpoint_and_bad_settings_are_one_line_errors(tiny_shapes, tmp_path, capsys):
    settings = tiny_shapes.overrides()
    assert train.main(["--no-progress", "--out", str(tmp_path / "new"), "--resume", *settings]) == 2
    assert "nothing to resume" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), "train.lrr=1"]) == 2
    assert "unknown key train.lrr (did you mean train.lr?)" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.early_stop_metric=METEOR"]) == 2
    assert "train.meteor is false" in _error_line(capsys)
    missing = str(tmp_path / "no-such-data")  # refused before preparation looks for the data
    assert train.main(["--dataset", "flickr8k", "--data-root", missing, "train.early_stop_metric=shapes_accuracy"]) == 2
    assert "shapes_accuracy needs the shapes dataset, not flickr8k" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.early_stop_metric=SPICE"]) == 2
    assert "train.early_stop_metric must be one of CIDEr, Bleu_4, METEOR, ROUGE_L, loss" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.scst_after=2"]) == 2  # 2 epochs
    assert "train.scst_after is 2: it must be below train.epochs (2)" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.scst_after=1", "train.scst_baseline=mean",
                       "train.scst_samples=1"]) == 2
    assert "scst_baseline mean needs train.scst_samples >= 2" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.scst_after=1", "train.scst_dropout=1.0"]) == 2
    assert "train.scst_dropout must be below 1" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.label_smoothing=1"]) == 2
    assert "train.label_smoothing must be below 1" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.label_smoothing=0.1", "train.scst_after=0"]) == 2
    assert "train.label_smoothing smooths the cross-entropy epochs' loss, and train.scst_after 0 leaves none" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.val_every=3", "train.eval_every=2"]) == 2
    assert "train.val_every (steps between validations) and train.eval_every (epochs between them): set one" in _error_line(capsys)
    assert train.main(["--out", str(tmp_path / "x"), *settings, "train.upper_lr_scale=0.1"]) == 2
    assert "train.upper_lr_scale is the learning rate of fine-tuned backbone stages: it needs model.finetune_upper true" in _error_line(capsys)
    with pytest.raises(SystemExit) as usage:
        train.main(["--out", str(tmp_path / "x"), "--resume", "--init-from", str(tmp_path / "a.pt")])
    assert usage.value.code == 2 and "--resume continues a run, --init-from starts one" in capsys.readouterr().err


def test_best_checkpoint_follows_the_chosen_metric(tiny_shapes, tmp_path):
    out = tmp_path / "acc"
    settings = tiny_shapes.overrides(train__epochs=3, train__early_stop_metric="shapes_accuracy", train__patience=None)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    with open(out / "log.csv", newline="") as handle:
        accuracy = [float(row["shapes_accuracy"]) for row in csv.DictReader(handle)]
    first_best = accuracy.index(max(accuracy)) + 1
    assert load_checkpoint(out / "best.pt").epoch == first_best


def test_validation_every_n_steps_writes_a_row_per_validation_and_keeps_the_best(tiny_shapes, tmp_path):
    """4 cross-entropy steps, then 2 self-critical epochs of 4 steps of 7 images (7, 7, 7, 3):
    validations after steps 3, 6, 9 and the last, 12, wherever they fall in an epoch."""
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(
        train__epochs=3, train__scst_after=1, train__scst_samples=2, train__scst_baseline="mean",
        train__scst_images=7, train__val_every=3, train__patience=None,
    )
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["epoch"], row["step"]) for row in rows] == [("1", "3"), ("2", "6"), ("3", "9"), ("3", "12")]
    assert all(math.isfinite(float(row["CIDEr"])) and math.isfinite(float(row["train_loss"])) for row in rows)
    cider = [float(row["CIDEr"]) for row in rows]
    best = load_checkpoint(out / "best.pt")
    assert best.step == int(rows[cider.index(max(cider))]["step"])
    steps = (out / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 8 and all(line.endswith(",") for line in steps[1:])  # no cross_entropy without the weight
    # a self-critical run logs the rewards at every validation, the entropy where self-critical steps ran
    assert all(0 <= float(row[key]) <= 10 for row in rows for key in ("probe_reward", "val_reward"))
    assert rows[0]["entropy"] == "" and all(float(row["entropy"]) > 0 for row in rows[1:])
    last = load_checkpoint(out / "last.pt")
    assert (last.epoch, last.step) == (3, 12)


@pytest.mark.parametrize("log_probs", ["teacher", "sample"])
def test_a_self_critical_run_mixes_in_the_references_cross_entropy(tiny_shapes, tmp_path, log_probs):
    """train.scst_xe_weight: steps.csv logs the references' cross-entropy per token at every
    self-critical step, from either pass of log-probabilities (none without the weight)."""
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(
        train__epochs=2, train__scst_after=1, train__scst_samples=2, train__scst_baseline="mean",
        train__scst_images=7, train__scst_xe_weight=0.5, train__scst_log_probs=log_probs, train__patience=None,
    )
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    with open(out / "steps.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(0 < float(row["cross_entropy"]) < 20 for row in rows)
    with open(out / "log.csv", newline="") as handle:
        assert all(math.isfinite(float(row["CIDEr"])) for row in csv.DictReader(handle))


def test_validation_every_n_steps_with_patience_counts_validations(tiny_shapes, tmp_path):
    """Patience 1 and a learning rate of 0: the second validation brings no gain and stops the run mid-epoch."""
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(train__epochs=3, train__lr=0.0, train__val_every=3, train__patience=1)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    with open(out / "log.csv", newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["3", "6"]
    assert (load_checkpoint(out / "best.pt").step, load_checkpoint(out / "last.pt").step) == (3, 6)
    assert all(row["val_reward"] == "" for row in csv.DictReader(open(out / "log.csv")))  # not a self-critical run


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_upper_lr_scale_holds_in_cross_entropy_and_self_critical_steps(tiny_shapes, tmp_path, scale):
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(
        model__layers="[stage6,stage7]", model__finetune_upper="true", train__upper_lr_scale=scale,
        train__scst_after=1, train__scst_baseline="mean", train__scst_samples=2, data__feature_cache=str(tmp_path / "two.h5"),
    )
    assert train.main(["--no-progress", "--out", str(out), *settings]) == 0
    _, upper = build_cache_backbone("efficientnet_lite0", "imagenet").split(("stage6", "stage7"))
    built = {f"encoder.upper.{name}": value for name, value in upper.state_dict().items()}
    trained = load_checkpoint(out / "last.pt").model
    weights = [name for name, value in built.items() if value.is_floating_point() and "running" not in name]
    unchanged = [torch.equal(trained[name], built[name]) for name in weights]
    assert all(unchanged) if scale == 0.0 else not any(unchanged)


def test_a_non_finite_loss_stops_the_run_at_its_step_saving_nothing(tiny_shapes, tmp_path, capsys):
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(train__lr="1e30", train__grad_clip=None)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 2
    assert _error_line(capsys) == (
        f"error: {out}: the training loss is nan at step 3 (epoch 1): stopped without saving it; "
        "lower train.lr or set train.grad_clip"
    )
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists() and not (out / "log.csv").exists()


def test_a_loss_that_turns_non_finite_leaves_the_good_checkpoints_as_they_were(tiny_shapes, tmp_path, capsys):
    """Epoch 2's learning rate is 1e28 (a step decay by 1e30): epoch 1's files must stay."""
    out = tmp_path / "run"
    settings = tiny_shapes.overrides(
        train__schedule="step", train__decay_every=1, train__decay_factor="1e30", train__grad_clip=None,
        train__eval_every=1,
    )
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 2
    assert "the training loss is nan at step 7 (epoch 2): stopped without saving it" in _error_line(capsys)
    for name in ("last.pt", "best.pt"):
        kept = load_checkpoint(out / name)
        assert (kept.epoch, kept.step) == (1, 4)
        assert all(bool(torch.isfinite(value).all()) for value in kept.model.values() if value.is_floating_point())
    with open(out / "log.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]
