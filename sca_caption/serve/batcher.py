"""Micro-batching: the images of concurrent requests gathered into one beam-search batch.

Requests put their images on an asyncio queue. A gathering task on the event loop takes the
first waiting image, then more until it holds ``max_batch`` or ``max_wait_ms`` have passed, and
hands the batch to the one worker thread, which runs the ``ImageCaptioner`` (backbone prefix and
beam search) while the loop goes on accepting requests; images that arrive meanwhile wait on the
queue and form the next batch at once. Images with other decoding settings than the rest of their
batch are decoded as a beam-search batch of their own, so each image gets the settings it asked
for; each request's future is answered with its own images' captions.

Stopping (``stop``, at the start of the server's shutdown) answers every image not yet
captioned at once with ``ShuttingDown`` (a 503), whatever ``max_wait_ms`` is, so that the server's
wait for its open requests ends within the batch being decoded.

An image's captions do not depend on the other images of its batch: the prefix computes each
image alone, and beam search keeps every image's beams apart. On the CPU they are identical to
those of the same image decoded in any batch of the same size; another batch size can round the
decoder's float32 matrix products differently in the last bits (as for the caption CLI).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sca_caption.captioning import Caption, DecodeSettings, ImageCaptioner
from sca_caption.errors import SCACaptionError


class ShuttingDown(SCACaptionError):
    """The server is stopping: an image that was not captioned before it began to (HTTP 503)."""


@dataclass(frozen=True)
class Decoded:
    """An image's captions, best first, and how it was batched (``Timing`` of the API)."""

    captions: list[Caption]
    queue_ms: float
    batch_ms: float
    batch_size: int


@dataclass(frozen=True)
class _Job:
    image: Tensor
    settings: DecodeSettings
    future: asyncio.Future[Decoded]
    queued: float


class MicroBatcher:
    """Gathers images into batches of up to ``max_batch``, waiting at most ``max_wait_ms`` for
    more, and decodes each batch on one worker thread. ``start`` and ``close`` run on the loop."""

    def __init__(self, captioner: ImageCaptioner, *, max_batch: int, max_wait_ms: float) -> None:
        if max_batch < 1 or not (math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms finite and >= 0; got {max_batch} and {max_wait_ms}")
        self.captioner = captioner
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._worker: ThreadPoolExecutor | None = None
        self._gathering: asyncio.Task[None] | None = None
        self._forming: list[_Job] = []
        self._decoding: list[_Job] = []

    @property
    def queued(self) -> int:
        """Images waiting for a batch: on the queue, or in the batch being formed."""
        return self._queue.qsize() + len(self._forming)

    def start(self) -> None:
        """Start gathering on the running loop (a new queue: an asyncio queue belongs to one loop)."""
        self._queue = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-worker")
        self._gathering = asyncio.get_running_loop().create_task(self._gather())

    async def stop(self) -> None:
        """Stop gathering and answer every image not yet captioned with ``ShuttingDown``; the
        batch being decoded finishes on the worker thread, its answers dropped."""
        if self._gathering is not None:
            self._gathering.cancel()
            await asyncio.gather(self._gathering, return_exceptions=True)
        unanswered = self._forming + self._decoding + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        self._forming, self._decoding = [], []
        for job in unanswered:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down; send the request again later"))

    async def close(self) -> None:
        """``stop``, then wait for the worker thread to finish its batch."""
        await self.stop()
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def caption(self, images: Sequence[Tensor], settings: DecodeSettings) -> list[Decoded]:
        """The captions of ``images`` (each (3, S, S) in [0, 1]), in order, once decoded."""
        if self._gathering is None or self._gathering.done():
            raise ShuttingDown("the server is shutting down; send the request again later")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self._queue.put_nowait(_Job(image, settings, future, time.perf_counter()))
        return list(await asyncio.gather(*futures))

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._next_batch()
            jobs = [job for job in self._forming if not job.future.done()]  # done: its request is gone
            self._forming = []
            if not jobs:
                continue
            self._decoding = jobs
            results = await loop.run_in_executor(self._worker, self._decode, jobs)
            self._decoding = []
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Decoded):
                    job.future.set_result(result)
                else:
                    job.future.set_exception(result)

    async def _next_batch(self) -> None:
        """Form the next batch in ``_forming``: the first waiting image and those that join it
        within ``max_wait`` (``max_batch`` at most)."""
        jobs = self._forming
        jobs.append(await self._queue.get())
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:  # a cancelled get leaves its image on the queue
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break

    def _decode(self, jobs: list[_Job]) -> list[Decoded | Exception]:
        """On the worker thread: each group of jobs with equal settings as one beam-search batch."""
        results: dict[int, Decoded | Exception] = {}
        groups: dict[DecodeSettings, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings, []).append(i)
        for settings, rows in groups.items():
            start = time.perf_counter()
            try:
                features = self.captioner.features(torch.stack([jobs[i].image for i in rows]))
                captions = self.captioner.caption_features(features, settings)
            except Exception as err:  # e.g. out of memory: that group's requests fail, the server goes on
                for i in rows:
                    results[i] = err
                continue
            batch_ms = (time.perf_counter() - start) * 1000
            for i, per_image in zip(rows, captions):
                results[i] = Decoded(per_image, (start - jobs[i].queued) * 1000, batch_ms, len(rows))
        return [results[i] for i in range(len(jobs))]
