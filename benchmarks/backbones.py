"""Size, cost and CPU speed of every registered backbone: one JSON line per backbone.

    python benchmarks/backbones.py                          # all backbones, 224 px, batch 8
    python benchmarks/backbones.py --backbones resnet50 --iterations 1 --warmup 0
    python benchmarks/backbones.py --backbones timm:tf_efficientnet_lite0 timm:resnet50

Each line: parameters of the tapped stages (no classifier head), multiply-adds per image
(``sca_caption.models.complexity``) and images per second of the full tapped forward (every tap)
under ``torch.inference_mode``, timed in both memory formats; ``images_per_s`` and
``memory_format`` give the faster one. Weights are random (speed and counts do not depend on them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sca_caption.models.backbones import TappedBackbone, build_backbone, check_backbone_name, list_backbones
from sca_caption.models.backbones.base import freeze
from sca_caption.models.complexity import count_macs, count_parameters

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def images_per_second(backbone: TappedBackbone, images: torch.Tensor, warmup: int, iterations: int) -> float:
    """Throughput of ``backbone`` on normalised ``images`` (B, 3, H, W), after ``warmup`` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            backbone(images)
        start = time.perf_counter()
        for _ in range(iterations):
            backbone(images)
        elapsed = time.perf_counter() - start
    return images.shape[0] * iterations / elapsed


def measure(name: str, size: int, batch: int, warmup: int, iterations: int) -> dict[str, object]:
    """One JSON-ready record for backbone ``name`` at ``size`` px."""
    torch.manual_seed(0)
    backbone = freeze(build_backbone(name, weights=None))
    one = backbone.normalization(torch.rand(1, 3, size, size))
    record: dict[str, object] = {
        "backbone": name,
        "size": size,
        "params": count_parameters(backbone.stages),  # a classifier head some backbones keep is left out
        "macs": count_macs(backbone, one),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "iterations": iterations,
    }
    images = backbone.normalization(torch.rand(batch, 3, size, size))
    speeds = {}
    for label, memory_format in FORMATS.items():
        backbone.to(memory_format=memory_format)
        speeds[label] = images_per_second(backbone, images.contiguous(memory_format=memory_format), warmup, iterations)
    best = max(speeds, key=speeds.__getitem__)
    record.update(images_per_s=round(speeds[best], 2), memory_format=best)
    record["images_per_s_by_format"] = {label: round(speed, 2) for label, speed in speeds.items()}
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones", nargs="+", type=check_backbone_name, default=list_backbones(), help="names, timm:<model> too"
    )
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per memory format")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per memory format")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if min(args.size, args.batch, args.iterations) < 1 or args.warmup < 0:
        parser.error("--size, --batch and --iterations must be positive and --warmup non-negative")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in args.backbones:
        print(json.dumps(measure(name, args.size, args.batch, args.warmup, args.iterations)), flush=True)


if __name__ == "__main__":
    main()
