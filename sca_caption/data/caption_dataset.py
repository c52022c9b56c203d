"""Training samples: one caption of one image with that image's cached features.

A split of N images with five captions each gives 5N samples. The trainer visits them in an
order that is a pure function of (seed, epoch) and puts captions of similar length together,
cut into global batches of ``batch_size`` samples. Under DDP each process takes every
``world``-th sample of a global batch, so the same global batches are trained on whatever the
number of processes. A checkpoint stores the epoch's order and how many of its samples were
trained on, so a resumed run sees exactly the batches the interrupted one would have seen.

``CaptionSamples[indices]`` returns a whole batch at once (used with ``DataLoader(samples,
sampler=batches, batch_size=None)``), so the feature cache reads each image once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sca_caption.data.corpus import ImageRecord
from sca_caption.data.features import FeatureCache
from sca_caption.data.vocab import Vocab

BUCKET_BATCHES = 32  # batches sorted by caption length together (see ``epoch_order``)


@dataclass
class CaptionBatch:
    """A batch of B samples.

    ``features``: {tap: (B, C, H, W)} float32; ``captions``: (B, T) token ids, ``<start>`` first,
    ``<end>`` then ``<pad>`` after the words; ``tags``: (B, K) multi-label targets or None.
    """

    features: dict[str, Tensor]
    captions: Tensor
    tags: Tensor | None

    def to(self, device: torch.device) -> CaptionBatch:
        """The batch on ``device``."""
        return CaptionBatch(
            {tap: x.to(device, non_blocking=True) for tap, x in self.features.items()},
            self.captions.to(device, non_blocking=True),
            None if self.tags is None else self.tags.to(device, non_blocking=True),
        )


class CaptionSamples(Dataset):
    """Every (image, caption) pair of ``records`` whose image is in ``cache``.

    ``max_length`` words are kept per caption (longer ones are cut, ``<end>`` still added);
    ``tags`` (len(records), K): per-record tag targets, or None without a tag head.
    Images missing from the cache (skipped at extraction) are left out; ``missing`` lists them.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        vocab: Vocab,
        cache: FeatureCache,
        max_length: int,
        tags: Tensor | None = None,
    ) -> None:
        self.cache = cache
        self.pad = vocab.pad
        cached = set(cache.image_ids)
        present = [(n, r) for n, r in enumerate(records) if r.image_id in cached]
        self.missing = [r.image_id for r in records if r.image_id not in cached]
        encoded: list[list[int]] = []
        rows: list[int] = []
        record_of_sample: list[int] = []
        for n, record in present:
            row = cache.index_of(record.image_id)
            for tokens in record.tokens:
                encoded.append(vocab.encode(tokens, max_length))
                rows.append(row)
                record_of_sample.append(n)
        self.captions = padded(encoded, vocab.pad)
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.targets = (self.captions[:, 1:] != vocab.pad).sum(dim=1)  # (N,) words + <end> to predict
        self.tags = None if tags is None else tags[torch.tensor(record_of_sample, dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, indices: Sequence[int]) -> CaptionBatch:
        """The samples ``indices`` as one batch, cut to its longest caption."""
        index = torch.as_tensor(indices, dtype=torch.long)
        captions = self.captions[index]
        width = int((captions != self.pad).sum(dim=1).max()) if len(index) else 2  # drop all-pad columns
        features = self.cache.read_batch(self.rows[index].tolist())
        tags = None if self.tags is None else self.tags[index]
        return CaptionBatch(features, captions[:, :width], tags)

    def target_count(self, indices: Sequence[int]) -> int:
        """Tokens to predict (words and ``<end>``, no padding) over the samples ``indices``."""
        return int(self.targets[torch.as_tensor(indices, dtype=torch.long)].sum())


@dataclass
class ImageBatch:
    """B images: ``features`` {tap: (B, C, H, W)} float32, ``images`` (B,), each image's position
    in the split's records (the index of its references), and ``references`` (B, M, T): its
    reference captions as ``CaptionBatch.captions``, all-``<pad>`` rows where it has fewer than M."""

    features: dict[str, Tensor]
    images: Tensor
    references: Tensor

    def to(self, device: torch.device) -> ImageBatch:
        """The batch on ``device``."""
        features = {tap: x.to(device, non_blocking=True) for tap, x in self.features.items()}
        return ImageBatch(features, self.images.to(device), self.references.to(device, non_blocking=True))


class ImageSamples(Dataset):
    """Every image of ``records`` that is in ``cache``, once, with its reference captions
    (``max_length`` words kept, as in ``CaptionSamples``): self-critical training's samples."""

    def __init__(self, records: Sequence[ImageRecord], vocab: Vocab, cache: FeatureCache, max_length: int) -> None:
        self.cache = cache
        self.pad = vocab.pad
        cached = set(cache.image_ids)
        present = [(n, r) for n, r in enumerate(records) if r.image_id in cached]
        self.images = torch.tensor([n for n, _ in present], dtype=torch.long)
        self.rows = [cache.index_of(r.image_id) for _, r in present]
        self.references = [padded([vocab.encode(t, max_length) for t in r.tokens], vocab.pad) for _, r in present]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: Sequence[int]) -> ImageBatch:
        """The images ``indices`` as one batch."""
        references = [self.references[i] for i in indices]
        count = max((len(r) for r in references), default=0)
        width = max((r.shape[1] for r in references), default=2)
        table = torch.full((len(references), count, width), self.pad, dtype=torch.long)
        for i, r in enumerate(references):
            table[i, : len(r), : r.shape[1]] = r
        return ImageBatch(self.cache.read_batch([self.rows[i] for i in indices]), self.images[list(indices)], table)


