"""Extract frozen backbone-prefix features of a caption corpus into an HDF5 cache (resumable).

    python preprocess/extract_features.py --dataset flickr8k --data-root data/flickr8k \\
        --backbone efficientnet_lite0 --layers stage5 stage6 stage7 --out features/flickr8k_lite0.h5
    torchrun --standalone --nproc_per_node 4 preprocess/extract_features.py ...   # 4 processes share the images

Killed at any moment, the same command continues where it stopped (with any number of processes);
the finished file equals an uninterrupted single-process run's. The cache stores the taps the
backbone prefix outputs for the attended ``--layers`` (the lowest one plus any earlier tap a later
stage reads). Under torchrun each process computes every N-th batch on the CPU and rank 0 merges.
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import sys
from pathlib import Path

from sca_caption.data.corpus import ImageRecord, images_hash
from sca_caption.data.datasets import CORPORA, default_data_root, load_corpus
from sca_caption.data.errors import ON_BAD_CHOICES, BadInputReport
from sca_caption.data.feature_extraction import EXTRACTION_BATCH, extract_features
from sca_caption.data.features import CacheSpec
from sca_caption.distributed import start_processes, stop_processes
from sca_caption.errors import Interrupted, command
from sca_caption.io_utils import check_output_file
from sca_caption.models.backbones import check_backbone_name, list_backbones


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=CORPORA)
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder (default: data/<dataset>)")
    parser.add_argument(
        "--backbone", required=True, help=f"one of {', '.join(list_backbones())}, or timm:<model> for any timm model"
    )
    parser.add_argument("--weights", default="imagenet", help='"imagenet", "none" (random init) or a state dict path')
    parser.add_argument("--layers", nargs="+", required=True, help="attended taps, lowest first: stage5 stage6 stage7")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images in corpus order")
    parser.add_argument("--batch-size", type=int, default=EXTRACTION_BATCH, help="images per forward (small batches stay in CPU cache)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (per process)")
    parser.add_argument(
        "--on-bad-image", choices=ON_BAD_CHOICES, default="error", help="stop at an unreadable image, or skip it"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be positive, --workers not negative")
    try:
        check_backbone_name(args.backbone)
    except ValueError as err:
        parser.error(str(err))
    return args


def extraction_inputs(args: argparse.Namespace) -> tuple[list[ImageRecord], CacheSpec]:
    """The corpus the arguments name (cut to ``--limit``) and the spec of its cache."""
    data_root = args.data_root if args.data_root is not None else default_data_root(args.dataset)
    records = load_corpus(args.dataset, data_root)
    records = records[: args.limit] if args.limit is not None else records
    spec = CacheSpec(
        dataset=args.dataset,
        data_root=str(data_root),
        backbone=args.backbone,
        layers=tuple(args.layers),
        images_hash=images_hash(records),
        weights=args.weights,
        limit=args.limit,
    )
    return records, spec


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_file(args.out, "feature cache")
    processes = start_processes("cpu")
    report = BadInputReport()
    try:
        records, spec = processes.main_first(lambda: extraction_inputs(args))  # shapes is generated once
        result = extract_features(
            records,
            spec,
            args.out,
            batch_size=args.batch_size,
            workers=args.workers,
            on_bad=args.on_bad_image,
            report=report,
            processes=processes,
        )
    except KeyboardInterrupt:
        parts = args.out.with_name(args.out.name + ".parts")
        raise Interrupted(f"{args.out}: extraction interrupted; its finished parts in {parts} are kept: "
                          "the same command continues") from None
    finally:
        stop_processes(processes)
    if not processes.is_main:
        return 0
    state = "already complete" if result.already_complete else "written"
    print(f"{result.out}: {state}, {result.images} images, {len(result.skipped)} skipped")
    if result.skipped:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
