"""Bad input to the captioning service: each is a 4xx JSON error with a one-line message, and the
server goes on serving. Upload names are only echoed, never opened; a body is only given to
Pillow, never unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from caption_support import bomb_png, save_tiny_checkpoint, truncated_jpeg
from serve_support import as_answer, library_captions, photo_bytes
from sca_caption.captioning import DecodeSettings, ImageCaptioner
from sca_caption.serve.app import ServiceLimits, create_app
from sca_caption.serve.model_card import ModelCard

UPLOAD_LIMIT_MB = 0.25
MAX_IMAGES = 4


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


@pytest.fixture(scope="module")
def client(captioner):
    limits = ServiceLimits(max_wait_ms=0, max_upload_mb=UPLOAD_LIMIT_MB, max_images=MAX_IMAGES)
    with TestClient(create_app(captioner, card=ModelCard("tiny.pt"), limits=limits)) as client:
        yield client


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bad")
    return {"truncated": truncated_jpeg(folder / "cut.jpg").read_bytes(), "bomb": bomb_png(folder / "bomb.png").read_bytes()}


def refused(answer, status: int, *words: str) -> str:
    """``answer`` is a ``status`` JSON error of one line holding ``words``; returns the line."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    message = body["error"]
    assert message and "\n" not in message
    for word in words:
        assert word in message, message
    return message


def still_serving(client: TestClient) -> None:
    answer = client.post("/v1/captions?beam=2", content=photo_bytes(0), headers={"content-type": "image/png"})
    assert answer.status_code == 200 and answer.json()["results"][0]["caption"] is not None


def raw(client: TestClient, body: bytes, query: str = "", content_type: str = "image/jpeg"):
    return client.post(f"/v1/captions{query}", content=body, headers={"content-type": content_type})


def files(client: TestClient, parts: list[tuple[str, str, bytes]], query: str = "", data: dict | None = None):
    return client.post(f"/v1/captions{query}", files=[(field, (name, body, "image/png")) for field, name, body in parts], data=data)


def test_not_an_image(client):
    refused(raw(client, b"GIF89a? no, just text\n"), 422, "request body", "not an image file")
    refused(files(client, [("images", "notes.png", b"plain text")]), 422, "notes.png: not an image file")
    still_serving(client)


def test_truncated_jpeg_names_the_upload(client, bad_files):
    refused(files(client, [("images", "ok.png", photo_bytes(1)), ("images", "cut.jpg", bad_files["truncated"])]),
            422, "cut.jpg", "truncated")
    still_serving(client)


def test_decompression_bomb_is_refused_before_decoding(client, bad_files):
    refused(raw(client, bad_files["bomb"], content_type="image/png"), 422, "decompression-bomb", "10000x10000")
    still_serving(client)


def test_over_the_upload_limit_declared_or_streamed(client):
    big = b"\xff" * int(UPLOAD_LIMIT_MB * 2**20 + 1)
    refused(raw(client, big), 413, "upload limit", "0.25 MB")

    def chunks():  # no content-length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    refused(client.post("/v1/captions", content=chunks(), headers={"content-type": "image/jpeg"}), 413, "upload limit")
    still_serving(client)


