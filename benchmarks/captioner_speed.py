"""Training speed of the SCA-CNN captioner, with its FLOPs and the fraction of matmul roofline.

Prints JSON lines: first this machine's float32 matmul roofline (``common.matmul_roofline``: the
best GFLOP/s of square matmuls from 512² to 3072² at the torch thread count used), then per setting
and attention order the training throughput (forward, loss, backward and an Adam step on random
cached features and captions, no padding; ``phases.cross_entropy_step``, the trainer's own step)
with the analytic FLOPs per caption and their breakdown.

FLOPs count matmul-like work only (2 per multiply-add; see ``flops_per_caption`` for the
gradient factors); the element-wise work is left out of the roofline fraction, and the number of
tanh-map elements evaluated (k·C channel, k·m spatial, per layer and step, forward) is printed as
``attention_map_elements_per_caption``.

Settings (random weights; only the shapes matter) from ``common.py``: ``lite0`` (one layer on
EfficientNet-Lite0's stage7, the issue's CPU configuration), ``paper`` (the paper's two layers
on ResNet-152, res5c_branch2b then res5c), ``flickr8k`` (configs/flickr8k.yaml's sizes),
``flickr8k_two`` (the same with stage6 then stage7, whose MBConv block runs in every step) and
``flickr8k_head`` / ``flickr8k_lite2_head`` (stage7 then the 1280-channel head of Lite0 / Lite2:
the attention on 1280 channels), among others. Each order runs with every attention backend of
``--kernels`` ("plain": the paper's equations, what a GPU runs; "cpu": the CPU kernels), side by
side, each in a fresh process whose resident-memory rise is printed as ``peak_rss_mb``.

Usage: python benchmarks/captioner_speed.py [--settings lite0,paper] [--orders cs,s] [--kernels plain,cpu]
       [--batch 64] [--steps 16] [--vocab 3000] [--iterations 10] [--warmup 2] [--bf16] [--profile N]

``--profile N`` adds a ``profile`` entry: where the time of N more iterations goes (torch.profiler
self CPU time per op, and the share in matmul-like ops; ``common.op_profile``).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from common import (
    SETTINGS,
    build_captioner,
    matmul_roofline,
    measured_alone,
    median_seconds,
    op_profile,
    upper_stages,
    with_peak_memory,
)
from sca_caption.config import TrainConfig
from sca_caption.data.caption_dataset import CaptionBatch
from sca_caption.models.backbones import build_backbone
from sca_caption.models.captioner import SCACaptioner
from sca_caption.optimization import make_optimizer
from sca_caption.phases import cross_entropy_step

Shapes = dict[str, tuple[int, ...]]


def random_features(shapes: Shapes, batch: int) -> dict[str, torch.Tensor]:
    """Non-negative random cached features, (batch, C, H, W) per tap."""
    return {name: torch.rand(batch, *shape) for name, shape in shapes.items()}


def feature_shapes(backbone_name: str, layers: tuple[str, ...]) -> Shapes:
    """(C, H, W) of each cached prefix output, from one 224 px image through the real prefix."""
    backbone = build_backbone(backbone_name, weights=None)
    prefix, _ = backbone.split(layers)
    with torch.no_grad():
        outputs = prefix(torch.rand(1, 3, backbone.input_size, backbone.input_size))
    return {name: tuple(x.shape[1:]) for name, x in outputs.items()}


def flops_per_caption(
    model: SCACaptioner, features: dict[str, torch.Tensor], steps: int, vocab: int
) -> tuple[dict[str, int], int]:
    """Analytic training FLOPs per caption by part, and the attention-map elements evaluated.

    Each part's forward multiply-adds count ×3 in training (forward, input and weight
    gradients), ×2 where the input is a constant cached feature or the weights are frozen, ×1
    where both are; 2 FLOPs per multiply-add.
    """
    config, encoder = model.config, model.encoder
    k, hidden, embed, context = config.attention_dim, config.hidden_dim, config.embed_dim, encoder.context_dim
    order, frozen = config.order, not config.finetune_upper
    sizes, upper_macs = upper_stages(model, features)
    parts: dict[str, int] = {  # name: forward multiply-adds × gradient factor
        "init_state": upper_macs * (1 if frozen else 2) + context * 2 * hidden * 2,
        "upper_stages": 0 if order == "none" else upper_macs * steps * (2 if frozen else 3),
        "hidden_projection": hidden * (4 * hidden + encoder.query_dim) * steps * 3,
        "word_gates": embed * 4 * hidden * steps * 3,
        "context_gates": context * 4 * hidden * steps * 3,
        "deep_output": (hidden + context) * embed * steps * 3,
        "word_logits": embed * vocab * steps * 3,
        "spatial_keys": 0,
        "spatial_scores": 0,
        "channel_scores": 0,
        "context_pooling": 0,
    }
    map_elements = 0
    for layer, (m, c) in enumerate(zip(sizes, encoder.channels)):
        if order in ("cs", "sc", "s"):
            once_per_image = order in ("s", "sc") and layer == 0  # W_s V of cached features
            parts["spatial_keys"] += m * c * k * (2 if once_per_image else 3 * steps)
            parts["spatial_scores"] += m * k * steps * 3
            parts["context_pooling"] += m * c * steps * 3
            map_elements += m * k * steps
        if order in ("cs", "sc", "c"):
            parts["channel_scores"] += c * k * steps * 3
            map_elements += c * k * steps
    return {name: 2 * value for name, value in parts.items()}, map_elements


def training_iteration(
    model: SCACaptioner, features: dict[str, torch.Tensor], captions: torch.Tensor, bf16: bool = False
) -> Callable[[], None]:
    """One training iteration as a call: the trainer's own step (``phases.cross_entropy_step``:
    forward, under bfloat16 autocast with ``bf16``, loss, backward, clipping and its AdamW step)."""
    train = TrainConfig(bf16=bf16)
    optimizer = make_optimizer(model, train.lr, train.weight_decay)
    batch = CaptionBatch(features, captions, None)
    tokens = int((captions[:, 1:] != 0).sum())
    model.train()

    def iteration() -> None:
        cross_entropy_step(model, model, optimizer, batch, 0, tokens, len(captions), 1, train)

    return iteration



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="lite0,paper", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--orders", default="cs,s", help="comma-separated attention orders")
    parser.add_argument("--kernels", default="plain,cpu", help="comma-separated attention backends")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="decoding steps (caption length - 1)")
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="forward pass under bfloat16 autocast (train.bf16)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many more iterations: where the time goes")
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # the roofline: measure alone
    args = parser.parse_args()

    if args.one is not None:  # a single setting, order and backend, in this fresh process
        shapes = feature_shapes(SETTINGS[args.settings].backbone, SETTINGS[args.settings].layers)
        measure = lambda: measure_training(args.settings, shapes, args.orders, args.kernels, args, args.one)  # noqa: E731
        print(json.dumps(with_peak_memory(measure)), flush=True)
        return
    roofline = matmul_roofline()
    gflops = float(roofline["gflops"])  # type: ignore[arg-type]
    print(json.dumps(roofline), flush=True)
    same = ["--batch", str(args.batch), "--steps", str(args.steps), "--vocab", str(args.vocab), "--iterations",
            str(args.iterations), "--warmup", str(args.warmup), "--profile", str(args.profile), "--one", str(gflops)]
    for name in args.settings.split(","):
        for order in args.orders.split(","):
            for kernels in args.kernels.split(","):
                one = ["--settings", name, "--orders", order, "--kernels", kernels, *same, *(["--bf16"] if args.bf16 else [])]
                print(json.dumps(measured_alone(one)), flush=True)


def measure_training(
    name: str, shapes: Shapes, order: str, kernels: str, args: argparse.Namespace, gflops: float
) -> dict[str, object]:
    """One benchmark line: setting ``name`` in ``order`` with the ``kernels`` backend."""
    setting = SETTINGS[name]
    torch.manual_seed(0)
    model = build_captioner(setting, order, args.vocab, kernels)
    features = random_features(shapes, args.batch)
    captions = torch.randint(4, args.vocab, (args.batch, args.steps + 1))
    captions[:, 0] = 1
    iteration = training_iteration(model, features, captions, args.bf16)
    seconds = median_seconds(iteration, args.iterations, args.warmup)
    breakdown, map_elements = flops_per_caption(model, features, args.steps, args.vocab)
    flops = sum(breakdown.values())
    rate = args.batch / seconds
    result: dict[str, object] = {
        "benchmark": "captioner_train",
        "setting": name,
        "order": order,
        "kernels": kernels,
        "layers": list(setting.layers),
        "feature_shapes": {tap: list(shape) for tap, shape in shapes.items()},
        "batch": args.batch,
        "steps": args.steps,
        "vocab": args.vocab,
        "iterations": args.iterations,
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "seconds_per_batch": round(seconds, 4),
        "captions_per_s": round(rate, 1),
        "flops_per_caption": flops,
        "flops_breakdown": breakdown,
        "attention_map_elements_per_caption": map_elements,
        "matmul_gflops": round(gflops, 1),
        "roofline_fraction": round(flops * rate / (gflops * 1e9), 3),
    }
    if args.profile:
        result["profile"] = op_profile(iteration, args.profile)
    return result


if __name__ == "__main__":
    main()
