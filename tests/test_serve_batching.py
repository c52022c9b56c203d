"""Micro-batching in the captioning service, driven concurrently through httpx on the app object:
concurrent requests are decoded as one beam-search batch, each answered with its own captions,
which do not depend on the batch's other images; a decode in progress never stops the server
from accepting and answering other requests; a failed decode fails only its own requests.

Exactness: on the CPU an image's captions equal the library's for the same batch, bit for bit.
With other companions (or alone) the tokens are the same but the decoder's float32 products over
the batch's rows may round differently in the last bits, so scores are compared to 1e-5."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any, Awaitable, Callable

import httpx
import pytest
import torch
from fastapi import FastAPI
from PIL import Image

from caption_support import save_tiny_checkpoint
from serve_support import as_answer, library_captions, photo_bytes
from sca_caption.captioning import DecodeSettings, ImageCaptioner
from sca_caption.serve.app import ServiceLimits, create_app
from sca_caption.serve.model_card import ModelCard

LONG_WAIT_MS = 30_000  # a batch waits for all the images a test sends
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


class GatedCaptioner(ImageCaptioner):
    """The same model, but every beam search waits until ``gate`` is set; ``entered`` tells that one waits."""

    def __init__(self, base: ImageCaptioner) -> None:
        super().__init__(base.model, base.prefix, base.vocab, max_length=base.max_length)
        self.entered, self.gate = threading.Event(), threading.Event()

    def caption_features(self, features, settings):
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("the test never opened the gate")
        return super().caption_features(features, settings)


class FailingOnceCaptioner(ImageCaptioner):
    """The same model, whose first beam search fails as an out-of-memory error would."""

    def __init__(self, base: ImageCaptioner) -> None:
        super().__init__(base.model, base.prefix, base.vocab, max_length=base.max_length)
        self.failed = False

    def caption_features(self, features, settings):
        if not self.failed:
            self.failed = True
            raise RuntimeError("out of memory\nmore detail")
        return super().caption_features(features, settings)


def serve(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``scenario`` against ``app`` (its lifespan started) within a minute."""

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
                return await scenario(client)

    return asyncio.run(asyncio.wait_for(main(), 60))


def app_for(captioner: ImageCaptioner, **limits: Any) -> FastAPI:
    return create_app(captioner, card=ModelCard("tiny.pt"), limits=ServiceLimits(**limits))


def post(client: httpx.AsyncClient, photo: bytes, query: str = "?beam=3&n_best=2") -> Awaitable[httpx.Response]:
    return client.post(f"/v1/captions{query}", content=photo, headers={"content-type": "image/png"})


async def queued(client: httpx.AsyncClient, n: int) -> None:
    """Wait until ``n`` images wait for a batch."""
    while (await client.get("/healthz")).json()["queued"] != n:
        await asyncio.sleep(0.01)


async def in_order(client: httpx.AsyncClient, photos: list[bytes], query: str | list[str] = "?beam=3&n_best=2") -> list[dict]:
    """One request per photo, each queued before the next is sent (so the batch keeps this order)."""
    queries = [query] * len(photos) if isinstance(query, str) else query
    tasks = []
    for i, (photo, q) in enumerate(zip(photos, queries)):
        tasks.append(asyncio.create_task(post(client, photo, q)))
        if i < len(photos) - 1:
            await queued(client, i + 1)
    answers = await asyncio.gather(*tasks)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json()["results"][0] for a in answers]


def close(a: list[dict], b: list[dict]) -> bool:
    return [c["caption"] for c in a] == [c["caption"] for c in b] and all(
        abs(x["score"] - y["score"]) <= SCORE_TOLERANCE and abs(x["log_prob"] - y["log_prob"]) <= SCORE_TOLERANCE
        for x, y in zip(a, b)
    )


def test_concurrent_requests_are_one_batch_each_answered_with_its_own_captions(captioner):
    photos = [photo_bytes(i) for i in range(3)]
    results = serve(app_for(captioner, max_batch=3, max_wait_ms=LONG_WAIT_MS), lambda c: in_order(c, photos))
    assert [r["timing"]["batch_size"] for r in results] == [3, 3, 3]
    want = library_captions(captioner, photos, DecodeSettings(beam_size=3, n_best=2))
    assert [r["n_best"] for r in results] == [as_answer(c) for c in want]  # bit for bit: the same batch


def test_gathering_stops_at_max_batch_and_all_at_once_requests_share_a_batch(captioner):
    photos = [photo_bytes(i) for i in range(5)]

    async def scenario(client: httpx.AsyncClient) -> list[dict]:
        answers = await asyncio.gather(*(post(client, p) for p in photos))
        return [a.json()["results"][0] for a in answers]

    results = serve(app_for(captioner, max_batch=4, max_wait_ms=2_000), scenario)
    assert sorted(r["timing"]["batch_size"] for r in results) == [1, 4, 4, 4, 4]


