"""Batched beam search over any step-wise caption model (beam size 1 is greedy decoding).

The model is driven one word at a time through ``StepModel`` (``start`` then ``step``), so this
module never imports the captioner. Beam search keeps every image's beams as rows of one tensor
(``B·K`` rows) and calls ``model.step`` once per time step for the whole batch; each beam runs
the model's whole step, because in SCA-CNN the attention depends on the beam's hidden state.
The per-image memory is never copied per beam: the state's rows say which image each reads.

Conventions:

- Scores are log-softmax log-probabilities. Suppressed ids (e.g. ``<unk>``) get a ``-inf`` logit
  before the softmax, so they are never emitted and the rest of the distribution renormalises.
- ``max_length`` is the number of decoding steps, i.e. the most tokens emitted, ``<end>``
  included. A hypothesis still going after ``max_length`` steps is cut there (``finished=False``)
  and competes with the finished ones, so every image gets at least one hypothesis.
- The *penalty length* of a hypothesis is the number of steps it took: its tokens plus one for
  ``<end>`` if it emitted one. So an immediate ``<end>`` has length 1 and a cut one ``max_length``.
  Length penalties: ``"none"`` (score = log-prob), ``"average"`` (log-prob / length) and ``"wu"``
  (log-prob / ((5 + length) / 6) ** alpha, Wu et al. 2016).
- Returned tokens exclude ``<start>`` and ``<end>``; returned attention is aligned with them:
  row t of each layer's weights is what the model used when it emitted ``tokens[t]``.

Beam search details: the first step runs on one row per image and expands to the K best distinct
first words. At each step the 2K best extensions of the live beams are ranked; an ``<end>`` among
the first K of them finishes a hypothesis (kept aside, penalty applied, the ``n_best`` best per
image kept), and the K best other extensions become the new live beams (ranked by log-prob). With
``beam_size`` 1 and no penalty this is exactly greedy decoding.

Early stopping is exact for every penalty here: log-probs only fall as a beam grows and every
penalty divides by a denominator >= 1 that never shrinks with length, so no descendant of a live
beam can score above ``log_prob / denominator(max_length)``. An image is done when that bound of
its best live beam cannot beat its worst kept finished hypothesis (``n_best`` of them kept); its
beams are then retired, and decoding stops when every image is done. For ``"none"`` the bound is
the beam's own log-prob (the classic rule); for ``"average"`` and ``"wu"`` it is looser, so they
stop later, but they never return a different answer than running to ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sca_caption.config_rules import first_problem, rules_of, section_values
from sca_caption.data.vocab import Vocab
from sca_caption.errors import SCACaptionError
from sca_caption.field_ranges import out_of_range
from sca_caption.models.sca import AttentionWeights

LENGTH_PENALTIES = ("none", "average", "wu")
MAX_LENGTH = 100  # the most decoding steps anyone may ask for (the caption CLI, the service, a config)


class DecodingError(SCACaptionError):
    """Impossible decoding settings; the message is one line naming the setting and the problem."""


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded, every setting of ``beam_search`` and all of their checks (a
    one-line ``DecodingError`` on construction). It is the ``decode`` section of an experiment
    config, so every checkpoint records it; validation, test scoring, ``evaluate``, ``caption``
    and the service decode with it. ``decode_options`` maps the command-line flags and query
    names to its fields."""

    beam_size: int = field(default=3, metadata={"min": 1})
    length_penalty: str = field(default="none", metadata={"choices": LENGTH_PENALTIES})
    alpha: float = field(default=0.0, metadata={"min": 0.0})  # the "wu" penalty's exponent
    min_length: int = field(default=0, metadata={"min": 0})  # words before <end> may come
    block_trigrams: bool = False  # no word that repeats a trigram of the caption
    n_best: int = field(default=1, metadata={"min": 1})  # hypotheses per image, at most beam_size
    # decoding steps, <end> included; None: the longest training caption's words plus <end>
    max_length: int | None = field(default=None, metadata={"min": 1, "max": MAX_LENGTH})
    attention: bool = False  # keep each word's attention weights (changes no caption)

    def __post_init__(self) -> None:
        """The decode rules of ``config_rules``, then each field's range."""
        problem = first_problem(rules_of("decode"), section_values("decode", self))
        if problem:
            raise DecodingError(problem)
        for spec in fields(self):
            problem = out_of_range(getattr(self, spec.name), spec.metadata)
            if problem:
                raise DecodingError(f"decoding settings: {spec.name} {problem}, got {getattr(self, spec.name)!r}")

    def with_max_length(self, default: int) -> DecodeSettings:
        """These settings with ``max_length`` ``default`` where it is None (checked again)."""
        return self if self.max_length is not None else replace(self, max_length=default)


