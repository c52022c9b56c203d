"""Feature extraction with one process or several under torchrun: images/s of ``extract_features``.

    python benchmarks/extract_processes.py --images 480 --workers 1
    torchrun --standalone --nproc_per_node 2 benchmarks/extract_processes.py --images 480 --workers 1

Rank 0 prints one JSON line: the processes, torch threads per process (torchrun gives each one
thread unless OMP_NUM_THREADS is set), decoding workers per process, and the seconds from the
moment every process is ready to the finished cache (backbone build, decoding, forward, part
files, merge) for the first ``--images`` Flickr8k images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sca_caption.data.corpus import images_hash
from sca_caption.data.datasets import load_corpus
from sca_caption.data.feature_extraction import EXTRACTION_BATCH, extract_features
from sca_caption.data.features import CacheSpec
from sca_caption.distributed import start_processes, stop_processes

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=FLICKR8K)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=["stage7"])
    parser.add_argument("--batch-size", type=int, default=EXTRACTION_BATCH)
    parser.add_argument("--workers", type=int, default=1, help="decoding workers per process")
    parser.add_argument("--out", type=Path, default=Path("/tmp/extract_processes.h5"), help="the cache (deleted after)")
    args = parser.parse_args()

    processes = start_processes("cpu")
    records = load_corpus("flickr8k", args.data_root)[: args.images]
    spec = CacheSpec("flickr8k", str(args.data_root), args.backbone, tuple(args.layers), images_hash(records))
    if processes.is_main:
        args.out.unlink(missing_ok=True)
    processes.barrier()
    start = time.perf_counter()
    extract_features(
        records, spec, args.out, batch_size=args.batch_size, workers=args.workers, progress=False, processes=processes
    )
    seconds = time.perf_counter() - start
    if processes.is_main:
        args.out.unlink()
    stop_processes(processes)
    if processes.is_main:
        line = {
            "benchmark": "extract_processes",
            "backbone": args.backbone,
            "layers": args.layers,
            "images": len(records),
            "batch_size": args.batch_size,
            "processes": processes.world,
            "threads_per_process": torch.get_num_threads(),
            "workers_per_process": args.workers,
            "seconds": round(seconds, 2),
            "img_per_s": round(len(records) / seconds, 1),
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
