"""Self-critical sequence training (Rennie et al., CVPR 2017): the captioner's own samples, scored
with CIDEr-D against the image's references, push up the log-probability of the samples that beat
a baseline and push down the others:

    ∇L = −Σ_r (R(w^r) − b_r) Σ_t ∇ log p(w^r_t | w^r_<t, I)      t up to and including <end>

K captions are sampled per image (multinomial at temperature 1, through the decoding step, the
never-emitted ids suppressed as in beam search). Baselines b: ``"greedy"``, the reward of the
image's greedy caption (Rennie et al.; beam search of width 1 in eval mode); ``"mean"``, the mean
reward of the image's K − 1 other samples (Luo, "A better variant of self-critical sequence
training", 2020: no greedy pass).

Where the log-probabilities come from (``log_probs``): ``"teacher"`` computes them again by
teacher forcing the samples through the model's forward (so DDP sees one forward and one backward
per step, as in cross-entropy training), the never-emitted ids suppressed as when sampling; with
dropout on, that pass draws its own dropout masks, so ``dropout_rate(model, 0)`` around both
passes makes them one distribution (``train.scst_dropout``). ``"sample"`` keeps the sampling
pass's own log-probabilities, with gradient (ruotianluo's self-critical.pytorch does): the loss
is then taken under the very masks the samples were drawn with, so dropout can stay on.

A cross-entropy term can be mixed in (``train.scst_xe_weight`` λ, Paulus et al. 2018's mixed
objective): L = L_policy / (sampled tokens) + λ · (−Σ log p(reference words)) / (reference tokens),
over the image's reference captions teacher forced in the same forward as the samples.

The policy's entropy (``entropy_sum``) is logged per step: falling entropy with a flat reward is
sharpening, not learning.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption.data.caption_dataset import ImageSamples
from sca_caption.data.vocab import Vocab
from sca_caption.decoding import DecodeSettings, decode
from sca_caption.models.captioner import CaptionerOutput, SCACaptioner
from sca_caption.models.sca import AttentionWeights
from sca_caption.rewards import CiderD

BASELINES = ("greedy", "mean")
LOG_PROBS = ("teacher", "sample")


@dataclass(frozen=True)
class Rollout:
    """K samples of each of N images and their rewards.

    ``captions`` (N·K, T + 1): ``<start>``, the sampled words, ``<end>`` (unless cut at the
    maximum length), then ``<pad>``; ``reward`` and ``baseline`` (N·K,); ``log_probs``
    (N·K, T, V): the sampling pass's log p(· | w_<t, I) with gradient, float32 or wider, the
    never-emitted ids at −inf, where sampled with gradient (else None).
    """

    captions: Tensor
    reward: Tensor
    baseline: Tensor
    log_probs: Tensor | None

    @property
    def tokens(self) -> int:
        """Sampled tokens the loss counts (words and ``<end>``)."""
        return int((self.captions[:, 1:] != Vocab.pad).sum())


@contextmanager
def dropout_rate(model: nn.Module, p: float | None) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` at rate ``p`` inside the block (``None``: unchanged)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)] if p is not None else []
    saved = [m.p for m in layers]
    for m in layers:
        m.p = p
    try:
        yield
    finally:
        for m, rate in zip(layers, saved):
            m.p = rate


def sample_captions(
    model: SCACaptioner, features: Mapping[str, Tensor], samples: int, max_length: int, vocab: Vocab
) -> tuple[Tensor, Tensor | None]:
    """K = ``samples`` captions of each image of ``features`` {tap: (N, C, H, W)}, image after
    image: (N·K, L) word ids, ``<pad>`` after each ``<end>``, L <= ``max_length``; and, under grad
    mode, the distributions they were drawn from with gradient, log p (N·K, L, V) float32 or wider
    (never-emitted ids at −inf; None without grad mode). Uses the global torch RNG (the trainer
    reseeds it every step) and the model's current mode."""
    keep = torch.is_grad_enabled()
    state, memory = model.start(features)
    rows = state.h.shape[0] * samples
    state = state.select(torch.arange(state.h.shape[0], device=state.h.device).repeat_interleave(samples))
    words = torch.full((rows,), vocab.start, dtype=torch.long, device=state.h.device)
    alive = torch.ones(rows, dtype=torch.bool, device=words.device)
    sampled, log_probs = [], []
    for _ in range(max_length):
        out = model.step(words, state, memory)
        logits = suppressed(out.logits.to(torch.promote_types(out.logits.dtype, torch.float32)), vocab)
        words = torch.multinomial(torch.softmax(logits.detach(), dim=1), 1).squeeze(1)
        sampled.append(words.masked_fill(~alive, vocab.pad))
        if keep:
            log_probs.append(F.log_softmax(logits, dim=1))
        alive &= words != vocab.end
        if not bool(alive.any()):
            break
        state = out.state
    return torch.stack(sampled, dim=1), torch.stack(log_probs, dim=1) if keep else None


