"""Self-critical sequence training (Rennie et al., CVPR 2017): the captioner's own samples, scored
with CIDEr-D against the image's references, push up the log-probability of the samples that beat
a baseline and push down the others:

    ∇L = −Σ_r (R(w^r) − b_r) Σ_t ∇ log p(w^r_t | w^r_<t, I)      t up to and including <end>

K captions are sampled per image (multinomial at temperature 1, through the decoding step, the
never-emitted ids suppressed as in beam search). Baselines b: ``"greedy"``, the reward of the
image's greedy caption (Rennie et al.; beam search of width 1 in eval mode); ``"mean"``, the mean
reward of the image's K − 1 other samples (Luo, "A better variant of self-critical sequence
training", 2020: no greedy pass).

The policy's entropy (``entropy_sum``) is logged per step: falling entropy with a flat reward is
sharpening, not learning. The log-probabilities are computed again by teacher forcing the samples through the model's
forward (so DDP sees one forward and one backward per step, as in cross-entropy training), with
the never-emitted ids suppressed as when sampling. With dropout on, that pass draws its own
dropout masks: the sample comes from the same model, under other masks. ``dropout_rate(model, 0)``
around both passes makes them one distribution (``train.scst_dropout``).
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
from sca_caption.models.captioner import SCACaptioner
from sca_caption.rewards import CiderD

BASELINES = ("greedy", "mean")


@dataclass(frozen=True)
class Rollout:
    """K samples of each of N images and their rewards.

    ``captions`` (N·K, T + 1): ``<start>``, the sampled words, ``<end>`` (unless cut at the
    maximum length), then ``<pad>``; ``reward`` and ``baseline`` (N·K,).
    """

    captions: Tensor
    reward: Tensor
    baseline: Tensor

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
) -> Tensor:
    """K = ``samples`` captions of each image of ``features`` {tap: (N, C, H, W)}, image after
    image: (N·K, L) word ids, ``<pad>`` after each ``<end>``, L <= ``max_length``. Uses the global
    torch RNG (the trainer reseeds it every step) and the model's current mode."""
    with torch.no_grad():
        state, memory = model.start(features)
        rows = state.h.shape[0] * samples
        state = state.select(torch.arange(state.h.shape[0], device=state.h.device).repeat_interleave(samples))
        words = torch.full((rows,), vocab.start, dtype=torch.long, device=state.h.device)
        alive = torch.ones(rows, dtype=torch.bool, device=words.device)
        sampled = []
        for _ in range(max_length):
            out = model.step(words, state, memory)
            probs = torch.softmax(suppressed(out.logits.float(), vocab), dim=1)
            words = torch.multinomial(probs, 1).squeeze(1)
            sampled.append(words.masked_fill(~alive, vocab.pad))
            alive &= words != vocab.end
            if not bool(alive.any()):
                break
            state = out.state
        return torch.stack(sampled, dim=1)


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
) -> Rollout:
    """Sample, score and take the baseline for N images; ``images`` (N,): each image's index in
    the reward's references."""
    tokens = sample_captions(model, features, samples, max_length, vocab)
    rows = images.repeat_interleave(samples)
    rewards = reward.score(tokens, rows)
    if baseline == "greedy":
        base = reward.score(greedy_tokens(model, features, max_length, vocab), images).repeat_interleave(samples)
    else:  # the mean of the image's other samples
        per_image = rewards.view(-1, samples)
        base = ((per_image.sum(dim=1, keepdim=True) - per_image) / (samples - 1)).flatten()
    start = torch.full((len(tokens), 1), vocab.start, dtype=torch.long, device=tokens.device)
    return Rollout(torch.cat([start, tokens], dim=1), rewards.to(tokens.device), base.to(tokens.device))


def teacher_forced_log_probs(
    forward_module: nn.Module, features: Mapping[str, Tensor], captions: Tensor, samples: int, vocab: Vocab
) -> Tensor:
    """log p(· | w_<t, I) (R, T, V), float32 (or wider), the never-emitted ids at −inf, of each
    caption of ``captions`` (R, T + 1) teacher forced. ``forward_module``: the captioner, or its DDP
    wrapper; ``features`` {tap: (R / samples, C, H, W)} per image, repeated here per sample."""
    repeated = {tap: x.repeat_interleave(samples, dim=0) for tap, x in features.items()}
    logits = forward_module(repeated, captions).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bfloat16 under autocast -> float32
    return F.log_softmax(suppressed(logits, vocab), dim=-1)


def policy_loss(log_probs: Tensor, run: Rollout, vocab: Vocab) -> Tensor:
    """Σ_r −(R_r − b_r) Σ_t log p(w_rt) over the counted tokens (a sum: divide by the token count);
    ``log_probs`` (N·K, T, V) of ``run``'s captions (``teacher_forced_log_probs``)."""
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