def padded(encoded: Sequence[Sequence[int]], pad: int) -> Tensor:
    """Token id lists as one (N, longest) int64 tensor, ``pad`` after each."""
    table = torch.full((len(encoded), max((len(ids) for ids in encoded), default=2)), pad, dtype=torch.long)
    for i, ids in enumerate(encoded):
        table[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return table


def image_order(count: int, seed: int, epoch: int) -> Tensor:
    """The order of ``count`` images in ``epoch``: a permutation (N,) int64 of (seed, epoch) alone."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(count).astype(np.int64))


def epoch_order(lengths: Tensor, seed: int, epoch: int, batch_size: int) -> Tensor:
    """The order of the samples in ``epoch``: a permutation (N,) int64 that depends only on
    (seed, epoch) and the samples' caption ``lengths`` (N,).

    Samples of similar length share a batch, so little of a batch is padding: the shuffled
    samples are taken ``BUCKET_BATCHES`` batches at a time, sorted by length within that window
    and cut into batches of ``batch_size``; the full batches are then shuffled, and the one
    smaller batch, if any, goes last (so consecutive runs of ``batch_size`` are the batches).
    """
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(lengths))
    window = batch_size * BUCKET_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, len(shuffled), window):
        part = shuffled[start : start + window]
        part = part[np.argsort(lengths.numpy()[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) < batch_size]
    ordered = [full[i] for i in rng.permutation(len(full))] + rest
    return torch.from_numpy(np.concatenate(ordered).astype(np.int64)) if ordered else torch.zeros(0, dtype=torch.long)


def global_batches(order: Tensor, position: int, batch_size: int, world: int = 1) -> list[list[int]]:
    """``order[position:]`` cut into global batches of ``batch_size`` samples.

    A last batch with fewer samples than processes (``world``) is dropped, so every process has
    at least one sample in every step; with one process nothing is ever dropped.
    """
    rest = order[position:].tolist()
    batches = [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return [b for b in batches if len(b) >= world]


def shard(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch: every ``world``-th sample from ``rank``."""
    return list(batch[rank::world])
