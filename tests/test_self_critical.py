"""Self-critical training: sampling through the decoding step, the baselines, the policy loss
against a step-by-step computation, and its gradient's direction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.config import DataConfig, ExperimentConfig, TrainConfig
from sca_caption.data.caption_dataset import ImageBatch
from sca_caption.data.vocab import SPECIALS, Vocab
from sca_caption.distributed import ONE_PROCESS, Processes
from sca_caption.decoding import beam_search
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.phases import SelfCriticalPhase
from sca_caption.rewards import CiderD, DocumentFrequency
from sca_caption.self_critical import (
    dropout_rate,
    greedy_tokens,
    entropy_sum,
    policy_loss,
    reference_cross_entropy,
    rollout,
    sample_captions,
    suppressed,
    teacher_forced_log_probs,
)

VOCAB = Vocab([*SPECIALS, "a", "dog", "cat", "runs", "sits", "red", "ball"])
LAYERS = ("conv3",)


def model(seed: int = 0, dropout: float = 0.0) -> SCACaptioner:
    config = ModelConfig(backbone="tiny", layers=LAYERS, order="cs", attention_dim=4, hidden_dim=8, embed_dim=6,
                         dropout=dropout)
    torch.manual_seed(seed)
    return SCACaptioner(config, len(VOCAB), build_tiny_backbone()).double()


def features() -> dict[str, torch.Tensor]:
    return {name: x.double() for name, x in tiny_features(LAYERS).items()}  # 3 images


REFERENCES = [[[4, 5, 7], [4, 5, 7, 4, 9, 10]], [[4, 6, 8]], [[4, 9, 10], [4, 5, 8]]]


def reward() -> CiderD:
    return CiderD(REFERENCES, DocumentFrequency.build(REFERENCES, len(VOCAB)))


def references() -> torch.Tensor:
    """REFERENCES as an ImageBatch's (N, M, T) table: <start> words <end>, all-<pad> missing rows."""
    table = torch.full((3, 2, 8), VOCAB.pad, dtype=torch.long)
    for i, captions in enumerate(REFERENCES):
        for j, words in enumerate(captions):
            table[i, j, : len(words) + 2] = torch.tensor([VOCAB.start, *words, VOCAB.end])
    return table


def test_samples_are_k_per_image_padded_after_end_and_never_special():
    net = model().eval()
    torch.manual_seed(1)
    with torch.no_grad():
        tokens, _ = sample_captions(net, features(), samples=4, max_length=6, vocab=VOCAB)
    assert tokens.shape[0] == 12 and tokens.shape[1] <= 6
    for row in tokens.tolist():
        assert not {VOCAB.start, VOCAB.unk} & set(row)
        if VOCAB.end in row:
            cut = row.index(VOCAB.end)
            assert all(t == VOCAB.pad for t in row[cut + 1 :]) and VOCAB.pad not in row[:cut]
        else:
            assert VOCAB.pad not in row  # cut at the maximum length
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(sample_captions(net, features(), samples=4, max_length=6, vocab=VOCAB)[0], tokens)
    assert len({tuple(r) for r in tokens[:4].tolist()}) > 1, "an image's samples should differ"


def test_sampling_follows_the_models_distribution():
    """The first sampled word of many samples has the frequencies of the first step's softmax."""
    net = model().eval()
    one = {name: x[:1] for name, x in features().items()}
    with torch.no_grad():
        state, memory = net.start(one)
        first = torch.softmax(suppressed(net.step(torch.tensor([VOCAB.start]), state, memory).logits, VOCAB), dim=1)[0]
    torch.manual_seed(2)
    with torch.no_grad():
        tokens = sample_captions(net, one, samples=4000, max_length=1, vocab=VOCAB)[0][:, 0]
    frequencies = torch.bincount(tokens, minlength=len(VOCAB)).double() / len(tokens)
    assert torch.allclose(frequencies, first, atol=0.03)