def changed(settings: DecodeSettings, changes: Mapping[str, Any]) -> DecodeSettings:
    """``settings`` with ``changes`` (None values change nothing). A change to a length penalty
    other than wu sets ``alpha`` to 0 unless ``changes`` gives it too: the recorded exponent of a wu
    penalty means nothing to another. ``DecodingError`` for settings that do not fit together,
    e.g. an alpha given with another penalty, or the wu penalty left at alpha 0 (``--length-penalty
    wu`` on settings without an alpha, or ``--length-alpha 0`` on wu settings)."""
    given = {k: v for k, v in changes.items() if v is not None}
    if given.get("length_penalty", "wu") != "wu":
        given.setdefault("alpha", 0.0)
    return replace(settings, **given)


def decode(model: StepModel, features: Mapping[str, Tensor], settings: DecodeSettings) -> list[list[Hypothesis]]:
    """``beam_search`` of ``features`` {tap: (B, C, H, W)} with ``settings`` (their ``max_length``
    set) and the vocabulary's special ids (``Vocab``: the same in every vocabulary): how every
    caller decodes captions."""
    if settings.max_length is None:
        raise DecodingError("decoding settings: max_length is not set (DecodeSettings.with_max_length sets it)")
    return beam_search(
        model, features, start=Vocab.start, end=Vocab.end, suppress=Vocab.never_emitted,
        beam_size=settings.beam_size, max_length=settings.max_length, length_penalty=settings.length_penalty,
        alpha=settings.alpha, n_best=settings.n_best, min_length=settings.min_length,
        block_trigrams=settings.block_trigrams, return_attention=settings.attention,
    )


class DecoderState(Protocol):
    """The model's recurrent state for a batch of rows (batch on dim 0 of every tensor)."""

    def select(self, index: Tensor) -> "DecoderState":
        """Rows ``index`` (N,) of this state, in that order (beam reorder or repeat)."""
        ...


class StepResult(Protocol):
    """What one decoding step returns (the captioner's ``StepOutput``)."""

    @property
    def logits(self) -> Tensor:
        """(R, V) next-word logits."""
        ...

    @property
    def state(self) -> DecoderState:
        """The state after this step."""
        ...

    @property
    def attention(self) -> AttentionWeights:
        """Per attended layer (R, m_l) spatial and (R, C_l) channel weights, or None."""
        ...


class StepModel(Protocol):
    """A caption model that can be run one word at a time."""

    def start(self, features: Mapping[str, Tensor]) -> tuple[DecoderState, Any]:
        """Features {tap: (B, C, H, W)} -> the state before the first word (B rows) and the
        per-image memory every step reads."""
        ...

    def step(self, words: Tensor, state: DecoderState, memory: Any) -> StepResult:
        """Previous words (R,), state (R rows) and memory -> the next word's logits and the new state."""
        ...


@dataclass(frozen=True)
class Hypothesis:
    """One decoded caption.

    ``attention``: per attended layer α (T, m_l) and β (T, C_l), row t being the weights used
    when ``tokens[t]`` was emitted; None unless asked for. Inference-mode tensors on the
    features' device (read them, don't backpropagate).
    """

    tokens: list[int]
    log_prob: float
    score: float
    finished: bool
    attention: AttentionWeights | None = None


@dataclass(frozen=True)
class LengthPenalty:
    """Turns a finished hypothesis's log-prob into its ranking score (see the module docstring)."""

    kind: str = "none"
    alpha: float = 0.0

    def denominator(self, length: Tensor | int) -> Tensor:
        """What the log-prob is divided by at penalty length ``length`` (>= 1)."""
        length = torch.as_tensor(length, dtype=torch.float32)
        if self.kind == "average":
            return length
        if self.kind == "wu":
            return ((5.0 + length) / 6.0) ** self.alpha
        return torch.ones_like(length)

    def __call__(self, log_prob: Tensor, length: Tensor | int) -> Tensor:
        """Penalised score of hypotheses with total ``log_prob`` and penalty ``length``."""
        return log_prob / self.denominator(length).to(log_prob.device)

    def best_reachable(self, log_prob: Tensor, max_length: int) -> Tensor:
        """Upper bound on the score of any hypothesis grown from a live beam at ``log_prob`` (<= 0)."""
        return self(log_prob, max_length)


