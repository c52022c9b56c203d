"""Turn a training checkpoint into a model file to ship: float16 weights, no optimizer state, and
its test scores recorded in it (measured on the exported float16 weights, as the file loads them,
so that `evaluate` on the file reproduces them exactly). The file is written once, when its scores
are known: an interrupted export leaves the file already at OUT as it was.

    python -m sca_caption.export runs/f8k_cs/best.pt checkpoints/flickr8k_cs_lite0.pt
    python -m sca_caption.export CKPT OUT --beam 3 --min-length 2 --split test

The decoding settings written into the file (``config.decode``, the training run's unless changed
here) are what `evaluate`, `caption` and the service use unless told otherwise. The scores are
measured on the feature cache, the captions of `caption` and the service on a backbone prefix built
anew: so export first builds that prefix as `caption` does and checks that it reproduces the
cache's features on a few images of the split, then records its fingerprint in the file (which
`caption` checks). A prefix that does not reproduce the cache is refused in one line. The file stays a
checkpoint of the same format (``sca_caption.checkpoint``), loadable with ``load_captioner``; it
cannot resume training. ``extra`` holds ``test_scores`` (0-1 scale), ``test_split`` and the
source checkpoint's epoch and step.
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from sca_caption.checkpoint import CHECKPOINT_FILE, Checkpoint, CheckpointError, captioner_from, load_checkpoint, save_checkpoint
from sca_caption.config import ExperimentConfig
from sca_caption.data.corpus import SPLITS, ImageRecord, records_in_split
from sca_caption.data.features import FeatureCache
from sca_caption.data.images import load_image
from sca_caption.decode_options import add_decode_options, decode_changes
from sca_caption.decoding import changed
from sca_caption.errors import command
from sca_caption.evaluation import evaluate_model
from sca_caption.io_utils import check_output_file
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.models.backbones.base import freeze
from sca_caption.prepare import corpus_and_features, data_root

CHECKED_IMAGES = 8  # images of the split on which the rebuilt prefix must reproduce the cache
TOLERANCE = 1e-2  # rtol and atol against the cache's float16 rows (other weights differ by far more)


def slim(checkpoint: Checkpoint, decode_changes: dict[str, object]) -> Checkpoint:
    """``checkpoint`` with float16 weights, no optimizer or data order, and ``decode_changes``
    (None values change nothing) in its decoding settings."""
    config = ExperimentConfig.from_dict(checkpoint.config)
    config = dataclasses.replace(config, decode=changed(config.decode, decode_changes))
    weights = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint.model.items()}
    source = {"source_epoch": checkpoint.epoch, "source_step": checkpoint.step}
    return dataclasses.replace(
        checkpoint, model=weights, optimizer={}, data_order=torch.zeros(0, dtype=torch.long), data_position=0,
        config=config.to_dict(), extra=source,
    )


def reproduced_fingerprint(
    config: ExperimentConfig, records: Sequence[ImageRecord], cache: FeatureCache, split: str, source: Path
) -> bytes:
    """The fingerprint of the backbone prefix ``config`` names, built as the caption tool builds
    it, once it has reproduced the feature ``cache``'s rows of the first ``CHECKED_IMAGES`` cached
    images of ``split`` of the corpus ``records`` (a ``CheckpointError`` naming ``source`` otherwise)."""
    cached = set(cache.image_ids)
    chosen = [r for r in records_in_split(records, split) if r.image_id in cached][:CHECKED_IMAGES]
    if not chosen:
        raise CheckpointError(f"{source}: no image of the {split} split is in the feature cache {cache.path}")
    backbone = freeze(build_cache_backbone(config.model.backbone, config.data.backbone_weights))
    prefix, _ = backbone.split(config.model.layers)
    images = torch.stack([load_image(r.path, backbone.input_size) for r in chosen])
    with torch.inference_mode():
        rebuilt = {tap: x.to(torch.float16).float() for tap, x in prefix(images).items()}
    stored = cache.read_batch([cache.index_of(r.image_id) for r in chosen])
    for tap, x in rebuilt.items():
        if not torch.allclose(x, stored[tap], rtol=TOLERANCE, atol=TOLERANCE):
            difference = float((x - stored[tap]).abs().max())
            raise CheckpointError(
                f"{source}: {config.model.backbone} with weights {config.data.backbone_weights!r}, built here, does not "
                f"reproduce the feature cache {cache.path} at {tap} (max |difference| {difference:.3g} on "
                f"{len(chosen)} images of {data_root(config)}): captions would not match the recorded scores"
            )
    return prefix.fingerprint()


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sca_caption.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a best.pt of a training run")
    parser.add_argument("out", type=Path, help="the model file to write")
    parser.add_argument("--split", choices=SPLITS, default="test", help="the split whose scores are recorded")
    add_decode_options(parser, default="recorded as the training run had it")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    check_output_file(args.out, "model file", inputs={args.checkpoint: "the checkpoint to export"}, replaces=CHECKPOINT_FILE)
    exported = slim(load_checkpoint(args.checkpoint), decode_changes(args))
    config = ExperimentConfig.from_dict(exported.config, source=str(args.checkpoint))
    if args.data_root is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_root=str(args.data_root)))
    records, cache = corpus_and_features(config, args.split, progress=not args.no_progress)
    fingerprint = reproduced_fingerprint(config, records, cache, args.split, args.checkpoint)
    fingerprint_tensor = torch.frombuffer(bytearray(fingerprint), dtype=torch.uint8)
    exported = dataclasses.replace(exported, model={**exported.model, "encoder.prefix_fingerprint": fingerprint_tensor})
    model, vocab, _ = captioner_from(exported, args.checkpoint)  # the float16 weights, as the file will load them
    evaluation = evaluate_model(
        model, vocab, config, records, cache, args.split, device=torch.device("cpu"), progress=not args.no_progress
    )
    extra = {**exported.extra, "test_split": args.split, "test_scores": evaluation.scores}
    save_checkpoint(args.out, dataclasses.replace(exported, extra=extra))
    size = args.out.stat().st_size / 2**20
    print(f"{args.out}: {size:.1f} MiB, float16 weights; {args.split} scores recorded:")
    print(json.dumps(evaluation.scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
