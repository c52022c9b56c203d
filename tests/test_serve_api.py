"""The captioning service's JSON API on the app object (FastAPI's TestClient): captions equal the
caption CLI's for the same image and settings, the options reach the beam search, attention comes
as the CLI's fields plus each word's whole map, and /v1/model, /healthz, the OpenAPI schema and
the page (every asset local) describe what is served."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from caption_support import LAYERS, captioner, checkpoint  # noqa: F401
from serve_support import as_answer, library_captions, photo_bytes
from sca_caption.captioning import DecodeSettings, attention_summary
from sca_caption.checkpoint import load_checkpoint, save_checkpoint
from sca_caption.serve.app import ServiceLimits, create_app
from sca_caption.serve.model_card import model_card
from sca_caption.serve.schemas import CaptionOptions


@pytest.fixture(scope="module")
def client(checkpoint, captioner):
    """No waiting for more images: a lone request is decoded as a batch of its own images."""
    app = create_app(captioner, card=model_card(checkpoint), limits=ServiceLimits(max_wait_ms=0))
    with TestClient(app) as client:
        yield client


def post_files(client: TestClient, photos: list[bytes], query: str = "", names: list[str] | None = None):
    names = names or [f"photo{i}.png" for i in range(len(photos))]
    files = [("images", (name, data, "image/png")) for name, data in zip(names, photos)]
    return client.post(f"/v1/captions{query}", files=files)


def test_a_caption_equals_the_cli_path_for_the_same_image_and_settings(tmp_path, client, captioner):
    path = tmp_path / "photo.png"
    path.write_bytes(photo_bytes(0))
    answer = post_files(client, [path.read_bytes()], "?beam=3&n_best=3")
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    (cli,) = captioner.caption_files([path], DecodeSettings(beam_size=3, n_best=3), batch_size=1, workers=0)
    assert result["n_best"] == as_answer(cli.captions) and len(result["n_best"]) == 3
    best = result["n_best"][0]
    assert {k: result[k] for k in best} == best and result["name"] == "photo0.png"
    assert result["timing"]["batch_size"] == 1 and result["timing"]["batch_ms"] > 0
    assert "attention" not in result


def test_a_raw_image_body_answers_as_the_same_file_uploaded(client):
    raw = client.post("/v1/captions?beam=2", content=photo_bytes(1), headers={"content-type": "image/png"})
    multipart = post_files(client, [photo_bytes(1)], "?beam=2")
    assert raw.status_code == multipart.status_code == 200
    assert raw.json()["results"][0]["name"] == "request body"
    assert raw.json()["results"][0]["n_best"] == multipart.json()["results"][0]["n_best"]


def test_several_images_in_one_request_are_one_batch_answered_in_upload_order(client, captioner):
    photos = [photo_bytes(i) for i in (2, 0, 4)]
    answer = post_files(client, photos, "?beam=3&n_best=2", names=["c.png", "a.png", "e.png"])
    results = answer.json()["results"]
    assert [r["name"] for r in results] == ["c.png", "a.png", "e.png"]
    assert all(r["timing"]["batch_size"] == 3 for r in results)
    want = library_captions(captioner, photos, DecodeSettings(beam_size=3, n_best=2))
    assert [r["n_best"] for r in results] == [as_answer(c) for c in want]


def test_attention_is_the_cli_summary_plus_each_words_whole_map(client, captioner):
    answer = post_files(client, [photo_bytes(3)], "?beam=3&attention=true&top_channels=4")
    (result,) = answer.json()["results"]
    (captions,) = library_captions(captioner, [photo_bytes(3)], DecodeSettings(beam_size=3, attention=True))
    best = captions[0]
    attention = result["attention"]
    assert [w["word"] for w in attention] == best.words == result["caption"].split()
    summary = attention_summary(best, LAYERS, top_channels=4)
    for t, (word, want) in enumerate(zip(attention, summary)):
        for l, (layer, want_layer) in enumerate(zip(word["layers"], want["layers"])):
            grid = captioner.grids[l]
            assert layer.pop("map") == [[round(v, 6) for v in row] for row in best.spatial_map(t, l).tolist()]
            assert layer == {**want_layer, "top_channels": [list(c) for c in want_layer["top_channels"]]}
            assert layer["grid"] == list(grid) and len(layer["top_channels"]) == 4
    first_map = post_files(client, [photo_bytes(3)], "?beam=3&attention=true").json()["results"][0]["attention"][0]
    assert math.isclose(sum(map(sum, first_map["layers"][0]["map"])), 1.0, abs_tol=1e-4)


def test_options_reach_the_beam_search(client, captioner):
    photo = photo_bytes(4)
    settings = DecodeSettings(beam_size=4, n_best=4, max_length=3, length_penalty="wu", alpha=0.5)
    query = "?beam=4&n_best=4&max_length=3&length_penalty=wu&length_alpha=0.5"
    (result,) = post_files(client, [photo], query).json()["results"]
    (want,) = library_captions(captioner, [photo], settings)
    assert result["n_best"] == as_answer(want)
    assert all(len(c["caption"].split()) <= 3 for c in result["n_best"])
    assert any(c["score"] != c["log_prob"] for c in result["n_best"])


def test_model_describes_the_checkpoint_its_scores_defaults_and_limits(client, captioner):
    info = client.get("/v1/model").json()
    assert info["checkpoint"] == "tiny.pt" and info["backbone"] == "efficientnet_lite0"
    assert info["layers"] == list(LAYERS) and info["order"] == "cs" and info["grids"] == [list(g) for g in captioner.grids]
    assert info["vocabulary_size"] == len(captioner.vocab) and info["input_size"] == captioner.input_size
    assert info["scores"] == {} and info["device"] == "cpu"
    recorded = captioner.decode  # the checkpoint's decode section (the tiny one records none: the defaults)
    assert info["decoding_defaults"] == {
        "beam": recorded.beam_size, "n_best": 1, "max_length": captioner.max_length, "length_penalty": "none",
        "length_alpha": recorded.alpha, "min_length": 0, "block_trigrams": False,
    }
    assert info["limits"]["max_batch"] == 16 and info["limits"]["max_wait_ms"] == 0
    assert client.get("/healthz").json() == {"status": "ok", "queued": 0}


def test_model_card_reports_the_scores_the_trainer_recorded(tmp_path, checkpoint):
    trained = load_checkpoint(checkpoint)
    history = [{"epoch": 1, "step": 10, "lr": 1e-3, "train_loss": 3.0, "seconds": 9.0, "val_loss": 2.5, "CIDEr": 0.2},
               {"epoch": 2, "step": 20, "lr": 1e-3, "train_loss": 2.0, "seconds": 9.0, "val_loss": 2.1, "CIDEr": 0.4}]
    trained.config["train"] = {"early_stop_metric": "CIDEr"}
    save_checkpoint(tmp_path / "best.pt", replace(trained, extra={"best_score": 0.4, "best_epoch": 2, "history": history}))
    card = model_card(tmp_path / "best.pt")
    assert card.checkpoint == "best.pt"
    assert card.scores == {"early_stop_metric": "CIDEr", "best_epoch": 2, "best_score": 0.4,
                           "validation": {"val_loss": 2.1, "CIDEr": 0.4}}


def test_model_card_reports_an_exported_files_test_scores(tmp_path, checkpoint):
    exported = replace(load_checkpoint(checkpoint), extra={"test_split": "test", "test_scores": {"CIDEr": 0.5, "Bleu_4": 0.2}})
    save_checkpoint(tmp_path / "model.pt", exported)
    assert model_card(tmp_path / "model.pt").scores == {"test_split": "test", "test": {"CIDEr": 0.5, "Bleu_4": 0.2}}


def test_openapi_schema_documents_the_options_bodies_and_errors(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/captions"]["post"]
    assert [p["name"] for p in post["parameters"]] == list(CaptionOptions.model_fields)
    assert all(p["in"] == "query" for p in post["parameters"])
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CaptionResponse")
    for status in ("400", "413", "415", "422"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"/v1/model", "/healthz"} <= set(schema["paths"]) and "/" not in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_the_page_and_its_assets_are_served_from_here(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = [a for a in re.findall(r'(?:src|href)="([^"]+)"', page.text) if a != "data:,"]  # data:, no favicon
    assert sorted(assets) == ["/static/app.js", "/static/style.css"]
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and answer.text
        assert not re.search(r"https?:|url\(|@import", answer.text), asset  # nothing fetched from elsewhere
    assert not re.search(r"https?:", page.text)
    assert client.get("/static/index.html").status_code == 404
