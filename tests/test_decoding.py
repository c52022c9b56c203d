"""Beam search against exhaustive search, a hand-written greedy and beam search, single-image runs and replays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption import decoding
from sca_caption.decoding import LENGTH_PENALTIES, DecodingError, Hypothesis, beam_search
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.sca import ORDERS, AttentionWeights
from tiny_backbone import build_tiny_backbone, tiny_features

START, END, UNK = 0, 1, 2
TAP = "x"
SCA_LAYERS = ("conv3", "conv4")
Caption = tuple[list[int], float, bool]  # tokens, log-prob, finished
WU_ALPHA = 1.5


@dataclass
class TinyState:
    h: Tensor  # (R, D)
    c: Tensor  # (R, D)
    feats: Tensor  # (R, C, m)
    steps: Tensor  # (R,) words read so far

    def select(self, index: Tensor) -> "TinyState":
        return TinyState(self.h[index], self.c[index], self.feats[index], self.steps[index])


class TinyOutput(NamedTuple):
    logits: Tensor
    state: TinyState
    attention: AttentionWeights


class TinyCaptioner(nn.Module):
    """A random LSTM language model over channel-then-spatial attended features, driven by h.

    How soon <end> comes depends on the image (``end_gate``) and grows by ``end_per_step`` with
    every word read; ``logit_bias`` (V,) is added to every step's logits, to make <end> or <unk>
    likely or rare; ``sharpness`` scales the word logits.
    """

    def __init__(
        self, vocab: int, attention: bool = True, sharpness: float = 3.0, end_per_step: float = 0.0
    ) -> None:
        super().__init__()
        channels, hidden = 4, 8
        self.attention = attention
        self.sharpness = sharpness
        self.end_per_step = end_per_step
        self.embed = nn.Embedding(vocab, hidden)
        self.init = nn.Linear(channels, 2 * hidden)
        self.channel_h = nn.Linear(hidden, channels)
        self.spatial_v = nn.Linear(channels, hidden)
        self.spatial_h = nn.Linear(hidden, hidden)
        self.spatial_w = nn.Linear(hidden, 1)
        self.cell = nn.LSTMCell(hidden + channels, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.end_gate = nn.Linear(channels, 1)
        self.register_buffer("logit_bias", torch.zeros(vocab))

    def start(self, features: Mapping[str, Tensor]) -> tuple[TinyState, None]:
        feats = features[TAP].flatten(2)
        h, c = torch.tanh(self.init(feats.mean(2))).chunk(2, dim=1)
        return TinyState(h, c, feats, torch.zeros(feats.shape[0])), None

    def step(self, words: Tensor, state: TinyState, memory: None) -> TinyOutput:
        v = state.feats
        beta = torch.softmax(4.0 * self.channel_h(state.h) + v.mean(2), dim=1)  # (R, C)
        weighted = v * beta.unsqueeze(2)
        a = torch.tanh(self.spatial_v(weighted.transpose(1, 2)) + self.spatial_h(state.h).unsqueeze(1))
        alpha = torch.softmax(8.0 * self.spatial_w(a).squeeze(2), dim=1)  # (R, m)
        context = (weighted * alpha.unsqueeze(1)).sum(2)
        h, c = self.cell(torch.cat((self.embed(words), context), dim=1), (state.h, state.c))
        end_logit = 3.0 * self.end_gate(v.mean(2)) + self.end_per_step * state.steps.unsqueeze(1)
        logits = self.sharpness * self.out(h) + F.one_hot(torch.tensor(END), self.out.out_features) * end_logit
        logits = logits + self.logit_bias
        maps = self.attention
        state = TinyState(h, c, v, state.steps + 1)
        return TinyOutput(logits, state, AttentionWeights((alpha,) if maps else None, (beta,) if maps else None))


class CountingModel:
    """Forwards to a model and counts ``step`` calls."""

    def __init__(self, model: TinyCaptioner) -> None:
        self.model = model
        self.steps = 0

    def start(self, features: Mapping[str, Tensor]) -> tuple[TinyState, None]:
        return self.model.start(features)

    def step(self, words: Tensor, state: TinyState, memory: None) -> TinyOutput:
        self.steps += 1
        return self.model.step(words, state, memory)


def make_model(vocab: int, seed: int = 0, **settings: float) -> TinyCaptioner:
    """A TinyCaptioner with weights drawn from ``seed``; ``settings`` go to its constructor."""
    torch.manual_seed(seed)
    return TinyCaptioner(vocab, **settings).eval()  # type: ignore[arg-type]


def make_features(batch: int, seed: int = 1, channels: int = 4) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {TAP: 2.0 * torch.randn(batch, channels, 2, 2, generator=gen)}


def one(features: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    return {TAP: features[TAP][b : b + 1]}


def step_log_probs(model, words: Tensor, state, memory, suppress: tuple[int, ...]):
    out = model.step(words, state, memory)
    logits = out.logits.clone()
    logits[:, list(suppress)] = float("-inf")
    return F.log_softmax(logits.double(), dim=1)[0], out


def every_caption(model, features: dict[str, Tensor], max_length: int, suppress: tuple[int, ...]) -> list[Caption]:
    """(tokens, log_prob, finished) of every caption of one image: ended by <end> or cut at max_length."""
    found: list[Caption] = []

    def walk(prefix: list[int], state, word: int, total: float) -> None:
        logp, out = step_log_probs(model, torch.tensor([word]), state, memory, suppress)
        for token in range(logp.shape[0]):
            if token in suppress:
                continue
            score = total + logp[token].item()
            if token == END:
                found.append((prefix, score, True))
            elif len(prefix) + 1 == max_length:
                found.append((prefix + [token], score, False))
            else:
                walk(prefix + [token], out.state, token, score)

    with torch.no_grad():
        state, memory = model.start(features)
        walk([], state, START, 0.0)
    return found


def penalised(caption: Caption, kind: str) -> float:
    """The caption's score under length penalty ``kind``, computed from the documented formulas."""
    tokens, log_prob, finished = caption
    length = len(tokens) + int(finished)
    if kind == "average":
        return log_prob / length
    if kind == "wu":
        return log_prob / ((5 + length) / 6) ** WU_ALPHA
    return log_prob