def test_baselines():
    net = model().eval()
    torch.manual_seed(3)
    mean = rollout(net, features(), torch.tensor([0, 1, 2]), reward=reward(), samples=3, baseline="mean",
                   max_length=6, vocab=VOCAB)
    per_image = mean.reward.view(3, 3)
    for i in range(3):
        for k in range(3):
            others = [per_image[i, j] for j in range(3) if j != k]
            assert float(mean.baseline[3 * i + k]) == pytest.approx(float(sum(others) / 2), abs=1e-6)
    greedy = rollout(net, features(), torch.tensor([0, 1, 2]), reward=reward(), samples=3, baseline="greedy",
                     max_length=6, vocab=VOCAB)
    hypotheses = beam_search(net, features(), start=VOCAB.start, end=VOCAB.end, beam_size=1, max_length=6,
                             suppress=VOCAB.never_emitted)
    tokens = greedy_tokens(net, features(), 6, VOCAB)
    for i, (best,) in enumerate(hypotheses):
        assert tokens[i, : len(best.tokens)].tolist() == best.tokens
    expected = reward().score(tokens, torch.tensor([0, 1, 2])).repeat_interleave(3)
    torch.testing.assert_close(greedy.baseline, expected)


def test_policy_loss_equals_the_step_by_step_log_probabilities():
    net = model().eval()
    feats = features()
    torch.manual_seed(4)
    run = rollout(net, feats, torch.tensor([0, 1, 2]), reward=reward(), samples=2, baseline="mean", max_length=5,
                  vocab=VOCAB)
    log_probs, _ = teacher_forced_log_probs(net, feats, run.captions, 2, VOCAB)
    loss = policy_loss(log_probs, run, VOCAB)
    expected, entropy = 0.0, 0.0
    for r, caption in enumerate(run.captions.tolist()):
        image = {name: x[r // 2 : r // 2 + 1] for name, x in feats.items()}
        with torch.no_grad():
            state, memory = net.start(image)
            total = 0.0
            for word, target in zip(caption[:-1], caption[1:]):
                if target == VOCAB.pad:
                    break
                out = net.step(torch.tensor([word]), state, memory)
                probs = F.softmax(suppressed(out.logits, VOCAB), dim=1)[0]
                total += float(probs[target].log())
                entropy -= sum(float(p * p.log()) for p in probs if p > 0)
                state = out.state
        expected -= float(run.reward[r] - run.baseline[r]) * total
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-8)
    assert float(entropy_sum(log_probs, run, VOCAB)) == pytest.approx(entropy, abs=1e-8)


def test_a_step_raises_the_better_sample_and_lowers_the_worse():
    net = model()
    feats = {name: x[:1] for name, x in features().items()}
    torch.manual_seed(5)
    run = rollout(net, feats, torch.tensor([0]), reward=reward(), samples=4, baseline="mean", max_length=5,
                  vocab=VOCAB)
    advantage = run.reward - run.baseline
    assert advantage.abs().max() > 0, "all samples scored alike: nothing to learn"
    best, worst = int(advantage.argmax()), int(advantage.argmin())

    def log_prob(row: int) -> float:
        targets = run.captions[row : row + 1, 1:]
        with torch.no_grad():
            logits = net(feats, run.captions[row : row + 1]).logits
        picked = F.log_softmax(suppressed(logits, VOCAB), dim=-1).gather(2, targets.clamp(min=VOCAB.end).unsqueeze(2))
        return float((picked.squeeze(2) * (targets != VOCAB.pad)).sum())

    before = log_prob(best), log_prob(worst)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    policy_loss(teacher_forced_log_probs(net, feats, run.captions, 4, VOCAB)[0], run, VOCAB).backward()
    optimizer.step()
    assert log_prob(best) > before[0] and log_prob(worst) < before[1]


def test_dropout_rate_zero_makes_train_mode_the_eval_model_and_is_undone():
    net = model(dropout=0.5)
    feats = features()
    captions = torch.tensor([[VOCAB.start, 4, 5, VOCAB.end]] * 3)
    with torch.no_grad():
        expected = net.eval()(feats, captions).logits
        net.train()
        with dropout_rate(net, 0.0):
            inside = net(feats, captions).logits
        outside = net(feats, captions).logits
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    assert not torch.allclose(outside, expected), "dropout 0.5 was not restored"
    assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    with dropout_rate(net, None):
        assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}


