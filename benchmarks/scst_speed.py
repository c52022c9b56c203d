"""Cost of a self-critical training step against a cross-entropy step, per image.

Prints JSON lines: one per step kind on random cached features and a random CIDEr-D reference set,
with the captioner of ``--setting`` (``common.SETTINGS``; ``f8k``: configs/flickr8k.yaml's CPU sizes):

- ``cross_entropy``: the trainer's own step (``phases.cross_entropy_step``) on ``--batch``
  captions of ``--steps`` words;
- ``self_critical`` (per variant): the trainer's own step (``phases.SelfCriticalPhase.step``) on
  ``--images`` images (default ``--batch``; ``train.scst_images``), ``--samples`` sampled captions
  each of up to ``--steps`` + 1 tokens, their CIDEr-D rewards, the baseline, the policy loss and
  the optimizer step. Variants: the greedy and the mean baseline with teacher-forced
  log-probabilities; the mean baseline with the sampling pass's (``train.scst_log_probs=sample``);
  the mean baseline with the five references' cross-entropy mixed in (``train.scst_xe_weight``).

Per image: a cross-entropy epoch trains every image's five captions, a self-critical epoch every
image once with its samples, so ``seconds_per_image_epoch`` is 5 × the per-caption time for
cross-entropy and the per-image time for self-critical training; ``ratio_to_cross_entropy``
compares those. ``seconds_per_sample`` compares one sampled caption with one teacher-forced one;
``step_ratio_per_image`` a self-critical step's seconds per image with a cross-entropy step's per
caption (issue #27's target: at most 3).

Usage: python benchmarks/scst_speed.py [--setting f8k] [--batch 64] [--images 10] [--samples 5]
       [--steps 16] [--vocab 2539] [--iterations 5] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from common import SETTINGS, Setting, build_captioner, median_seconds
from sca_caption.config import DataConfig, ExperimentConfig, TrainConfig
from sca_caption.data.caption_dataset import CaptionBatch, ImageBatch
from sca_caption.data.vocab import Vocab
from sca_caption.distributed import ONE_PROCESS
from sca_caption.rewards import CiderD, DocumentFrequency
from sca_caption.optimization import make_optimizer
from sca_caption.phases import SelfCriticalPhase, cross_entropy_step

CAPTIONS_PER_IMAGE = 5
F8K = Setting("efficientnet_lite0", ("stage7",), 128, 384, 256)  # configs/flickr8k.yaml
VARIANTS: list[dict[str, object]] = [  # train.scst_* settings of each self-critical row
    {"scst_baseline": "greedy", "scst_log_probs": "teacher", "scst_xe_weight": 0.0},
    {"scst_baseline": "mean", "scst_log_probs": "teacher", "scst_xe_weight": 0.0},
    {"scst_baseline": "mean", "scst_log_probs": "sample", "scst_xe_weight": 0.0},
    {"scst_baseline": "mean", "scst_log_probs": "teacher", "scst_xe_weight": 0.5},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="f8k", help="f8k or one of " + ", ".join(SETTINGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=None, help="images per self-critical step (default --batch)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2539)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    setting = F8K if args.setting == "f8k" else SETTINGS[args.setting]

    torch.manual_seed(0)
    model = build_captioner(setting, "cs", args.vocab).train()
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(args.vocab - 4))])
    images = args.images or args.batch
    pool = {name: torch.rand(max(args.batch, images), 320, 7, 7) for name in model.feature_names}
    features = {name: x[: args.batch] for name, x in pool.items()}
    captions = torch.randint(4, args.vocab, (args.batch, args.steps + 1))
    captions[:, 0] = vocab.start
    references = [[torch.randint(4, args.vocab, (11,)).tolist() for _ in range(5)] for _ in range(args.batch)]
    reward = CiderD(references, DocumentFrequency.build(references, args.vocab))
    train = TrainConfig()
    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    batch = CaptionBatch(features, captions, None)
    tokens = int((captions[:, 1:] != vocab.pad).sum())

    def cross_entropy() -> None:
        cross_entropy_step(model, model, optimizer, batch, vocab.pad, tokens, args.batch, 1, train)

    table = torch.full((images, CAPTIONS_PER_IMAGE, 13), vocab.end, dtype=torch.long)  # <start>, 11 words, <end>
    table[:, :, 0] = vocab.start
    table[:, :, 1:12] = torch.tensor([references[i % args.batch] for i in range(images)])

    def self_critical(variant: dict[str, object]) -> Callable[[], None]:
        settings = TrainConfig(scst_samples=args.samples, scst_after=0, **variant)  # type: ignore[arg-type]
        config = ExperimentConfig(data=DataConfig(max_length=args.steps), train=settings)
        phase = SelfCriticalPhase(config, model, model, None, ONE_PROCESS, reward, vocab)  # type: ignore[arg-type]
        batch = ImageBatch({name: x[:images] for name, x in pool.items()}, torch.arange(images) % args.batch, table)

        def step() -> None:
            phase.step(optimizer, list(range(images)), batch)
        return step

    common = {"setting": args.setting, "batch": args.batch, "steps": args.steps, "vocab": args.vocab,
              "threads": torch.get_num_threads()}
    per_caption = median_seconds(cross_entropy, args.iterations, args.warmup) / args.batch
    xe_epoch = CAPTIONS_PER_IMAGE * per_caption
    print(json.dumps({"benchmark": "cross_entropy", **common, "seconds_per_caption": round(per_caption, 5),
                      "seconds_per_image_epoch": round(xe_epoch, 5)}), flush=True)
    for variant in VARIANTS:
        per_image = median_seconds(self_critical(variant), args.iterations, args.warmup) / images
        print(json.dumps({
            "benchmark": "self_critical", **variant, "images": images, "samples": args.samples, **common,
            "seconds_per_image_epoch": round(per_image, 5),
            "seconds_per_sample": round(per_image / args.samples, 5),
            "ratio_to_cross_entropy": round(per_image / xe_epoch, 3),
            "sample_ratio_to_caption": round(per_image / args.samples / per_caption, 3),
            "step_ratio_per_image": round(per_image / per_caption, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