def replay(model, features: dict[str, Tensor], hyp: Hypothesis, suppress: tuple[int, ...]):
    """Teacher-force ``hyp`` (plus <end> if finished): its log-prob and per-step attention
    [t][layer] (None where the model has none)."""
    words = [START, *hyp.tokens]
    targets = hyp.tokens + ([END] if hyp.finished else [])
    state, memory = model.start(features)
    total, spatial, channel = 0.0, [], []
    with torch.no_grad():
        for word, target in zip(words, targets):
            logp, out = step_log_probs(model, torch.tensor([word]), state, memory, suppress)
            total += logp[target].item()
            spatial.append(None if out.attention.spatial is None else [x[0] for x in out.attention.spatial])
            channel.append(None if out.attention.channel is None else [x[0] for x in out.attention.channel])
            state = out.state
    n = len(hyp.tokens)
    return total, None if spatial[0] is None else spatial[:n], None if channel[0] is None else channel[:n]


def assert_attention_replays(model, features: dict[str, Tensor], hyp: Hypothesis, suppress: tuple[int, ...]) -> int:
    """``hyp``'s log-prob and attention equal a teacher-forced replay's; weights sum to 1.
    Returns the number of attention maps checked."""
    log_prob, spatial, channel = replay(model, features, hyp, suppress)
    assert hyp.log_prob == pytest.approx(log_prob, abs=1e-5)
    if spatial is None and channel is None:
        assert hyp.attention is None
        return 0
    checked = 0
    for got, want in ((hyp.attention.spatial, spatial), (hyp.attention.channel, channel)):
        if want is None:
            assert got is None
            continue
        assert got is not None and all(layer.shape[0] == len(hyp.tokens) for layer in got)
        for t, want_step in enumerate(want):
            assert len(got) == len(want_step)
            for layer, want_map in zip(got, want_step):
                assert float(layer[t].sum()) == pytest.approx(1.0, abs=1e-5)
                torch.testing.assert_close(layer[t], want_map)
                checked += 1
    return checked