def test_empty_body_empty_file_and_no_image(client):
    refused(raw(client, b""), 400, "empty request body")
    refused(files(client, [("images", "empty.png", b"")]), 400, "empty.png: empty file")
    no_files = client.post("/v1/captions", content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"})
    refused(no_files, 400, "no image in the request")
    still_serving(client)


def test_too_many_images_in_one_request(client):
    parts = [("images", f"p{i}.png", photo_bytes(i)) for i in range(MAX_IMAGES + 1)]
    refused(files(client, parts), 413, f"too many images in one request: {MAX_IMAGES + 1}, at most {MAX_IMAGES}")
    still_serving(client)


def test_other_content_types_and_malformed_multipart(client):
    refused(raw(client, b'{"image": "x"}', content_type="application/json"), 415, "application/json", "multipart/form-data")
    refused(client.post("/v1/captions", content=photo_bytes(0)), 415, "(none)")
    refused(raw(client, b"garbage", content_type="multipart/form-data"), 400, "malformed multipart body")
    still_serving(client)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("?beam=0", ["option 'beam'", "greater than or equal to 1", "'0'"]),
        ("?beam=21", ["option 'beam'", "less than or equal to 20"]),
        ("?max_length=10000", ["option 'max_length'", "less than or equal to 100", "'10000'"]),
        ("?max_length=0", ["option 'max_length'"]),
        ("?beam=three", ["option 'beam'", "valid integer"]),
        ("?attention=perhaps", ["option 'attention'", "valid boolean"]),
        ("?length_penalty=loud", ["option 'length_penalty'", "'none', 'average' or 'wu'"]),
        ("?length_alpha=-1", ["option 'length_alpha'"]),
        ("?length_alpha=1", ["alpha 1.0 needs length_penalty wu"]),
        ("?length_penalty=wu", ["length_penalty wu needs a finite alpha above 0"]),
        ("?top_channels=1000", ["option 'top_channels'"]),
        ("?beam=2&n_best=3", ["n_best (3) must be at most beam (2)"]),
        ("?beam=2&beam=3", ["option 'beam' given more than once"]),
        ("?colour=red", ["unknown option 'colour'", "beam, n_best, max_length"]),
    ],
)
def test_wrong_option_types_ranges_and_unknown_options(client, query, words):
    refused(raw(client, photo_bytes(0), query, "image/png"), 422, *words)
    still_serving(client)


def test_unknown_form_fields(client):
    refused(files(client, [("images", "a.png", photo_bytes(0))], data={"beam": "3"}), 422,
            "unknown form field 'beam'", "query string")
    refused(files(client, [("photo", "a.png", photo_bytes(0))]), 422, "unknown form field 'photo'", "'images'")
    still_serving(client)


def test_wrong_routes_and_methods_are_json_too(client):
    refused(client.get("/v1/nothing"), 404, "Not Found")
    refused(client.get("/v1/captions"), 405, "Method Not Allowed")


def test_upload_names_are_only_echoed_never_opened(client, captioner):
    answer = files(client, [("images", "/etc/passwd", photo_bytes(2)), ("images", "../../checkpoints/x.pt", photo_bytes(3))])
    results = answer.json()["results"]
    assert [r["name"] for r in results] == ["/etc/passwd", "../../checkpoints/x.pt"]
    want = library_captions(captioner, [photo_bytes(2), photo_bytes(3)], captioner.settings())  # no options: the checkpoint's recorded settings
    assert [r["n_best"] for r in results] == [as_answer(c) for c in want]
    refused(files(client, [("images", "/etc/hostname", b"\x00\x01")]), 422, "/etc/hostname: not an image file")


class _Marker:
    """Unpickling this creates a file: proof that a body was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickle_body_is_never_unpickled(tmp_path, client):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    refused(raw(client, payload, content_type="image/png"), 422, "not an image file")
    refused(files(client, [("images", "x.pt", payload)]), 422, "x.pt: not an image file")
    assert not marker.exists()
    still_serving(client)


def test_an_impossible_decoding_request_is_refused_whole_before_it_is_queued(captioner):
    """Issues #24.6, #26.1: the options over the checkpoint's settings (here min_length 1 and the
    caption length 6 + 1) are checked before the images are queued: a 422, not the worker's 500."""
    recorded = ImageCaptioner(
        captioner.model, captioner.prefix, captioner.vocab, max_length=captioner.max_length, decode=DecodeSettings(min_length=1)
    )
    with TestClient(create_app(recorded, card=ModelCard("tiny.pt"), limits=ServiceLimits(max_wait_ms=0))) as client:
        for query, problem in (
            ("?min_length=20&max_length=20", "min_length (20) must be below max_length (20)"),
            ("?max_length=1", "min_length (1) must be below max_length (1)"),
            ("?min_length=7", "min_length (7) must be below max_length (7)"),
        ):
            refused(raw(client, photo_bytes(0), query, "image/png"), 422, problem)
        still_serving(client)
