"""The caption CLI: output formats, path collection, and bad input (one line each, the rest still
captioned, exit status 1; nothing to caption, exit status 2)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from caption_support import LAYERS, bomb_png, captioner, checkpoint, save_tiny_checkpoint, shape_image, truncated_jpeg  # noqa: F401
from sca_caption import captioning
from sca_caption.caption import main
from sca_caption.checkpoint import CheckpointError
from sca_caption.captioning import (
    DecodeSettings,
    ImageCaptioner,
    NoImagesError,
    collect_images,
    default_checkpoint,
    image_id_for,
)
from sca_caption.data.images import MAX_PIXELS, load_image
from sca_caption.models.backbones import build_cache_backbone


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of three shape images plus a text file (not an image by extension)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shape_image(folder / "c.png", (220, 30, 30), (10, 10, 40, 40))
    shape_image(folder / "a.jpg", (40, 80, 230), (50, 50, 90, 90))
    shape_image(folder / "B.PNG", (30, 170, 50), (10, 50, 60, 90))
    (folder / "notes.txt").write_text("not an image")
    return folder


def expected_captions(captioner: ImageCaptioner, paths: list[Path], settings: DecodeSettings):
    images = torch.stack([load_image(p, captioner.input_size) for p in paths])
    return captioner.caption_features(captioner.features(images), settings)


def run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def test_folder_is_captioned_in_sorted_order_one_tab_line_each(capsys, checkpoint, captioner, photos):
    status, out, err = run(capsys, "--checkpoint", str(checkpoint), "--workers", "0", "--beam", "3", "--no-progress", str(photos))
    paths = [photos / "B.PNG", photos / "a.jpg", photos / "c.png"]
    want = expected_captions(captioner, paths, DecodeSettings(beam_size=3))
    assert status == 0 and err == []
    assert out == [f"{p}\t{c[0].text}" for p, c in zip(paths, want)]


def test_n_best_prints_ranked_scored_lines(capsys, checkpoint, captioner, photos):
    path = photos / "a.jpg"
    status, out, _ = run(capsys, "--checkpoint", str(checkpoint), "--workers", "0", "--beam", "4", "--n-best", "3", str(path))
    (want,) = expected_captions(captioner, [path], DecodeSettings(beam_size=4, n_best=3))
    assert status == 0 and len(want) == 3
    assert out == [f"{path}\t{rank}\t{c.hypothesis.score:.4f}\t{c.text}" for rank, c in enumerate(want, start=1)]
    scores = [float(line.split("\t")[2]) for line in out]
    assert scores == sorted(scores, reverse=True)


def test_a_length_alpha_without_the_wu_penalty_is_refused_before_any_image(capsys, checkpoint, photos, tmp_path):
    out = tmp_path / "captions.json"
    status, lines, err = run(capsys, "--checkpoint", str(checkpoint), "--length-alpha", "1", "--json", str(out), str(photos / "a.jpg"))
    assert status == 2 and lines == [] and not out.exists()
    assert err[-1] == "error: decoding settings: alpha 1.0 needs length_penalty wu (it is the wu penalty's exponent)"


def test_length_penalty_and_max_length_reach_the_search(capsys, checkpoint, captioner, photos):
    path = photos / "c.png"
    argv = ["--checkpoint", str(checkpoint), "--workers", "0", "--beam", "3", "--n-best", "3", "--max-length", "4",
            "--length-penalty", "wu", "--length-alpha", "1.5", str(path)]
    status, out, _ = run(capsys, *argv)
    settings = DecodeSettings(beam_size=3, n_best=3, max_length=4, length_penalty="wu", alpha=1.5)
    (want,) = expected_captions(captioner, [path], settings)
    assert status == 0
    assert out == [f"{path}\t{rank}\t{c.hypothesis.score:.4f}\t{c.text}" for rank, c in enumerate(want, start=1)]
    assert all(len(c.words) <= 4 for c in want)
    assert any(c.hypothesis.score != c.hypothesis.log_prob for c in want)


def test_batched_with_workers_equals_one_at_a_time(capsys, checkpoint, photos):
    argv = ["--checkpoint", str(checkpoint), "--workers", "2", "--batch-size", "2", "--no-progress", str(photos)]
    status, batched, err = run(capsys, *argv)
    assert status == 0 and err == []
    singles = []
    for path in sorted(p for p in photos.iterdir() if p.suffix != ".txt"):
        _, out, _ = run(capsys, "--checkpoint", str(checkpoint), "--workers", "0", "--batch-size", "1", str(path))
        singles += out
    assert batched == singles


def test_progress_bar_goes_to_stderr_for_a_folder(capsys, checkpoint, photos):
    main(["--checkpoint", str(checkpoint), "--workers", "0", str(photos)])
    out, err = capsys.readouterr()
    assert "captioning" in err and "3/3" in err
    assert "captioning" not in out and len(out.splitlines()) == 3


def test_json_holds_coco_results_with_scores_n_best_and_attention(capsys, tmp_path, checkpoint, captioner):
    coco = shape_image(tmp_path / "000000391895.jpg", (220, 30, 30), (10, 10, 40, 40))
    flickr = shape_image(tmp_path / "1000268201_693b08cb0e.png", (40, 80, 230), (50, 50, 90, 90))
    out_file = tmp_path / "results" / "captions.json"
    argv = ["--checkpoint", str(checkpoint), "--workers", "0", "--beam", "3", "--n-best", "2", "--top-channels", "4",
            "--json", str(out_file), str(coco), str(flickr)]
    assert main(argv) == 0
    entries = json.loads(out_file.read_text())
    want = expected_captions(captioner, [coco, flickr], DecodeSettings(beam_size=3, n_best=2, attention=True))
    assert [e["image_id"] for e in entries] == [391895, "1000268201_693b08cb0e"]
    for entry, captions in zip(entries, want):
        assert entry["caption"] == captions[0].text and entry["score"] == captions[0].hypothesis.score
        assert [n["caption"] for n in entry["n_best"]] == [c.text for c in captions]
        assert [w["word"] for w in entry["attention"]] == captions[0].words
        for t, word in enumerate(entry["attention"]):
            assert [layer["layer"] for layer in word["layers"]] == list(LAYERS)
            for l, layer in enumerate(word["layers"]):
                alpha, beta = captions[0].spatial_map(t, l), captions[0].hypothesis.attention.channel[l][t]
                row, col = layer["argmax"]
                assert layer["grid"] == [7, 7] and alpha[row, col] == alpha.max()
                assert [c for c, _ in layer["top_channels"]] == beta.topk(4).indices.tolist()


def test_bad_files_are_reported_in_one_line_each_and_the_rest_captioned(capsys, tmp_path, checkpoint, photos):
    bad = tmp_path / "bad"
    bad.mkdir()
    not_image = bad / "text.jpg"
    not_image.write_text("hello, not a JPEG")
    cut = truncated_jpeg(bad / "cut.jpg")
    bomb = bomb_png(bad / "bomb.png")
    missing = tmp_path / "missing.jpg"
    good = photos / "a.jpg"
    argv = ["--checkpoint", str(checkpoint), "--workers", "0", "--batch-size", "2", "--no-progress", str(missing), str(bad), str(good)]
    status, out, err = run(capsys, *argv)
    assert status == 1
    assert [line.split("\t")[0] for line in out] == [str(good)]
    problems = {line.split(": ", 2)[1]: line for line in err[:-1]}
    assert set(problems) == {str(missing), str(bomb), str(cut), str(not_image)}
    assert "not found" in problems[str(missing)]
    assert f"{MAX_PIXELS:,}" in problems[str(bomb)] and "10000x10000" in problems[str(bomb)]
    assert "truncated" in problems[str(cut)]
    assert "not an image" in problems[str(not_image)]
    assert err[-1] == "error: 4 of 5 images could not be captioned"


def test_unreadable_file_is_reported_and_the_rest_captioned(capsys, monkeypatch, tmp_path, checkpoint, photos):
    locked = shape_image(tmp_path / "locked.png", (220, 30, 30), (10, 10, 40, 40))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: fail the open as the OS does for other users
        real_open = os.open

        def denying_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)
    status, out, err = run(capsys, "--checkpoint", str(checkpoint), "--workers", "0", str(locked), str(photos / "c.png"))
    assert status == 1 and len(out) == 1 and out[0].startswith(f"{photos / 'c.png'}\t")
    assert len(err) == 2 and err[0].startswith(f"error: {locked}: ") and "Permission denied" in err[0]


@pytest.mark.parametrize("make", ["pattern", "empty folder"])
def test_nothing_to_caption_is_one_line_and_status_2(capsys, tmp_path, checkpoint, make):
    target = str(tmp_path / "*.jpg") if make == "pattern" else str(tmp_path)
    status, out, err = run(capsys, "--checkpoint", str(checkpoint), target)
    assert status == 2 and out == [] and len(err) == 1 and target in err[0]


def test_without_checkpoint_uses_the_default_rule_or_says_how_to_train(capsys, monkeypatch, tmp_path, checkpoint, photos):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(captioning, "shipped_checkpoint", lambda: None)  # a package without its shipped model
    status, out, err = run(capsys, str(photos / "a.jpg"))
    assert status == 2 and out == [] and len(err) == 1
    assert "checkpoints/flickr8k_cs_lite0.pt" in err[0] and "python -m sca_caption.train" in err[0]
    default = tmp_path / "checkpoints" / "shapes" / "best.pt"
    default.parent.mkdir(parents=True)
    default.write_bytes(checkpoint.read_bytes())
    status, out, err = run(capsys, "--workers", "0", str(photos / "a.jpg"))
    assert status == 0 and len(out) == 1
    assert err == ["note: no --checkpoint given: using checkpoints/shapes/best.pt (the newest trained checkpoint)"]


def test_default_checkpoint_is_the_shipped_model_else_the_newest_best(monkeypatch, tmp_path):
    monkeypatch.setattr(captioning, "shipped_checkpoint", lambda: None)
    with pytest.raises(CheckpointError, match="no checkpoint: neither .*flickr8k_cs_lite0.pt nor any .*best.pt"):
        default_checkpoint(tmp_path)
    installed = tmp_path / "site-packages" / "flickr8k_cs_lite0.pt"
    monkeypatch.setattr(captioning, "shipped_checkpoint", lambda: installed)
    assert default_checkpoint(tmp_path) == (installed, "the shipped Flickr8k model, installed with the package")
    for age, run_name in enumerate(("old", "new")):
        best = tmp_path / run_name / "best.pt"
        best.parent.mkdir()
        best.write_bytes(b"x")
        os.utime(best, (1_000_000 + age, 1_000_000 + age))
    (tmp_path / "old" / "last.pt").write_bytes(b"x")  # newer, but not a best.pt
    assert default_checkpoint(tmp_path) == (tmp_path / "new" / "best.pt", "the newest trained checkpoint")
    os.utime(tmp_path / "old" / "best.pt", (2_000_000, 2_000_000))
    assert default_checkpoint(tmp_path)[0] == tmp_path / "old" / "best.pt"
    (tmp_path / "flickr8k_cs_lite0.pt").write_bytes(b"x")
    assert default_checkpoint(tmp_path) == (tmp_path / "flickr8k_cs_lite0.pt", "the shipped Flickr8k model")


def test_unusable_checkpoint_is_one_line_and_status_2(capsys, tmp_path, photos):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file")
    status, out, err = run(capsys, "--checkpoint", str(broken), str(photos / "a.jpg"))
    assert status == 2 and out == [] and len(err) == 1 and str(broken) in err[0]


def test_attention_needs_a_model_with_spatial_attention(capsys, tmp_path, photos):
    channel_only = save_tiny_checkpoint(tmp_path / "c.pt", order="c")
    status, _, err = run(capsys, "--checkpoint", str(channel_only), "--attention", str(tmp_path / "maps"), "--no-progress", str(photos))
    assert status == 2 and len(err) == 1 and "no spatial attention" in err[0]


def test_collect_images_expands_folders_and_globs_in_argument_order(tmp_path, photos):
    (photos / "sub").mkdir()
    shape_image(photos / "sub" / "d.webp", (1, 2, 3), (0, 0, 5, 5))
    given = tmp_path / "given.txt"  # named explicitly: kept, and reported later if it does not decode
    found = collect_images([str(photos / "*.png"), str(given), str(photos)])
    assert found == [photos / "c.png", given, photos / "B.PNG", photos / "a.jpg"]  # c.png once
    assert collect_images([str(tmp_path / "**" / "*.webp")]) == [photos / "sub" / "d.webp"]
    with pytest.raises(NoImagesError, match="matches no file"):
        collect_images([str(tmp_path / "*.gif")])


def test_image_ids_follow_coco_and_flickr_conventions():
    assert image_id_for(Path("x/000000391895.jpg")) == 391895
    assert image_id_for(Path("COCO_val2014_000000391895.jpg")) == 391895
    assert image_id_for(Path("1000268201_693b08cb0e.jpg")) == "1000268201_693b08cb0e"


@pytest.mark.parametrize("layers", [("stage7",), ("stage6", "stage7")])  # one layer: no upper stage to compare
def test_backbone_is_rebuilt_with_the_weights_the_checkpoint_names(tmp_path, layers):
    random_backbone = save_tiny_checkpoint(tmp_path / "none.pt", backbone_weights="none", layers=layers)
    captioner = ImageCaptioner.from_checkpoint(random_backbone)
    rebuilt = build_cache_backbone("efficientnet_lite0", "none").state_dict()
    prefix = captioner.prefix.backbone.state_dict()
    assert all(torch.equal(prefix[k], rebuilt[k]) for k in rebuilt if k.startswith("stages.stem."))
    with pytest.raises(CheckpointError, match="with weights 'imagenet' is not the backbone its features came from"):
        ImageCaptioner.from_checkpoint(random_backbone, backbone_weights="imagenet")


def test_max_length_above_the_services_limit_is_a_usage_error(capsys, checkpoint, photos):
    """Issue #26.10: one limit on the decoding steps (the service refuses ?max_length=10000 too)."""
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(checkpoint), "--max-length", "100000", str(photos / "a.jpg")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("argument --max-length: 100000 is above 100")