def greedy(model, features: dict[str, Tensor], **settings) -> list[Hypothesis]:
    """Beam search of width 1 (greedy decoding), one hypothesis per image."""
    return [hyps[0] for hyps in beam_search(model, features, start=START, end=END, beam_size=1, **settings)]


def exhaustive_test_model() -> TinyCaptioner:
    """Vocabulary 5 (<start>, <end>, <unk> and two words) with <end> made rarer, so the optima
    under the three penalties are a mix of empty, short and cut captions."""
    model = make_model(5, seed=1)
    model.logit_bias[END] = -2.0
    return model


@pytest.mark.parametrize("kind", LENGTH_PENALTIES)
def test_wide_beam_finds_the_exhaustive_optimum(kind: str) -> None:
    vocab, max_length, suppress = 5, 4, (UNK,)
    model = exhaustive_test_model()
    features = make_features(3)
    found = beam_search(
        model, features, start=START, end=END, beam_size=vocab**max_length, max_length=max_length,
        length_penalty=kind, alpha=WU_ALPHA, n_best=5, suppress=suppress,
    )
    for b in range(3):
        captions = every_caption(model, one(features, b), max_length, suppress)
        assert len(captions) == 1 + 3 + 9 + 27 + 81
        ranked = sorted(captions, key=lambda c: -penalised(c, kind))[:5]
        assert [h.tokens for h in found[b]] == [c[0] for c in ranked]
        assert [h.finished for h in found[b]] == [c[2] for c in ranked]
        for hyp, (tokens, log_prob, finished) in zip(found[b], ranked):
            assert hyp.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert hyp.score == pytest.approx(penalised((tokens, log_prob, finished), kind), abs=1e-4)


def test_the_exhaustive_test_model_needs_search_and_feels_the_penalty() -> None:
    """Greedy misses the optimum and the penalties move it, so the test above can fail."""
    model = exhaustive_test_model()
    features = make_features(3)
    best = {
        kind: [
            max(every_caption(model, one(features, b), 4, (UNK,)), key=lambda c: penalised(c, kind))[0]
            for b in range(3)
        ]
        for kind in LENGTH_PENALTIES
    }
    assert [g.tokens for g in greedy(model, features, max_length=4, suppress=(UNK,))] != best["none"]
    assert len({repr(captions) for captions in best.values()}) == len(LENGTH_PENALTIES)


@pytest.mark.parametrize("end_bias", [0.0, 1.5])
def test_beam_of_one_takes_the_most_likely_word_each_step(end_bias: float) -> None:
    model = make_model(12, seed=3)
    model.logit_bias[END] = end_bias
    features = make_features(16, seed=4)
    found = greedy(model, features, max_length=8, suppress=(UNK,))
    if end_bias == 0.0:
        assert {g.finished for g in found} == {True, False}
    for b, hyp in enumerate(found):
        state, memory = model.start(one(features, b))
        word, total, expected, finished = START, 0.0, [], False
        with torch.no_grad():
            for _ in range(8):
                logp, out = step_log_probs(model, torch.tensor([word]), state, memory, (UNK,))
                word = int(logp.argmax())
                total += logp[word].item()
                if word == END:
                    finished = True
                    break
                expected.append(word)
                state = out.state
        assert hyp.tokens == expected
        assert hyp.finished == finished
        assert hyp.log_prob == pytest.approx(total, abs=1e-5)
        assert hyp.score == pytest.approx(total, abs=1e-5)


def reference_beam_search(model, features: dict[str, Tensor], beam_size: int, max_length: int, n_best: int, kind: str):
    """The documented search for one image, one beam at a time in plain Python: each step ranks
    every extension of every live beam; an <end> ranked in the first ``beam_size`` finishes a
    caption, the ``beam_size`` best other extensions live on; survivors are cut at max_length."""
    first, memory = model.start(features)
    live: list[tuple[list[int], float, object]] = [([], 0.0, first)]
    finished: list[Caption] = []
    with torch.no_grad():
        for t in range(max_length):
            extensions = []
            for tokens, total, state in live:
                word = tokens[-1] if tokens else START
                logp, out = step_log_probs(model, torch.tensor([word]), state, memory, (UNK,))
                extensions += [(total + logp[w].item(), tokens, w, out.state) for w in range(logp.shape[0]) if w != UNK]
            extensions.sort(key=lambda e: -e[0])
            finished += [(tokens, total, True) for rank, (total, tokens, w, _) in enumerate(extensions)
                         if w == END and rank < beam_size]
            live = [(tokens + [w], total, state) for total, tokens, w, state in extensions if w != END][:beam_size]
    finished += [(tokens, total, False) for tokens, total, _ in live]
    return sorted(finished, key=lambda c: -penalised(c, kind))[:n_best]