def test_a_result_does_not_depend_on_the_other_images_of_its_batch(captioner):
    photos = [photo_bytes(i) for i in range(5)]

    async def scenario(client: httpx.AsyncClient) -> tuple[list[dict], list[dict]]:
        return await in_order(client, [photos[0], photos[1], photos[2]]), await in_order(client, [photos[3], photos[4], photos[0]])

    first, second = serve(app_for(captioner, max_batch=3, max_wait_ms=LONG_WAIT_MS), scenario)
    with_b_c, with_d_e = first[0]["n_best"], second[2]["n_best"]
    (alone,) = library_captions(captioner, [photos[0]], DecodeSettings(beam_size=3, n_best=2))
    assert close(with_b_c, with_d_e) and close(with_b_c, as_answer(alone))


def test_images_with_other_settings_are_a_beam_search_batch_of_their_own(captioner):
    photos, queries = [photo_bytes(1), photo_bytes(2)], ["?beam=2", "?beam=3&n_best=3"]
    results = serve(app_for(captioner, max_batch=2, max_wait_ms=LONG_WAIT_MS), lambda c: in_order(c, photos, queries))
    assert [r["timing"]["batch_size"] for r in results] == [1, 1]
    for result, photo, settings in zip(results, photos, (DecodeSettings(beam_size=2), DecodeSettings(beam_size=3, n_best=3))):
        assert result["n_best"] == as_answer(library_captions(captioner, [photo], settings)[0])


def test_a_decode_in_progress_does_not_stop_the_server_accepting_and_answering(captioner):
    gated = GatedCaptioner(captioner)

    async def scenario(client: httpx.AsyncClient) -> tuple[list[int], list[dict]]:
        first = asyncio.create_task(post(client, photo_bytes(0)))
        assert await asyncio.to_thread(gated.entered.wait, 30)  # the worker is inside beam search
        health = await asyncio.wait_for(client.get("/healthz"), 5)
        model = await asyncio.wait_for(client.get("/v1/model"), 5)
        second = asyncio.create_task(post(client, photo_bytes(1)))
        await asyncio.wait_for(queued(client, 1), 5)  # accepted, waiting for the worker
        bad = await asyncio.wait_for(post(client, b"not an image"), 5)  # refused without the worker
        assert not first.done()
        gated.gate.set()
        answers = await asyncio.gather(first, second)
        return [health.status_code, model.status_code, bad.status_code], [a.json()["results"][0] for a in answers]

    statuses, results = serve(app_for(gated, max_batch=1, max_wait_ms=0), scenario)
    assert statuses == [200, 200, 422]
    assert results[1]["timing"]["queue_ms"] > 0 and all(r["timing"]["batch_size"] == 1 for r in results)


def test_a_failed_decode_fails_its_request_and_the_next_one_is_served(captioner):
    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        return await post(client, photo_bytes(0)), await post(client, photo_bytes(0))

    failed, served = serve(app_for(FailingOnceCaptioner(captioner), max_wait_ms=0), scenario)
    assert failed.status_code == 500 and failed.json() == {"error": "captioning failed: RuntimeError: out of memory"}
    assert served.status_code == 200


def test_the_app_starts_again_on_a_new_event_loop_after_a_shutdown(captioner):
    app = app_for(captioner, max_wait_ms=0)
    for _ in range(2):
        assert serve(app, lambda client: post(client, photo_bytes(0))).status_code == 200


def test_stopping_answers_every_queued_image_503_at_once(captioner):
    app = app_for(captioner, max_batch=16, max_wait_ms=60_000)

    async def scenario(client: httpx.AsyncClient) -> tuple[list[httpx.Response], float]:
        waiting = [asyncio.create_task(post(client, photo_bytes(i))) for i in range(2)]
        await queued(client, 2)
        start = asyncio.get_running_loop().time()
        await app.state.batcher.stop()
        answers = await asyncio.gather(*waiting)
        late = await post(client, photo_bytes(3))
        return [*answers, late], asyncio.get_running_loop().time() - start

    answers, seconds = serve(app, scenario)
    assert seconds < 1
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert answers[0].json() == {"error": "the server is shutting down; send the request again later"}


def large_png(width: int, height: int) -> bytes:
    """A bilevel PNG of ``width`` x ``height``: a large declared size in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_large_uploads_are_decoded_one_at_a_time(captioner, monkeypatch):
    """Three concurrent 9000 x 9000 uploads (81 M pixels each): never two decoded at once."""
    running, most = 0, 0
    lock = threading.Lock()

    def decode(data: bytes, size: int, name: str) -> torch.Tensor:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        return torch.zeros(3, size, size)

    monkeypatch.setattr("sca_caption.serve.app.decode_image", decode)

    async def scenario(client: httpx.AsyncClient) -> list[int]:
        return [a.status_code for a in await asyncio.gather(*(post(client, large_png(9000, 9000)) for _ in range(3)))]

    assert serve(app_for(captioner, max_batch=3, max_wait_ms=0), scenario) == [200, 200, 200]
    assert most == 1
