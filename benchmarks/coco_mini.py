"""A checkpoint's captions of the 80 COCO photos of ``coco-mini`` (no Flickr8k model saw them),
scored against their COCO references with the checkpoint's recorded decoding: one JSON line.

    python benchmarks/coco_mini.py [CHECKPOINT ...] [--data ../shared/data/coco-mini] [--meteor]

CHECKPOINT defaults to the shipped model (checkpoints/flickr8k_cs_lite0.pt). Issue #27 asks that
a new shipped model keep this CIDEr at or above the old one's (30.5).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sca_caption.captioning import CaptionedImage, ImageCaptioner, shipped_checkpoint
from sca_caption.data.coco import read_coco_captions
from sca_caption.metrics import score_captions


def coco_mini(root: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Each image id's file and its reference captions (``read_coco_captions``, the project's reader)."""
    records = read_coco_captions(root / "annotations" / "captions_train2017.json", root / "train2017", "train")
    return {r.image_id: r.path for r in records}, {r.image_id: list(r.raw) for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco-mini")
    parser.add_argument("--meteor", action="store_true", help="METEOR too (a ~6 s Java start)")
    args = parser.parse_args()
    files, references = coco_mini(args.data)
    ids = sorted(files)
    for path in args.checkpoints or [shipped_checkpoint()]:
        captioner = ImageCaptioner.from_checkpoint(path)
        results = list(captioner.caption_files([files[i] for i in ids], captioner.settings(), workers=0))
        captions = {i: r.captions[0].text for i, r in zip(ids, results) if isinstance(r, CaptionedImage)}
        scores = dict(score_captions(captions, {i: references[i] for i in ids}, meteor=args.meteor, spice=False))
        print(json.dumps({"benchmark": "coco_mini", "checkpoint": str(path), "images": len(captions),
                          **{k: round(float(v) * 100, 1) for k, v in scores.items()}}), flush=True)


if __name__ == "__main__":
    main()
