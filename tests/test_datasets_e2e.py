"""COCO and Flickr30k end to end on real images, each through its own reader: prepare (vocabulary,
feature cache) -> train (a tiny model, one epoch) -> evaluate -> caption, all by the CLIs.

COCO: the 80 images of ../shared/data/coco-mini in the official 2017 annotation layout, 64 in
``captions_train2017.json`` and 16 in ``captions_val2017.json`` (the val split also serves as the
test split, as COCO's official splits have no test captions). Flickr30k: a small
``dataset_flickr30k.json`` in Karpathy's format over 32 Flickr8k images (24/4/4)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sca_caption.data.features import FeatureCache
from train_support import run_train, subprocess_env

pytestmark = pytest.mark.slow

TINY = [  # a few seconds of training: Lite0 stage7, tiny widths, one epoch, beam 2, no METEOR
    "model.backbone=efficientnet_lite0", "model.layers=[stage7]", "model.hidden_dim=32", "model.attention_dim=16",
    "model.embed_dim=16", "data.batch_size=32", "data.num_workers=0", "data.min_count=2", "train.epochs=1",
    "train.warmup_steps=0", "train.meteor=false", "decode.beam_size=2", "train.bf16=false",
    "train.checkpoint_every=null", "train.log_every=1000",
]


def _coco_root(source: Path, root: Path) -> list[int]:
    """COCO's official layout in ``root`` from coco-mini's train annotations: every fifth image
    (by id) moved to val2017; the images are symbolic links. Returns the val image ids."""
    data = json.loads((source / "annotations" / "captions_train2017.json").read_text())
    val = set(sorted(image["id"] for image in data["images"])[::5])
    (root / "annotations").mkdir(parents=True)
    for split, in_val in (("train", False), ("val", True)):
        images = [image for image in data["images"] if (image["id"] in val) == in_val]
        ids = {image["id"] for image in images}
        annotations = [a for a in data["annotations"] if a["image_id"] in ids]
        subset = {"info": data["info"], "licenses": data["licenses"], "images": images, "annotations": annotations}
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(subset))
        folder = root / f"{split}2017"
        folder.mkdir()
        for image in images:
            (folder / image["file_name"]).symlink_to(source / "train2017" / image["file_name"])
    return sorted(val)


def _flickr30k_root(flickr8k: Path, root: Path) -> dict[str, list[str]]:
    """A Karpathy-format ``dataset_flickr30k.json`` in ``root`` over the first 24/4/4 Flickr8k
    train/val/test images (linked into ``flickr30k-images/``); returns the file names by split."""
    source = json.loads((flickr8k / "dataset_flickr8k.json").read_text())
    counts = {"train": 24, "val": 4, "test": 4}
    chosen = {split: [e for e in source["images"] if e["split"] == split][:count] for split, count in counts.items()}
    images = root / "flickr30k-images"
    images.mkdir(parents=True)
    entries = []
    for split_entries in chosen.values():
        for entry in split_entries:
            (images / entry["filename"]).symlink_to(flickr8k / "Flicker8k_Dataset" / entry["filename"])
            entries.append({k: entry[k] for k in ("filename", "imgid", "sentences", "split", "sentids")})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return {split: [e["filename"] for e in entries] for split, entries in chosen.items()}


def _cli(module: str, *args: str, cwd: Path) -> str:
    """``python -m MODULE ARGS`` on the CPU, one thread; its stdout (fails the test if it fails)."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--device", "cpu", "--no-progress", *args],
        cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _chain(dataset: str, root: Path, cache: Path, tmp_path: Path, split: str, *settings: str) -> list[dict]:
    """Train (preparing first), evaluate best.pt on ``split`` and check what each wrote; returns
    the evaluation's results file."""
    trained = run_train("--dataset", dataset, "--out", "run", *TINY, f"data.data_root={root}",
                        f"data.feature_cache={cache}", *settings, cwd=tmp_path).stdout
    assert re.search(rf"{dataset}_vocab_min2_[0-9a-f]{{8}}\.json: vocabulary of", trained)
    assert "extracting efficientnet_lite0 features of" in trained
    run = tmp_path / "run"
    assert {"best.pt", "last.pt", "log.csv", "test_scores.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert len((run / "log.csv").read_text().splitlines()) == 2  # header and the one epoch
    assert "CIDEr" in json.loads((run / "test_scores.json").read_text())

    evaluated = _cli("sca_caption.evaluate", "--checkpoint", str(run / "best.pt"), "--split", split, "--beam", "2",
                     "--no-meteor", "--out", str(tmp_path / "results.json"), cwd=tmp_path)
    scores = json.loads(evaluated.strip().splitlines()[-1])
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= scores.keys() and all(0 <= v <= 10 for v in scores.values())
    return json.loads((tmp_path / "results.json").read_text())


def _captioned(tmp_path: Path, folder: Path) -> tuple[list[list[str]], list[dict]]:
    """Caption every image of ``folder`` with the run's best.pt: the printed lines and the JSON."""
    out = _cli("sca_caption.caption", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--beam", "2",
               "--workers", "0", "--json", str(tmp_path / "captions.json"), str(folder), cwd=tmp_path)
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert all(len(line) == 2 and line[1].strip() for line in lines)
    return lines, json.loads((tmp_path / "captions.json").read_text())


def test_coco_official_layout_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    root, cache = tmp_path / "coco", tmp_path / "features" / "coco.h5"
    val_ids = _coco_root(shared_data / "coco-mini", root)
    assert len(val_ids) == 16
    results = _chain("coco", root, cache, tmp_path, "val", "data.test_split=val")
    features = FeatureCache(cache)
    assert len(features) == 80 and set(features.image_ids) >= {str(i) for i in val_ids}
    assert sorted(r["image_id"] for r in results) == val_ids  # COCO's numeric ids, as ints
    assert all(r["caption"].strip() for r in results)

    lines, entries = _captioned(tmp_path, root / "val2017")
    assert [Path(path).parent for path, _ in lines] == [root / "val2017"] * 16
    assert sorted(e["image_id"] for e in entries) == val_ids  # the number in each COCO file name


def test_flickr30k_karpathy_format_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    root, cache = tmp_path / "flickr30k", tmp_path / "features" / "flickr30k.h5"
    names = _flickr30k_root(shared_data / "flickr8k", root)
    results = _chain("flickr30k", root, cache, tmp_path, "test")
    features = FeatureCache(cache)
    assert len(features) == 32 and features.spec.dataset == "flickr30k"
    assert sorted(r["image_id"] for r in results) == sorted(Path(n).stem for n in names["test"])

    lines, entries = _captioned(tmp_path, root / "flickr30k-images")
    assert sorted(Path(path).name for path, _ in lines) == sorted(n for split in names.values() for n in split)
    assert len(entries) == 32
