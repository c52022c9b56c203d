"""The evaluate CLI on a tiny trained checkpoint: results file, printed scores equal to the metrics
computed directly from the dataset's references, and one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sca_caption import evaluate, export, train
from sca_caption.captioning import ImageCaptioner
from sca_caption.checkpoint import CheckpointError, load_captioner, load_checkpoint, save_checkpoint
from sca_caption.data.shapes import DATASET_FILE, load_scenes, shapes_accuracy
from sca_caption.metrics import score_captions
from train_support import TinyShapes, tiny_shapes  # noqa: F401


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes: TinyShapes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    settings = tiny_shapes.overrides(train__epochs=1)
    assert train.main(["--no-progress", "--device", "cpu", "--out", str(out), *settings]) == 0
    return out / "best.pt"


def _references(root: Path, split: str) -> dict[str, list[str]]:
    """Every caption of the split, read straight from the dataset file."""
    images = json.loads((root / DATASET_FILE).read_text())["images"]
    return {Path(i["filename"]).stem: [s["raw"] for s in i["sentences"]] for i in images if i["split"] == split}


def _run(args: list[str], capsys) -> dict[str, float]:
    assert evaluate.main(["--no-progress", "--device", "cpu", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_writes_coco_results_and_prints_the_metrics_of_them(checkpoint, tiny_shapes, tmp_path, capsys):
    results = tmp_path / "results.json"
    printed = _run(["--checkpoint", str(checkpoint), "--split", "test", "--beam", "2", "--out", str(results), "--no-meteor"], capsys)
    entries = json.loads(results.read_text())
    references = _references(tiny_shapes.root, "test")
    assert [e["image_id"] for e in entries] == sorted(references)
    captions = {e["image_id"]: e["caption"] for e in entries}
    assert all(isinstance(c, str) and c for c in captions.values())
    expected = dict(score_captions(captions, references, meteor=False, spice=False))
    expected["shapes_accuracy"] = shapes_accuracy(captions, load_scenes(tiny_shapes.root / DATASET_FILE, "test"))
    dangling = [c for c in captions.values() if c.split()[-1] in ("a", "the", "of", "to", "and", "is", "in", "on")]
    expected["dangling_end"] = len(dangling) / len(captions)
    assert printed == pytest.approx(expected, abs=0)
    assert set(printed) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "shapes_accuracy", "dangling_end"}


def test_evaluate_decodes_with_the_checkpoints_settings_unless_told(checkpoint, tmp_path, capsys):
    """The checkpoint records decode.beam_size 2 (train_support's settings): the default results
    file is named after it, and --beam overrides it."""
    _run(["--checkpoint", str(checkpoint), "--split", "val", "--no-meteor"], capsys)
    assert (checkpoint.parent / "results_val_beam2.json").is_file()
    _run(["--checkpoint", str(checkpoint), "--split", "val", "--beam", "3", "--min-length", "2", "--no-meteor"], capsys)
    captions = json.loads((checkpoint.parent / "results_val_beam3_min2.json").read_text())
    assert all(len(e["caption"].split()) >= 2 for e in captions)
    assert evaluate.main(["--no-progress", "--checkpoint", str(checkpoint), "--split", "val", "--no-meteor",
                          "--length-penalty", "wu", "--length-alpha", "1.5", "--block-trigrams"]) == 0
    assert "captions of the val split, beam 2, length penalty wu (alpha 1.5), trigrams blocked" in capsys.readouterr().out
    assert (checkpoint.parent / "results_val_beam2_wu1.5_blocked.json").is_file()  # no other decoding's file replaced


def test_a_length_alpha_without_the_wu_penalty_is_refused(checkpoint, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(checkpoint), "--length-alpha", "1", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: decoding settings: alpha 1.0 needs length_penalty wu (it is the wu penalty's exponent)"
    assert not (tmp_path / "r.json").exists()


def test_export_refuses_a_length_alpha_without_the_wu_penalty_and_writes_nothing(checkpoint, tmp_path, capsys):
    assert export.main([str(checkpoint), str(tmp_path / "model.pt"), "--length-alpha", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("alpha 1.0 needs length_penalty wu (it is the wu penalty's exponent)")
    assert not (tmp_path / "model.pt").exists()


def test_evaluate_defaults_the_results_path_beside_the_checkpoint(checkpoint, capsys):
    printed = _run(["--checkpoint", str(checkpoint), "--split", "val", "--beam", "1", "--no-meteor"], capsys)
    assert (checkpoint.parent / "results_val_beam1.json").is_file()
    assert 0.0 <= printed["shapes_accuracy"] <= 1.0


def test_the_default_results_name_replaces_only_a_results_file(checkpoint, capsys):
    mine = checkpoint.parent / "results_val_beam1_min1.json"
    mine.write_text("my notes\n")
    assert evaluate.main(["--no-progress", "--checkpoint", str(checkpoint), "--split", "val", "--beam", "1",
                          "--min-length", "1", "--no-meteor"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {mine}: exists and is not a COCO results JSON file; not overwritten"
    )
    assert mine.read_text() == "my notes\n"


@pytest.mark.slow
def test_evaluate_with_meteor(checkpoint, capsys):
    printed = _run(["--checkpoint", str(checkpoint), "--beam", "2"], capsys)
    assert 0.0 <= printed["METEOR"] <= 1.0


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'missing.pt'}: checkpoint file not found"]


def test_export_writes_a_float16_model_whose_recorded_scores_evaluate_reproduces(checkpoint, tmp_path, capsys):
    shipped = tmp_path / "model.pt"
    assert export.main([str(checkpoint), str(shipped), "--beam", "3", "--min-length", "2", "--length-penalty", "average", "--no-progress"]) == 0
    capsys.readouterr()
    saved = load_checkpoint(shipped)
    assert saved.optimizer == {} and len(saved.data_order) == 0
    floats = [v for v in saved.model.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert shipped.stat().st_size < checkpoint.stat().st_size / 2  # no optimizer, half the bytes per weight
    assert saved.config["decode"]["beam_size"] == 3 and saved.config["decode"]["min_length"] == 2
    assert saved.config["decode"]["length_penalty"] == "average"
    recorded = saved.extra["test_scores"]
    printed = _run(["--checkpoint", str(shipped), "--split", "test"], capsys)  # the recorded settings, METEOR on
    assert printed == recorded  # exactly: the scores were measured on the exported weights
    model, _, config = load_captioner(shipped)
    assert next(model.parameters()).dtype == torch.float32 and config.decode.min_length == 2


def test_an_interrupted_export_leaves_the_model_file_there_as_it_was(checkpoint, tmp_path, capsys, monkeypatch):
    shipped = tmp_path / "model.pt"
    assert export.main([str(checkpoint), str(shipped), "--no-progress", "--split", "val"]) == 0
    before = shipped.read_bytes()

    def interrupted(*args, **kwargs):  # Ctrl-C while the new file's scores are measured
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "evaluate_model", interrupted)
    assert export.main([str(checkpoint), str(shipped), "--no-progress", "--split", "test", "--beam", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: interrupted (Ctrl-C or SIGTERM)"
    assert shipped.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_records_the_fingerprint_of_a_prefix_that_reproduces_the_cache(checkpoint, tmp_path, capsys, monkeypatch):
    stale = tmp_path / "stale.pt"  # a checkpoint whose fingerprint an older sca-caption computed otherwise
    old = load_checkpoint(checkpoint)
    save_checkpoint(stale, replace(old, model={**old.model, "encoder.prefix_fingerprint": torch.zeros(32, dtype=torch.uint8)}))
    with pytest.raises(CheckpointError, match="is not the backbone its features came from.*sca_caption.export"):
        ImageCaptioner.from_checkpoint(stale)
    shipped = tmp_path / "model.pt"
    assert export.main([str(stale), str(shipped), "--no-progress", "--split", "val"]) == 0
    capsys.readouterr()
    ImageCaptioner.from_checkpoint(shipped)  # the fingerprint the caption tool checks is recorded

    def other_weights(name: str, weights: str):  # a prefix that does not compute the cached features
        return real_build(name, "none" if weights != "none" else "imagenet")

    real_build = export.build_cache_backbone
    monkeypatch.setattr(export, "build_cache_backbone", other_weights)
    assert export.main([str(stale), str(tmp_path / "refused.pt"), "--no-progress", "--split", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built here, does not reproduce the feature cache" in err[0] and "at stage7" in err[0]
    assert not (tmp_path / "refused.pt").exists()
