"""Feature cache read speed: random batches from an HDF5 cache, as a training loop asks for them.

    python benchmarks/cache_read_speed.py --images 8091 --batch-size 64 --batches 200
    python benchmarks/cache_read_speed.py --cache features/flickr8k_lite0.h5

Without ``--cache`` it writes a synthetic cache in the extractor's layout (one float16 tap of
320 x 7 x 7, one image per chunk) to a temporary folder. Prints JSON lines: images per second for
``read_batch`` on random batches and for single-image ``cache[i]`` reads (target >= 5000/s).
The file is read once first, so the figures are for a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from sca_caption.data.features import TAPS_GROUP, CacheSpec, FeatureCache

TARGET = 5000


def write_synthetic_cache(path: Path, images: int, shape: tuple[int, int, int] = (320, 7, 7)) -> None:
    """A complete cache of random float16 features in the layout ``extract_features`` writes."""
    rng = np.random.default_rng(0)
    spec = CacheSpec("synthetic", "-", "efficientnet_lite0", ("stage7",), "synthetic")
    with h5py.File(path, "w") as f:
        tap = f.create_dataset(f"{TAPS_GROUP}/stage7", shape=(images, *shape), dtype=np.float16, chunks=(1, *shape))
        for s in range(0, images, 512):
            tap[s : s + 512] = rng.standard_normal((min(512, images - s), *shape), dtype=np.float32)
        text = h5py.string_dtype()
        f.create_dataset("image_ids", data=np.array([f"img{i:06d}" for i in range(images)], dtype=object), dtype=text)
        f.create_dataset("skipped_ids", shape=(0,), dtype=text)
        f.create_dataset("skipped_problems", shape=(0,), dtype=text)
        f.attrs.update(spec.attrs())
        f.attrs.update(taps=json.dumps(["stage7"]), input_size=224, complete=True)


def throughput(cache: FeatureCache, batch_size: int, batches: int, single: bool) -> float:
    """Images per second over ``batches`` random batches (without repeats inside a batch)."""
    rng = np.random.default_rng(1)
    picks = [rng.choice(len(cache), size=min(batch_size, len(cache)), replace=False) for _ in range(batches)]
    start = time.perf_counter()
    for rows in picks:
        if single:
            for i in rows.tolist():
                cache[i]
        else:
            cache.read_batch(rows.tolist())
    return sum(len(rows) for rows in picks) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="an existing cache (default: write a synthetic one)")
    parser.add_argument("--images", type=int, default=8091, help="size of the synthetic cache")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = args.cache
        if path is None:
            path = Path(folder) / "synthetic.h5"
            write_synthetic_cache(path, args.images)
        path.read_bytes()  # warm the page cache
        cache = FeatureCache(path)
        common = {
            "cache": str(args.cache or "synthetic"),
            "images": len(cache),
            "taps": {t: list(s) for t, s in cache.shapes.items()},
            "batch_size": args.batch_size,
            "target_img_per_s": TARGET,
        }
        for name, single in (("read_batch_random", False), ("getitem_random", True)):
            rate = throughput(cache, args.batch_size, args.batches, single)
            print(json.dumps({"benchmark": name, **common, "img_per_s": round(rate, 1)}), flush=True)
        cache.close()


if __name__ == "__main__":
    main()
