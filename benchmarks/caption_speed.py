"""Captioning speed end to end on Flickr8k photos: decoding, backbone prefix, beam search, output.

Captions the first N images of Flicker8k_Dataset/ (sorted, as the CLI orders a folder) with the
library behind ``python -m sca_caption.caption``, writing its stdout lines to /dev/null, and prints
one JSON line per batch size: ``images_per_s`` over the captioning (model loading excluded and
reported as ``load_s``), the mean caption length, threads, workers and the decoding settings (the
checkpoint's, with ``--beam`` if given). Target: >= 25 images/s for
1,000 images at beam 5 on the 2-core CPU machine.

Without --checkpoint (or when checkpoints/shapes/best.pt is absent) the model is the shapes
config's with random weights (``"trained": false``; ``--random-model flickr8k``: the flickr8k
config's, with a vocabulary of Flickr8k's size): same sizes, but its captions often run to the
length limit, so it decodes more steps than a trained model would.

    python benchmarks/caption_speed.py --n 1000 --batch-sizes 16 32 --workers 2 --beam 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from sca_caption.captioning import CaptionedImage, DecodeSettings, ImageCaptioner, collect_images
from sca_caption.checkpoint import Checkpoint, capture_rng_state, save_checkpoint
from sca_caption.config import load_config
from sca_caption.data.vocab import SPECIALS
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.models.backbones.base import freeze
from sca_caption.models.captioner import SCACaptioner

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k"
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "shapes" / "best.pt"
RANDOM_VOCAB = {"shapes": 33, "flickr8k": 2539}  # the vocabularies' sizes (Flickr8k: train split, min count 5)


def random_checkpoint(path: Path, config_name: str = "shapes") -> Path:
    """A checkpoint of config ``config_name``'s model with random weights (seed 0) and a
    vocabulary of that dataset's size."""
    config = load_config(config_name)
    vocab = [*SPECIALS, *(f"w{i}" for i in range(RANDOM_VOCAB[config_name] - len(SPECIALS)))]
    torch.manual_seed(0)
    backbone = freeze(build_cache_backbone(config.model.backbone, config.data.backbone_weights))
    model = SCACaptioner(config.model, len(vocab), backbone)
    save_checkpoint(
        path,
        Checkpoint(
            model=model.state_dict(), optimizer={}, epoch=0, step=0, data_order=torch.arange(1),
            data_position=0, rng=capture_rng_state(), config=config.to_dict(), vocab=vocab,
        ),
    )
    return path


def run(captioner: ImageCaptioner, paths: list[Path], settings: DecodeSettings, batch_size: int, workers: int) -> dict:
    """Caption ``paths`` once, lines to /dev/null; the timing and caption statistics."""
    words = captioned = 0
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        for result in captioner.caption_files(paths, settings, batch_size=batch_size, workers=workers):
            if isinstance(result, CaptionedImage):
                best = result.captions[0]
                sink.write(f"{result.path}\t{best.text}\n")
                words += len(best.words)
                captioned += 1
    seconds = time.perf_counter() - start
    return {
        "images": len(paths),
        "captioned": captioned,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(paths) / seconds, 2),
        "mean_words": round(words / max(captioned, 1), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images to caption (default 1000)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="Flickr8k folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"default {DEFAULT_CHECKPOINT} if present")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the checkpoint's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-model", choices=sorted(RANDOM_VOCAB), default="shapes",
                        help="the config of the random model used without a checkpoint (default shapes)")
    args = parser.parse_args()

    paths = collect_images([str(args.data_root / "Flicker8k_Dataset")])[: args.n]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or (DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None)
        trained = checkpoint is not None
        if checkpoint is None:
            checkpoint = random_checkpoint(Path(scratch) / "random.pt", args.random_model)
        start = time.perf_counter()
        captioner = ImageCaptioner.from_checkpoint(checkpoint, device=args.device)
        load_s = time.perf_counter() - start
        settings = captioner.settings(beam_size=args.beam)  # the rest as the checkpoint records them
        for batch_size in args.batch_sizes:
            result = run(captioner, paths, settings, batch_size, args.workers)
            print(json.dumps({
                "benchmark": "caption_speed", "checkpoint": str(checkpoint) if trained else f"random {args.random_model} model",
                "trained": trained, "decode": dataclasses.asdict(settings), "batch_size": batch_size, "workers": args.workers,
                "threads": torch.get_num_threads(), "device": args.device, "load_s": round(load_s, 3), **result,
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