def suppressed(logits: Tensor, vocab: Vocab) -> Tensor:
    """Logits (..., V) with the ids decoding never emits at −inf."""
    index = torch.tensor(vocab.never_emitted, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def greedy_tokens(model: SCACaptioner, features: Mapping[str, Tensor], max_length: int, vocab: Vocab) -> Tensor:
    """The greedy caption of each image, (N, L) word ids padded with ``<pad>``, in eval mode."""
    training = model.training
    model.eval()
    hypotheses = decode(model, features, DecodeSettings(beam_size=1, max_length=max_length))
    model.train(training)
    device = next(iter(features.values())).device
    tokens = torch.full((len(hypotheses), max_length), vocab.pad, dtype=torch.long, device=device)
    for i, (best,) in enumerate(hypotheses):
        tokens[i, : len(best.tokens)] = torch.tensor(best.tokens, dtype=torch.long)
    return tokens


def greedy_reward(
    model: SCACaptioner, samples: ImageSamples, count: int, batch_size: int, reward: CiderD, max_length: int,
    vocab: Vocab, device: torch.device, bf16: bool,
) -> float:
    """The mean reward of the greedy captions of the first ``count`` images of ``samples``, in
    batches of ``batch_size`` (eval mode, under bfloat16 autocast where ``bf16``)."""
    images = list(range(min(count, len(samples))))
    total = 0.0
    for first in range(0, len(images), batch_size):
        batch = samples[images[first : first + batch_size]].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = greedy_tokens(model, batch.features, max_length, vocab)
        total += float(reward.score(tokens, batch.images).sum())
    return total / max(len(images), 1)


def rollout(
    model: SCACaptioner,
    features: Mapping[str, Tensor],
    images: Tensor,
    *,
    reward: CiderD,
    samples: int,
    baseline: str,
    max_length: int,
    vocab: Vocab,
    grad: bool = False,
) -> Rollout:
    """Sample (with gradient where ``grad``), score and take the baseline for N images;
    ``images`` (N,): each image's index in the reward's references."""
    with torch.set_grad_enabled(grad):
        tokens, log_probs = sample_captions(model, features, samples, max_length, vocab)
    rows = images.repeat_interleave(samples)
    rewards = reward.score(tokens, rows)
    if baseline == "greedy":
        base = reward.score(greedy_tokens(model, features, max_length, vocab), images).repeat_interleave(samples)
    else:  # the mean of the image's other samples
        per_image = rewards.view(-1, samples)
        base = ((per_image.sum(dim=1, keepdim=True) - per_image) / (samples - 1)).flatten()
    start = torch.full((len(tokens), 1), vocab.start, dtype=torch.long, device=tokens.device)
    return Rollout(torch.cat([start, tokens], dim=1), rewards.to(tokens.device), base.to(tokens.device), log_probs)


def teacher_forced_log_probs(
    forward_module: nn.Module, features: Mapping[str, Tensor], captions: Tensor, samples: int, vocab: Vocab,
    references: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log p(· | w_<t, I) (R, T, V), float32 (or wider), the never-emitted ids at −inf, of each
    caption of ``captions`` (R, T + 1) teacher forced. ``forward_module``: the captioner, or its DDP
    wrapper; ``features`` {tap: (R / samples, C, H, W)} per image, repeated here per sample.

    ``references`` (R / samples, M, T'): each image's reference captions, teacher forced in the
    same forward (one forward for DDP); their summed word cross-entropy is returned second (None
    without references)."""
    rows = torch.arange(len(captions), device=captions.device) // samples
    forced = captions
    if references is not None:
        reference_rows, targets = present_references(references)
        rows = torch.cat([rows, reference_rows])
        width = max(captions.shape[1], targets.shape[1])
        forced = torch.cat([F.pad(c, (0, width - c.shape[1]), value=Vocab.pad) for c in (captions, targets)])
    output = forward_module({tap: x.index_select(0, rows) for tap, x in features.items()}, forced)
    logits = output.logits[: len(captions), : captions.shape[1] - 1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 under autocast -> float32
    log_probs = F.log_softmax(suppressed(logits, vocab), dim=-1)
    if references is None:
        return log_probs, None
    return log_probs, reference_words(forward_module, output.logits[len(captions) :], forced[len(captions) :])


def reference_cross_entropy(forward_module: nn.Module, features: Mapping[str, Tensor], references: Tensor) -> Tensor:
    """The summed word cross-entropy of ``references`` (N, M, T) teacher forced on ``features``
    {tap: (N, C, H, W)} (``teacher_forced_log_probs``'s second result, without samples)."""
    rows, targets = present_references(references)
    output = forward_module({tap: x.index_select(0, rows) for tap, x in features.items()}, targets)
    return reference_words(forward_module, output.logits, targets)


def present_references(references: Tensor) -> tuple[Tensor, Tensor]:
    """The reference captions of ``references`` (N, M, T), all-``<pad>`` rows (an image with
    fewer than M) left out: each one's image (R,) and the captions (R, T)."""
    present = references[:, :, 0] != Vocab.pad
    return present.nonzero()[:, 0], references[present]


def reference_words(forward_module: nn.Module, logits: Tensor, captions: Tensor) -> Tensor:
    """Σ −log p(target) over the non-pad words of ``captions`` (R, T) from teacher-forced
    ``logits`` (R, T', V), T' >= T − 1: the words term of ``SCACaptioner.loss`` on unsuppressed
    logits, as in cross-entropy training, without its label smoothing and per-image terms."""
    model = getattr(forward_module, "module", forward_module)  # the captioner inside a DDP wrapper
    output = CaptionerOutput(logits[:, : captions.shape[1] - 1], AttentionWeights(None, None), None)
    return model.loss(output, captions, Vocab.pad).words


def policy_loss(log_probs: Tensor, run: Rollout, vocab: Vocab) -> Tensor:
    """Σ_r −(R_r − b_r) Σ_t log p(w_rt) over the counted tokens (a sum: divide by the token count);
    ``log_probs`` (N·K, T, V) of ``run``'s captions (``teacher_forced_log_probs``, or the sampling
    pass's ``run.log_probs``)."""
    targets = run.captions[:, 1:]
    counted = targets != vocab.pad  # log p is -inf at <pad>: gather a real id there
    picked = log_probs.gather(2, targets.masked_fill(~counted, vocab.end).unsqueeze(2)).squeeze(2) * counted
    advantage = (run.reward - run.baseline).to(picked.dtype)
    return -(advantage.unsqueeze(1) * picked).sum()


def entropy_sum(log_probs: Tensor, run: Rollout, vocab: Vocab) -> Tensor:
    """Σ over ``run``'s counted tokens of the entropy −Σ_v p_v log p_v of the distribution each was
    drawn from (a detached sum: divide by ``run.tokens``); ``log_probs`` as in ``policy_loss``."""
    counted = run.captions[:, 1:] != vocab.pad
    with torch.no_grad():
        return (torch.special.entr(log_probs.exp()).sum(-1) * counted).sum()