@pytest.mark.parametrize("kind", LENGTH_PENALTIES)
def test_narrow_beam_search_follows_its_definition(kind: str) -> None:
    model = make_model(12, seed=6, sharpness=1.0, end_per_step=0.5)  # <end> comes mid-search
    model.logit_bias[END] = -3.0
    features = make_features(5, seed=6)
    found = beam_search(model, features, start=START, end=END, beam_size=3, max_length=6, length_penalty=kind,
                        alpha=WU_ALPHA, n_best=3, suppress=(UNK,))
    for b in range(5):
        expected = reference_beam_search(model, one(features, b), 3, 6, 3, kind)
        assert [(h.tokens, h.finished) for h in found[b]] == [(c[0], c[2]) for c in expected]
        assert [h.log_prob for h in found[b]] == pytest.approx([c[1] for c in expected], abs=1e-5)


@pytest.mark.parametrize("kind", LENGTH_PENALTIES)
def test_a_batch_decodes_as_each_image_alone(kind: str) -> None:
    model = make_model(12, seed=5)
    features = make_features(5, seed=6)
    settings = dict(start=START, end=END, beam_size=3, max_length=7, length_penalty=kind, alpha=WU_ALPHA,
                    n_best=3, suppress=(UNK,))
    together = beam_search(model, features, **settings)
    lengths = set()
    for b in range(5):
        alone = beam_search(model, one(features, b), **settings)[0]
        assert [h.tokens for h in together[b]] == [h.tokens for h in alone]
        assert [h.finished for h in together[b]] == [h.finished for h in alone]
        for x, y in zip(together[b], alone):
            assert x.log_prob == pytest.approx(y.log_prob, abs=1e-5)
            assert x.score == pytest.approx(y.score, abs=1e-5)
        lengths.add((len(alone[0].tokens), alone[0].finished))
    assert len(lengths) > 1, "every image finished alike: the test would not see a mix-up"


@pytest.mark.parametrize("kind", LENGTH_PENALTIES)
def test_early_stopping_changes_nothing_but_the_step_count(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(12, seed=7)
    model.logit_bias[END] = 3.0
    features = make_features(4, seed=8)
    settings = dict(start=START, end=END, beam_size=4, max_length=12, length_penalty=kind, alpha=WU_ALPHA,
                    n_best=2, suppress=(UNK,))
    early = CountingModel(model)
    stopped = beam_search(early, features, **settings)
    monkeypatch.setattr(decoding, "_done", lambda live, *args: torch.zeros_like(live.log_prob[:, 0], dtype=torch.bool))
    full = CountingModel(model)
    finished = beam_search(full, features, **settings)
    assert full.steps == 12
    if kind == "none":
        assert early.steps < 12
    for x, y in zip(stopped, finished):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-6)


def test_attention_is_tracked_through_beam_reordering() -> None:
    model = make_model(12, seed=9)
    model.logit_bias[END] = 1.0
    features = make_features(3, seed=10)
    beams = beam_search(model, features, start=START, end=END, beam_size=3, max_length=6, n_best=3,
                        suppress=(UNK,), return_attention=True)
    widths_one = greedy(model, features, max_length=6, suppress=(UNK,), return_attention=True)
    checked = 0
    for b in range(3):
        for hyp in [*beams[b], widths_one[b]]:
            assert hyp.attention.spatial is not None and hyp.attention.channel is not None
            assert all(layer.shape == (len(hyp.tokens), 4) for layer in hyp.attention.spatial + hyp.attention.channel)
            checked += assert_attention_replays(model, one(features, b), hyp, (UNK,))
    assert checked > 40