@pytest.mark.parametrize("log_probs, xe_weight", [("teacher", 0.0), ("teacher", 0.5), ("sample", 0.5)])
@pytest.mark.parametrize("bf16", [False, True])
def test_a_self_critical_step_samples_under_the_loss_pass_autocast(bf16, log_probs, xe_weight, monkeypatch):
    """train.bf16: the sampling pass (and the greedy baseline) run under the same bfloat16
    autocast as the loss pass, whichever pass gives the log-probabilities, references or not."""
    net = model().float()
    train = TrainConfig(bf16=bf16, scst_samples=2, scst_log_probs=log_probs, scst_xe_weight=xe_weight)
    config = ExperimentConfig(data=DataConfig(max_length=4), train=train)
    phase = SelfCriticalPhase(config, net, net, None, ONE_PROCESS, reward(), VOCAB)  # type: ignore[arg-type]
    seen: list[bool] = []
    step = net.step

    def watched(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    monkeypatch.setattr(net, "step", watched)
    batch = ImageBatch({name: x.float() for name, x in features().items()}, torch.tensor([0, 1, 2]), references())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    torch.manual_seed(0)
    loss, row = phase.step(optimizer, [0, 1, 2], batch)
    assert seen and set(seen) == {bf16}  # every decoding step, sampling and greedy
    assert math.isfinite(loss) and row["entropy"] > 0
    assert math.isfinite(row.get("cross_entropy", 0.0)) and ("cross_entropy" in row) == (xe_weight > 0)


def test_the_sampling_pass_log_probabilities_are_the_teacher_forced_ones_with_their_gradient():
    """train.scst_log_probs sample: at dropout 0 the sampling pass's log-probabilities, kept with
    gradient, give the teacher-forced pass's loss and gradient."""
    net = model()
    feats = features()
    torch.manual_seed(6)
    run = rollout(net, feats, torch.tensor([0, 1, 2]), reward=reward(), samples=3, baseline="mean", max_length=6,
                  vocab=VOCAB, grad=True)
    assert run.log_probs.requires_grad and run.log_probs.shape[:2] == run.captions[:, 1:].shape
    sampled = policy_loss(run.log_probs, run, VOCAB)
    sampled_gradient = torch.autograd.grad(sampled, list(net.decoder.parameters()))
    forced = policy_loss(teacher_forced_log_probs(net, feats, run.captions, 3, VOCAB)[0], run, VOCAB)
    forced_gradient = torch.autograd.grad(forced, list(net.decoder.parameters()))
    assert float(sampled.detach()) == pytest.approx(float(forced.detach()), abs=1e-10) and float(sampled.detach()) != 0.0
    for a, b in zip(sampled_gradient, forced_gradient):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    torch.manual_seed(6)
    plain = rollout(net, feats, torch.tensor([0, 1, 2]), reward=reward(), samples=3, baseline="mean", max_length=6,
                    vocab=VOCAB)
    assert plain.log_probs is None and torch.equal(plain.captions, run.captions)  # the same draws


def test_with_dropout_the_sampling_pass_scores_its_samples_under_its_own_masks():
    """Dropout on: each sampled word is drawn from the distribution the sampling pass returns
    (replayed step by step under the same RNG, so under the same masks); a teacher-forced pass
    draws other masks and other log-probabilities."""
    net = model(dropout=0.5).train()
    one = {name: x[:1] for name, x in features().items()}
    torch.manual_seed(7)
    tokens, log_probs = sample_captions(net, one, samples=2, max_length=5, vocab=VOCAB)
    torch.manual_seed(7)  # replay: the same dropout masks and draws, in the same order
    state, memory = net.start(one)
    state = state.select(torch.tensor([0, 0]))
    words = torch.full((2,), VOCAB.start)
    for t in range(tokens.shape[1]):
        out = net.step(words, state, memory)
        expected = F.log_softmax(suppressed(out.logits, VOCAB), dim=1)
        torch.testing.assert_close(log_probs[:, t], expected)
        words = torch.multinomial(expected.detach().exp(), 1).squeeze(1)
        assert torch.equal(words.masked_fill(tokens[:, t] == VOCAB.pad, VOCAB.pad), tokens[:, t])
        state = out.state
    captions = torch.cat([torch.full((2, 1), VOCAB.start), tokens], dim=1)
    forced, _ = teacher_forced_log_probs(net, one, captions, 2, VOCAB)
    assert not torch.allclose(forced, log_probs)


@pytest.mark.parametrize("width", [8, 4])  # references wider than the samples, and narrower (cut)
def test_references_in_the_same_forward_leave_the_samples_log_probabilities_and_give_their_cross_entropy(width):
    net = model()
    feats = features()
    torch.manual_seed(8)
    run = rollout(net, feats, torch.tensor([0, 1, 2]), reward=reward(), samples=2, baseline="mean", max_length=7,
                  vocab=VOCAB)
    assert (run.captions.shape[1] > width) == (width == 4), "the two cases: samples narrower, then wider"
    table = references()[:, :, :width]
    alone, none = teacher_forced_log_probs(net, feats, run.captions, 2, VOCAB)
    together, words = teacher_forced_log_probs(net, feats, run.captions, 2, VOCAB, table)
    assert none is None
    torch.testing.assert_close(together, alone)
    expected = 0.0
    for i, captions in enumerate(REFERENCES):
        for caption in captions:
            ids = torch.tensor([[VOCAB.start, *caption, VOCAB.end]])[:, :width]
            ids = ids[:, : int((ids != VOCAB.pad).sum())]
            with torch.no_grad():
                logits = net({name: x[i : i + 1] for name, x in feats.items()}, ids).logits[0]
            expected += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    # SCACaptioner.loss takes the cross-entropy in float32, as in cross-entropy training
    assert float(words.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(reference_cross_entropy(net, feats, table).detach()) == pytest.approx(expected, rel=1e-6)


class TwoIdenticalProcesses(Processes):
    """Two processes that hold the same share of every batch: each sum is twice this process's."""

    def sum(self, value: torch.Tensor) -> float:
        return 2 * float(value)


def mixed_step(log_probs: str, processes: Processes, seed: int = 9) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """One self-critical step with the references' cross-entropy at weight 0.25 (learning rate
    0, no clipping): its loss, steps.csv row and the gradient it left."""
    net = model()
    train = TrainConfig(scst_samples=2, scst_baseline="mean", scst_xe_weight=0.25, scst_log_probs=log_probs,
                        grad_clip=None)
    config = ExperimentConfig(data=DataConfig(max_length=4), train=train)
    phase = SelfCriticalPhase(config, net, net, None, processes, reward(), VOCAB)  # type: ignore[arg-type]
    batch = ImageBatch(features(), torch.tensor([0, 1, 2]), references())
    torch.manual_seed(seed)
    loss, row = phase.step(torch.optim.SGD(net.parameters(), lr=0.0), [0, 1, 2], batch)
    return loss, row, [p.grad for p in net.decoder.parameters()]


@pytest.mark.parametrize("log_probs", ["teacher", "sample"])
def test_a_step_mixes_in_the_references_cross_entropy_with_its_weight(log_probs):
    """train.scst_xe_weight λ: the step's loss, and its gradient, are those of the policy loss per
    sampled token plus λ times the references' cross-entropy per reference token, whichever pass
    gives the log-probabilities."""
    loss, row, gradient = mixed_step(log_probs, ONE_PROCESS)
    net, feats = model(), features()
    torch.manual_seed(9)
    run = rollout(net, feats, torch.tensor([0, 1, 2]), reward=reward(), samples=2, baseline="mean",
                  max_length=ExperimentConfig(data=DataConfig(max_length=4)).decoding_limit, vocab=VOCAB)
    policy = policy_loss(teacher_forced_log_probs(net, feats, run.captions, 2, VOCAB)[0], run, VOCAB) / run.tokens
    reference_tokens = sum(len(words) + 1 for captions in REFERENCES for words in captions)
    cross_entropy = reference_cross_entropy(net, feats, references()) / reference_tokens
    expected = policy + 0.25 * cross_entropy
    assert row["cross_entropy"] == pytest.approx(float(cross_entropy.detach()), rel=1e-6)  # float32, as SCACaptioner.loss
    assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
    for got, want in zip(gradient, torch.autograd.grad(expected, list(net.decoder.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_under_two_processes_with_the_same_share_a_mixed_step_is_the_one_process_step():
    """DDP: each process divides its sums by the global batch's counts and multiplies by the
    number of processes (DDP then averages): two processes holding the same images must give
    the one-process loss, row and gradient."""
    two = TwoIdenticalProcesses(0, 2, torch.device("cpu"))
    loss, row, gradient = mixed_step("teacher", ONE_PROCESS)
    loss2, row2, gradient2 = mixed_step("teacher", two)
    assert loss2 == pytest.approx(loss, rel=1e-9) and row2 == pytest.approx(row, rel=1e-9)
    for got, want in zip(gradient2, gradient):  # each process's own gradient, before DDP's average of two
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_sampling_pass_log_probabilities_are_refused_under_ddp(tmp_path):
    from sca_caption.trainer import Trainer, TrainingError

    config = ExperimentConfig(train=TrainConfig(epochs=2, scst_after=1, scst_log_probs="sample"))
    with pytest.raises(TrainingError, match="train.scst_log_probs sample takes its gradient outside DDP's forward"):
        Trainer(config, None, tmp_path, Processes(0, 2, torch.device("cpu")))  # type: ignore[arg-type]
