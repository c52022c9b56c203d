"""Self-critical training: sampling through the decoding step, the baselines, the policy loss
against a step-by-step computation, and its gradient's direction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.data.vocab import SPECIALS, Vocab
from sca_caption.decoding import beam_search
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.rewards import CiderD, DocumentFrequency
from sca_caption.self_critical import (
    dropout_rate,
    greedy_tokens,
    entropy_sum,
    policy_loss,
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


def reward() -> CiderD:
    references = [[[4, 5, 7], [4, 5, 7, 4, 9, 10]], [[4, 6, 8]], [[4, 9, 10], [4, 5, 8]]]
    return CiderD(references, DocumentFrequency.build(references, len(VOCAB)))


def test_samples_are_k_per_image_padded_after_end_and_never_special():
    net = model().eval()
    torch.manual_seed(1)
    tokens = sample_captions(net, features(), samples=4, max_length=6, vocab=VOCAB)
    assert tokens.shape[0] == 12 and tokens.shape[1] <= 6
    for row in tokens.tolist():
        assert not {VOCAB.start, VOCAB.unk} & set(row)
        if VOCAB.end in row:
            cut = row.index(VOCAB.end)
            assert all(t == VOCAB.pad for t in row[cut + 1 :]) and VOCAB.pad not in row[:cut]
        else:
            assert VOCAB.pad not in row  # cut at the maximum length
    torch.manual_seed(1)
    assert torch.equal(sample_captions(net, features(), samples=4, max_length=6, vocab=VOCAB), tokens)
    assert len({tuple(r) for r in tokens[:4].tolist()}) > 1, "an image's samples should differ"


def test_sampling_follows_the_models_distribution():
    """The first sampled word of many samples has the frequencies of the first step's softmax."""
    net = model().eval()
    one = {name: x[:1] for name, x in features().items()}
    with torch.no_grad():
        state, memory = net.start(one)
        first = torch.softmax(suppressed(net.step(torch.tensor([VOCAB.start]), state, memory).logits, VOCAB), dim=1)[0]
    torch.manual_seed(2)
    tokens = sample_captions(net, one, samples=4000, max_length=1, vocab=VOCAB)[:, 0]
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
    log_probs = teacher_forced_log_probs(net, feats, run.captions, 2, VOCAB)
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
    policy_loss(teacher_forced_log_probs(net, feats, run.captions, 4, VOCAB), run, VOCAB).backward()
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


@pytest.mark.parametrize("bf16", [False, True])
def test_a_self_critical_step_samples_under_the_loss_pass_autocast(bf16, monkeypatch):
    """train.bf16: the sampling pass (and the greedy baseline) run under the same bfloat16
    autocast as the teacher-forced loss pass."""
    from sca_caption.config import DataConfig, ExperimentConfig, TrainConfig
    from sca_caption.data.caption_dataset import ImageBatch
    from sca_caption.distributed import ONE_PROCESS
    from sca_caption.phases import SelfCriticalPhase

    net = model().float()
    config = ExperimentConfig(data=DataConfig(max_length=4), train=TrainConfig(bf16=bf16, scst_samples=2))
    phase = SelfCriticalPhase(config, net, net, None, ONE_PROCESS, reward(), VOCAB)  # type: ignore[arg-type]
    seen: list[bool] = []
    step = net.step

    def watched(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    monkeypatch.setattr(net, "step", watched)
    batch = ImageBatch({name: x.float() for name, x in features().items()}, torch.tensor([0, 1, 2]))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    torch.manual_seed(0)
    loss, row = phase.step(optimizer, [0, 1, 2], batch)
    assert seen and set(seen) == {bf16}  # every decoding step, sampling and greedy
    assert math.isfinite(loss) and row["entropy"] > 0
