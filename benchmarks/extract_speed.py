"""Feature extraction speed: the bare backbone prefix on preloaded tensors vs the whole extractor.

    python benchmarks/extract_speed.py --images 2000 --batch-size 32 --workers 2

Prints JSON lines: the prefix's forward throughput on images already decoded into memory (the
first ``--bare-images``; throughput does not depend on the count), the end-to-end throughput of
``extract_features`` (backbone build, decoding in workers, forward, part files, merge) on the
first ``--images`` Flickr8k images, and their ratio (target >= 0.85). One-time costs (about a
second) weigh less the more images the end-to-end run gets.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sca_caption.data.corpus import images_hash
from sca_caption.data.datasets import load_corpus
from sca_caption.data.feature_extraction import extract_features
from sca_caption.data.features import CacheSpec
from sca_caption.data.images import load_image
from sca_caption.models.backbones import build_backbone
from sca_caption.models.backbones.base import freeze

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def bare_forward(backbone: str, layers: list[str], images: torch.Tensor, batch_size: int) -> float:
    """Images per second of the prefix alone over preloaded (N, 3, S, S) images (one warm-up batch)."""
    prefix, _ = freeze(build_backbone(backbone)).split(layers)
    with torch.inference_mode():
        prefix(images[:batch_size])
        start = time.perf_counter()
        for s in range(0, len(images), batch_size):
            prefix(images[s : s + batch_size])
        return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=FLICKR8K)
    parser.add_argument("--images", type=int, default=2000, help="images for the end-to-end run")
    parser.add_argument("--bare-images", type=int, default=256, help="images preloaded for the bare forward")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["stage7"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    records = load_corpus("flickr8k", args.data_root)[: args.images]
    size = build_backbone(args.backbone, weights=None).input_size
    images = torch.stack([load_image(r.path, size) for r in records[: args.bare_images]])
    common = {
        "backbone": args.backbone,
        "layers": args.layers,
        "images": len(records),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
    }
    bare = bare_forward(args.backbone, args.layers, images, args.batch_size)
    preloaded = {**common, "images": len(images), "img_per_s": round(bare, 1)}
    print(json.dumps({"benchmark": "bare_forward_preloaded", **preloaded}), flush=True)

    spec = CacheSpec("flickr8k", str(args.data_root), args.backbone, tuple(args.layers), images_hash(records))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        out = Path(folder) / "features.h5"
        extract_features(records, spec, out, batch_size=args.batch_size, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
    end_to_end = len(records) / seconds
    timing = {"workers": args.workers, "seconds": round(seconds, 2), "img_per_s": round(end_to_end, 1)}
    print(json.dumps({"benchmark": "extract_end_to_end", **common, **timing}), flush=True)
    ratio = {"ratio": round(end_to_end / bare, 3), "target": 0.85}
    print(json.dumps({"benchmark": "extract_vs_bare", **common, **ratio}), flush=True)


if __name__ == "__main__":
    main()