def beam_search(
    model: StepModel,
    features: Mapping[str, Tensor],
    *,
    start: int,
    end: int,
    beam_size: int,
    max_length: int,
    length_penalty: str = "none",
    alpha: float = 0.0,
    n_best: int = 1,
    suppress: Sequence[int] = (),
    min_length: int = 0,
    block_trigrams: bool = False,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Beam search for each image of ``features`` {tap: (B, C, H, W)}, all images and beams at once.

    Returns, per image, its ``n_best`` (or fewer, if fewer exist) hypotheses, best score first.
    Constraints (applied to the log-probs after the softmax, so a hypothesis's ``log_prob`` stays
    the model's): ``min_length`` words before ``<end>`` may come; ``block_trigrams``: no word that
    would repeat a trigram already in the hypothesis.
    """
    DecodeSettings(  # their checks
        beam_size=beam_size, length_penalty=length_penalty, alpha=alpha if length_penalty == "wu" else 0.0,
        min_length=min_length, n_best=n_best, max_length=max_length,
    )
    _check_tokens(start, end, suppress)
    penalty = LengthPenalty(length_penalty, alpha)
    with torch.inference_mode():
        batch = _batch_size(features)
        state, memory = model.start(features)
        device = _device(features)
        rows = torch.arange(batch, device=device)
        words = torch.full((batch,), start, dtype=torch.long, device=device)
        live: _Beams | None = None
        kept: _Beams | None = None
        for t in range(max_length):
            out = model.step(words, state, memory)
            logp = _log_probs(out.logits, suppress, start, end)
            if live is None:
                live = _Beams.first(batch, max_length, out, return_attention)
            if t < min_length:
                logp[:, end] = float("-inf")
            if block_trigrams and t >= 3:
                logp.masked_fill_(_repeated_trigrams(live.tokens.flatten(0, 1)[:, :t], logp.shape[1]), float("-inf"))
            parents, vocab = live.log_prob.shape[1], logp.shape[1]
            totals = (live.log_prob.unsqueeze(2) + logp.view(batch, parents, vocab)).view(batch, -1)
            top_logp, top_index = totals.topk(min(2 * beam_size, totals.shape[1]), dim=1)
            if top_logp.shape[1] < beam_size:  # fewer candidates than beams: pad with dead ones
                top_logp = F.pad(top_logp, (0, beam_size - top_logp.shape[1]), value=float("-inf"))
                top_index = F.pad(top_index, (0, beam_size - top_index.shape[1]), value=0)
            parent, token = top_index // vocab, top_index % vocab
            grown = live.grow(parent, token, top_logp, t, out)

            is_end = token == end
            rank = torch.arange(is_end.shape[1], device=device)
            ended = grown.finish(is_end & (rank < beam_size), t, penalty)
            kept = ended.best(n_best) if kept is None else _Beams.cat(kept, ended).best(n_best)

            # A stable sort puts the non-<end> candidates first, still in log-prob order.
            order = torch.sort(is_end.to(torch.uint8), dim=1, stable=True).indices[:, :beam_size]
            live = grown.take(order)
            live.log_prob.masked_fill_(is_end.gather(1, order), float("-inf"))
            live.log_prob.masked_fill_(_done(live, kept, n_best, penalty, max_length).unsqueeze(1), float("-inf"))
            if t == max_length - 1 or bool(torch.isneginf(live.log_prob).all()):
                break
            parent_rows = rows.unsqueeze(1) * parents + parent.gather(1, order)
            state = out.state.select(parent_rows.view(-1))
            words = token.gather(1, order).view(-1)
        assert live is not None and kept is not None
        cut = live.finish(torch.isfinite(live.log_prob), max_length, penalty, cut=True)
        kept = _Beams.cat(kept, cut).best(n_best)
        return kept.to_hypotheses()


@dataclass
class _Beams:
    """S hypotheses per image; tensors have batch dims (B, S). ``log_prob`` -inf marks a dead slot.

    ``tokens`` (B, S, L) and the attention per layer (B, S, L, m_l) / (B, S, L, C_l) hold each
    hypothesis's history, L = max_length; ``length`` counts its tokens without ``<end>``.
    """

    log_prob: Tensor
    score: Tensor
    length: Tensor
    finished: Tensor
    tokens: Tensor
    spatial: list[Tensor] | None
    channel: list[Tensor] | None

    @classmethod
    def first(cls, batch: int, max_length: int, out: StepResult, with_attention: bool) -> "_Beams":
        """One empty hypothesis per image, with room for the attention that ``out`` carries."""
        device = out.logits.device
        zeros = torch.zeros(batch, 1, device=device)

        def history(maps: Sequence[Tensor] | None) -> list[Tensor] | None:
            if not with_attention or maps is None:
                return None
            return [m.new_zeros(batch, 1, max_length, m.shape[1]) for m in maps]

        return cls(
            log_prob=zeros,
            score=zeros.clone(),
            length=torch.zeros(batch, 1, dtype=torch.long, device=device),
            finished=torch.zeros(batch, 1, dtype=torch.bool, device=device),
            tokens=torch.zeros(batch, 1, max_length, dtype=torch.long, device=device),
            spatial=history(out.attention.spatial),
            channel=history(out.attention.channel),
        )

    def take(self, index: Tensor) -> "_Beams":
        """Hypotheses ``index`` (B, S') of each image (a copy)."""
        rows = torch.arange(index.shape[0], device=index.device).unsqueeze(1)

        def pick(x: Tensor) -> Tensor:
            return x[rows, index]

        return _Beams(
            log_prob=pick(self.log_prob),
            score=pick(self.score),
            length=pick(self.length),
            finished=pick(self.finished),
            tokens=pick(self.tokens),
            spatial=None if self.spatial is None else [pick(x) for x in self.spatial],
            channel=None if self.channel is None else [pick(x) for x in self.channel],
        )

    def grow(self, parent: Tensor, token: Tensor, log_prob: Tensor, t: int, out: StepResult) -> "_Beams":
        """Extensions (B, S') of hypotheses ``parent`` by ``token`` at step ``t``, with total ``log_prob``.

        The attention written at step t is the parent row's in ``out``: (B·S, m) viewed (B, S, m).
        """
        child = self.take(parent)
        child.log_prob = log_prob
        child.score = log_prob
        child.length = torch.full_like(child.length, t + 1)
        child.tokens[:, :, t] = token
        rows = torch.arange(parent.shape[0], device=parent.device).unsqueeze(1)
        for history, maps in ((child.spatial, out.attention.spatial), (child.channel, out.attention.channel)):
            for layer, weights in zip(history or [], maps or []):
                layer[:, :, t] = weights.view(parent.shape[0], -1, weights.shape[1])[rows, parent]
        return child

    def finish(self, keep: Tensor, t: int, penalty: LengthPenalty, cut: bool = False) -> "_Beams":
        """These hypotheses as finished at step ``t`` (their ``<end>`` is token t), or ``cut`` at
        ``t == max_length``; slots outside ``keep`` (B, S) become dead."""
        log_prob = self.log_prob.masked_fill(~keep, float("-inf"))
        length = torch.full_like(self.length, t)
        return _Beams(
            log_prob=log_prob,
            score=penalty(log_prob, t if cut else t + 1),
            length=length,
            finished=torch.full_like(self.finished, not cut),
            tokens=self.tokens,
            spatial=self.spatial,
            channel=self.channel,
        )

    def best(self, n: int) -> "_Beams":
        """The ``n`` best by score, best first; ties keep their current order."""
        order = torch.sort(self.score, dim=1, descending=True, stable=True).indices
        return self.take(order[:, :n])

    @staticmethod
    def cat(a: "_Beams", b: "_Beams") -> "_Beams":
        """``a``'s hypotheses then ``b``'s, per image."""

        def join(x: list[Tensor] | None, y: list[Tensor] | None) -> list[Tensor] | None:
            return None if x is None or y is None else [torch.cat(p, dim=1) for p in zip(x, y)]

        return _Beams(
            log_prob=torch.cat((a.log_prob, b.log_prob), dim=1),
            score=torch.cat((a.score, b.score), dim=1),
            length=torch.cat((a.length, b.length), dim=1),
            finished=torch.cat((a.finished, b.finished), dim=1),
            tokens=torch.cat((a.tokens, b.tokens), dim=1),
            spatial=join(a.spatial, b.spatial),
            channel=join(a.channel, b.channel),
        )

    def to_hypotheses(self) -> list[list[Hypothesis]]:
        """Python hypotheses per image, dead slots dropped."""
        log_prob, score = self.log_prob.tolist(), self.score.tolist()
        length, finished, tokens = self.length.tolist(), self.finished.tolist(), self.tokens.tolist()
        result: list[list[Hypothesis]] = []
        for b in range(len(log_prob)):
            hyps = []
            for s in range(len(log_prob[b])):
                if score[b][s] == float("-inf"):
                    continue
                n = length[b][s]
                hyps.append(
                    Hypothesis(
                        tokens=tokens[b][s][:n],
                        log_prob=log_prob[b][s],
                        score=score[b][s],
                        finished=finished[b][s],
                        attention=_history(self.spatial, self.channel, b, s, n),
                    )
                )
            result.append(hyps)
        return result


def _done(live: _Beams, kept: _Beams, n_best: int, penalty: LengthPenalty, max_length: int) -> Tensor:
    """(B,) images whose live beams can no longer place among their ``n_best`` kept hypotheses."""
    bound = penalty.best_reachable(live.log_prob.max(dim=1).values, max_length)
    return bound <= kept.score[:, n_best - 1]


def _repeated_trigrams(tokens: Tensor, vocab: int) -> Tensor:
    """(R, V) True for each word x that would make (h_{t-2}, h_{t-1}, x) a trigram already in the
    row's tokens h_0..h_{t-1} (R, t), t >= 3."""
    t = tokens.shape[1]
    match = (tokens[:, : t - 2] == tokens[:, t - 2 : t - 1]) & (tokens[:, 1 : t - 1] == tokens[:, t - 1 :])
    blocked = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.bool, device=tokens.device)
    blocked.scatter_(1, tokens[:, 2:].masked_fill(~match, vocab), True)  # column V: no match
    return blocked[:, :vocab]


def _log_probs(logits: Tensor, suppress: Sequence[int], start: int, end: int) -> Tensor:
    """(R, V) logits -> log-softmax with the ``suppress`` ids at -inf."""
    vocab = logits.shape[1]
    bad = [i for i in (start, end, *suppress) if not 0 <= i < vocab]
    if bad:
        raise DecodingError(f"token ids {bad} are outside the model's vocabulary of {vocab}")
    logits = logits.float()
    if suppress:
        index = torch.as_tensor(list(suppress), dtype=torch.long, device=logits.device)
        logits = logits.index_fill(1, index, float("-inf"))
    return F.log_softmax(logits, dim=1)


def _check_tokens(start: int, end: int, suppress: Sequence[int]) -> None:
    """The special ids must make sense."""
    if end in suppress:
        raise DecodingError(f"the <end> id {end} cannot be suppressed")
    if start == end:
        raise DecodingError(f"<start> and <end> must differ; both are {start}")


def _batch_size(features: Mapping[str, Tensor]) -> int:
    """B of features {tap: (B, C, H, W)}, the same for every tap."""
    if not features:
        raise DecodingError("features is empty; expected {tap: (B, C, H, W)}")
    sizes = {name: x.shape[0] for name, x in features.items()}
    if len(set(sizes.values())) != 1:
        raise DecodingError(f"feature taps disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def _device(features: Mapping[str, Tensor]) -> torch.device:
    """Where the features (and so the search's tensors) live."""
    return next(iter(features.values())).device


def _history(spatial: list[Tensor] | None, channel: list[Tensor] | None, b: int, s: int, length: int) -> AttentionWeights | None:
    """The attention of hypothesis (b, s) over its first ``length`` steps, or None if not kept."""
    if spatial is None and channel is None:
        return None

    def rows(maps: list[Tensor] | None) -> tuple[Tensor, ...] | None:
        return None if maps is None else tuple(layer[b, s, :length] for layer in maps)

    return AttentionWeights(rows(spatial), rows(channel))
