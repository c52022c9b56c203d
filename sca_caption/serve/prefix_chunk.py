"""The backbone prefix's chunk size for the service: on some CPUs the EfficientNet prefix gets
slower per image in larger batches while beam search gets cheaper, so a batch's prefix runs in
chunks of the size that is fastest per image here, measured once at start-up."""

from __future__ import annotations

import time

import torch

from sca_caption.captioning import ImageCaptioner

PASSES = 2


def fastest_prefix_chunk(captioner: ImageCaptioner, max_batch: int) -> int:
    """The chunk size of 1, 2, 4, ... up to ``max_batch`` with the least prefix time per image
    (the best of ``PASSES`` timed passes over ``max_batch`` random images, after one warm-up)."""
    size = captioner.input_size
    images = torch.rand(max_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    candidates = sorted({min(2**k, max_batch) for k in range(max_batch.bit_length() + 1)})
    seconds = {}
    for chunk in candidates:
        captioner.prefix_chunk = chunk
        captioner.features(images[:chunk])
        times = []
        for _ in range(PASSES):
            start = time.perf_counter()
            captioner.features(images)
            times.append(time.perf_counter() - start)
        seconds[chunk] = min(times)
    return min(seconds, key=seconds.__getitem__)