def test_no_attention_asked_or_available_gives_none() -> None:
    features = make_features(2)
    plain = beam_search(make_model(6), features, start=START, end=END, beam_size=2, max_length=3)
    assert all(h.attention is None for hyps in plain for h in hyps)
    blind = make_model(6, attention=False)
    asked = beam_search(blind, features, start=START, end=END, beam_size=2, max_length=3, return_attention=True)
    assert all(h.attention is None for hyps in asked for h in hyps)
    assert all(h.attention is None for h in greedy(blind, features, max_length=3, return_attention=True))


def test_n_best_are_sorted_and_distinct() -> None:
    model = make_model(12, seed=11)
    model.logit_bias[END] = 1.0
    features = make_features(4, seed=12)
    for kind in LENGTH_PENALTIES:
        for hyps in beam_search(model, features, start=START, end=END, beam_size=5, max_length=6, n_best=5,
                                length_penalty=kind, alpha=WU_ALPHA, suppress=(UNK,)):
            assert len(hyps) == 5
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == 5


def test_without_end_the_best_cut_caption_is_returned() -> None:
    vocab, max_length = 5, 4
    model = make_model(vocab, seed=13)
    model.logit_bias[END] = -30.0
    features = make_features(2, seed=14)
    wide = beam_search(model, features, start=START, end=END, beam_size=vocab**max_length, max_length=max_length,
                       suppress=(UNK,))
    narrow = beam_search(model, features, start=START, end=END, beam_size=2, max_length=max_length,
                         n_best=2, suppress=(UNK,))
    for b in range(2):
        best = max(every_caption(model, one(features, b), max_length, (UNK,)), key=lambda c: c[1])
        [hyp] = wide[b]
        assert not hyp.finished and hyp.tokens == best[0]
        assert hyp.log_prob == pytest.approx(best[1], abs=1e-4)
        assert len(narrow[b]) == 2
        assert all(not h.finished and len(h.tokens) == max_length for h in narrow[b])


def test_suppressed_unk_never_appears() -> None:
    model = make_model(8, seed=15)
    model.logit_bias[UNK] = 4.0
    features = make_features(4, seed=16)
    settings = dict(start=START, end=END, max_length=5)
    loose = beam_search(model, features, beam_size=3, n_best=3, **settings)
    assert any(UNK in h.tokens for hyps in loose for h in hyps), "the model never says <unk>: nothing to suppress"
    strict = beam_search(model, features, beam_size=3, n_best=3, suppress=(UNK,), **settings)
    assert all(UNK not in h.tokens for hyps in strict for h in hyps)
    assert all(UNK not in h.tokens for h in greedy(model, features, max_length=5, suppress=(UNK,)))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(length_penalty="log"), "length_penalty"),
        (dict(alpha=-1.0, length_penalty="wu"), "alpha"),
        (dict(n_best=3), "n_best"),
        (dict(beam_size=0), "beam_size"),
        (dict(max_length=0), "max_length"),
        (dict(suppress=(END,)), "<end>"),
        (dict(suppress=(99,)), "outside the model's vocabulary"),
    ],
)
def test_bad_settings_raise_one_clear_error(settings: dict, message: str) -> None:
    arguments = dict(start=START, end=END, beam_size=2, max_length=3) | settings
    with pytest.raises(DecodingError, match=message):
        beam_search(make_model(6), make_features(1), **arguments)


def test_empty_features_raise_one_clear_error() -> None:
    with pytest.raises(DecodingError, match="features is empty"):
        beam_search(make_model(6), {}, start=START, end=END, beam_size=1, max_length=3)


def test_length_penalty_scores_are_as_documented() -> None:
    log_prob = torch.tensor([-6.0])
    assert float(decoding.LengthPenalty("none")(log_prob, 3)) == -6.0
    assert float(decoding.LengthPenalty("average")(log_prob, 3)) == -2.0
    assert float(decoding.LengthPenalty("wu", 1.0)(log_prob, 7)) == pytest.approx(-3.0)
    assert math.isclose(float(decoding.LengthPenalty("wu", 0.0)(log_prob, 7)), -6.0)


def tiny_sca_captioner(order: str, vocab: int) -> SCACaptioner:
    """A random two-layer SCACaptioner on the tiny backbone (conv3, then conv4 through its stage)."""
    torch.manual_seed(0)
    config = ModelConfig(
        backbone="tiny", layers=SCA_LAYERS, order=order, attention_dim=4, hidden_dim=8, embed_dim=4, dropout=0.0
    )
    model = SCACaptioner(config, vocab, build_tiny_backbone()).eval()
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(8.0)  # spread the word scores: no near-ties
    return model


@pytest.mark.parametrize("order", ORDERS)
def test_beam_search_on_a_tiny_sca_captioner(order: str) -> None:
    vocab, max_length = 5, 3
    model = tiny_sca_captioner(order, vocab)
    features = tiny_features(SCA_LAYERS, batch=3)
    found = beam_search(
        model, features, start=START, end=END, beam_size=vocab**max_length, max_length=max_length, n_best=3,
        length_penalty="wu", alpha=WU_ALPHA, suppress=(UNK,), return_attention=True,
    )
    checked = 0
    for b in range(3):
        alone = {name: x[b : b + 1] for name, x in features.items()}
        captions = every_caption(model, alone, max_length, (UNK,))
        ranked = sorted(captions, key=lambda c: -penalised(c, "wu"))[:3]
        assert [h.tokens for h in found[b]] == [c[0] for c in ranked]
        assert [h.score for h in found[b]] == pytest.approx([penalised(c, "wu") for c in ranked], abs=1e-4)
        for hyp in found[b]:
            checked += assert_attention_replays(model, alone, hyp, (UNK,))
    assert (checked > 0) == (order != "none")


def has_repeated_trigram(tokens: list[int]) -> bool:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(trigrams) != len(set(trigrams))


@pytest.mark.parametrize("kind", LENGTH_PENALTIES)
def test_min_length_gives_the_best_caption_of_at_least_that_many_words(kind: str) -> None:
    vocab, max_length, suppress, minimum = 5, 4, (UNK,), 2
    model = exhaustive_test_model()
    model.logit_bias[END] = 1.0  # short captions would win without the constraint
    features = make_features(3)
    settings = dict(start=START, end=END, beam_size=vocab**max_length, max_length=max_length, length_penalty=kind,
                    alpha=WU_ALPHA, n_best=3, suppress=suppress)
    free = beam_search(model, features, **settings)
    bounded = beam_search(model, features, min_length=minimum, **settings)
    assert any(len(hyps[0].tokens) < minimum for hyps in free), "the constraint would change nothing"
    for b in range(3):
        allowed = [c for c in every_caption(model, one(features, b), max_length, suppress) if len(c[0]) >= minimum]
        ranked = sorted(allowed, key=lambda c: -penalised(c, kind))[:3]
        assert [h.tokens for h in bounded[b]] == [c[0] for c in ranked]
        assert [h.log_prob for h in bounded[b]] == pytest.approx([c[1] for c in ranked], abs=1e-4)


def test_trigram_blocking_gives_the_best_caption_without_a_repeated_trigram() -> None:
    vocab, max_length, suppress = 5, 5, (UNK,)
    model = make_model(vocab, seed=2, sharpness=1.0)
    model.logit_bias[END] = -4.0
    model.logit_bias[3] = 2.0  # one word is very likely: captions repeat it
    features = make_features(3, seed=3)
    settings = dict(start=START, end=END, beam_size=vocab**max_length, max_length=max_length, n_best=2,
                    suppress=suppress)
    free = beam_search(model, features, **settings)
    blocked = beam_search(model, features, block_trigrams=True, **settings)
    assert any(has_repeated_trigram(hyps[0].tokens) for hyps in free), "nothing to block"
    for b in range(3):
        allowed = [c for c in every_caption(model, one(features, b), max_length, suppress) if not has_repeated_trigram(c[0])]
        ranked = sorted(allowed, key=lambda c: -c[1])[:2]
        assert [h.tokens for h in blocked[b]] == [c[0] for c in ranked]
        assert [h.log_prob for h in blocked[b]] == pytest.approx([c[1] for c in ranked], abs=1e-4)


def test_min_length_must_leave_room_for_the_end() -> None:
    with pytest.raises(DecodingError, match="min_length"):
        beam_search(make_model(6), make_features(1), start=START, end=END, beam_size=2, max_length=3, min_length=3)
