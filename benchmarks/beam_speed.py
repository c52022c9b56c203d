"""Beam-search decoding speed of the SCA-CNN captioner, its FLOPs and the fraction of matmul roofline.

Prints JSON lines: first this machine's float32 matmul roofline (``common.matmul_roofline``: the
best GFLOP/s of square matmuls from 512² to 3072² at the torch thread count used), then per run
(setting and attention order) the decoding throughput of ``sca_caption.decoding.beam_search`` on
batches of random cached features, with random weights (only the shapes matter for speed).

FLOPs are analytic, 2 per multiply-add, matmul-like work only (the convention of the matmul
roofline); element-wise work (sigmoids, tanhs, softmaxes, the k·C channel map, log-softmax and
top-k over the vocabulary) is counted apart as ``elementwise_per_row_step`` and left out of the
roofline. One decoding step of one row (an image's beam) costs, per attended layer l with C_l
channels at m_l locations and attention width k, hidden H, embedding E, vocabulary V:

    hidden_projection   H·(4H + Q)     U h and every attention query W_h h in one matmul (Q = query width)
    spatial_keys        m·C·k          W_s over the channel-weighted map ("cs"), or over layers above
                                       the first ("s", "sc": the first layer's keys are per image)
    spatial_scores      m·k            wᵀ tanh(keys ⊕ q)
    channel_scores      C·k            w'ᵀ tanh(W_c ⊗ v ⊕ q)
    context_pooling     m·C            Σ_i α_i V_i (top layer, or every layer in "sc"; the rest is
                                       element-wise)
    upper_stages        the backbone stages between attended layers (counted with forward hooks)
    word_gates          E·4H,   context_gates  C_top·4H
    deep_output         H·E + C_top·E,   word_logits  E·V

FLOPs per image = per-row-step FLOPs × rows stepped per image (the first step runs one row per
image, each later one ``beam`` rows, for as many steps as the search ran: at most
1 + beam·(max_length − 1)) + the per-image start (upper stages once, h_0/c_0, first-layer keys).
``counted_flops_per_row_step`` re-counts one step with torch's FlopCounterMode as a check (it
skips matrix-vector products, so it sits slightly under the analytic figure).

Runs (``--runs setting:order,...``), settings from ``common.py``:
- ``lite0``: one layer on EfficientNet-Lite0's stage7 tap (320×7×7), attention 256, hidden 512,
  embedding 256 (the CPU configuration of the speed issues).
- ``paper``: the paper's two layers on ResNet-152, res5c_branch2b (512×7×7) then res5c (2048×7×7,
  whose upper stage runs at every step for every beam), attention 512, hidden 1000, embedding 100.

Each run is made with every attention backend of ``--kernels`` ("plain": the paper's equations,
what a GPU runs; "cpu": the CPU kernels), side by side, each in a fresh process whose
resident-memory rise is printed as ``peak_rss_mb``.

Usage: python benchmarks/beam_speed.py [--runs lite0:cs,lite0:s,paper:cs] [--kernels plain,cpu] [--batch 64]
       [--beam 5] [--max-length 16] [--vocab 3000] [--batches 5] [--warmup 1] [--threads N] [--profile N]

``--profile N`` adds a ``profile`` entry: where the time of N more batches goes (torch.profiler
self CPU time per op, and the share in matmul-like ops; ``common.op_profile``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Mapping

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from common import SETTINGS, build_captioner, matmul_roofline, measured_alone, op_profile, upper_stages, with_peak_memory
from sca_caption.data.vocab import Vocab
from sca_caption.decoding import beam_search
from sca_caption.models.backbones import build_backbone
from sca_caption.models.captioner import CaptionMemory, CaptionState, SCACaptioner, StepOutput


class RowCounter:
    """Forwards ``start`` / ``step`` to a captioner, counting steps and rows stepped."""

    def __init__(self, model: SCACaptioner) -> None:
        self.model = model
        self.steps = 0
        self.rows = 0

    def start(self, features: Mapping[str, Tensor]) -> tuple[CaptionState, CaptionMemory]:
        return self.model.start(features)

    def step(self, words: Tensor, state: CaptionState, memory: CaptionMemory) -> StepOutput:
        self.steps += 1
        self.rows += words.shape[0]
        return self.model.step(words, state, memory)


def random_features(model: SCACaptioner, backbone_name: str, batch: int) -> dict[str, Tensor]:
    """Non-negative random cached features {tap: (batch, C, H, W)} of the taps the model reads."""
    backbone = build_backbone(backbone_name, weights=None)
    features = {}
    for name in model.feature_names:
        info = backbone.tap_info[name]
        size = math.ceil(backbone.input_size / info.stride)
        features[name] = torch.rand(batch, info.channels, size, size)
    return features


def analytic_flops(model: SCACaptioner, features: Mapping[str, Tensor], vocab: int) -> tuple[dict[str, int], int, int]:
    """FLOPs of one row-step by part, the per-image start FLOPs, and the (approximate) element-wise
    operation count of one row-step."""
    config, encoder = model.config, model.encoder
    k, hidden, embed, order = config.attention_dim, config.hidden_dim, config.embed_dim, config.order
    top = encoder.context_dim
    sizes, upper = upper_stages(model, features)
    macs = dict.fromkeys(("spatial_keys", "spatial_scores", "channel_scores", "context_pooling"), 0)
    start_macs = upper + top * 2 * hidden
    elementwise = 10 * hidden + 3 * vocab
    last = len(sizes) - 1
    for layer, (m, c) in enumerate(zip(sizes, encoder.channels)):
        if order in ("cs", "sc", "s"):
            if order in ("s", "sc") and layer == 0:
                start_macs += m * c * k
            else:
                macs["spatial_keys"] += m * c * k
            macs["spatial_scores"] += m * k
            if order == "sc" or layer == last:
                macs["context_pooling"] += m * c
            elementwise += m * k + m * c
        if order in ("cs", "sc", "c"):
            macs["channel_scores"] += c * k
            elementwise += 2 * c * k
    macs.update(
        upper_stages=upper,
        hidden_projection=hidden * (4 * hidden + encoder.query_dim),
        word_gates=embed * 4 * hidden,
        context_gates=top * 4 * hidden,
        deep_output=(hidden + top) * embed,
        word_logits=embed * vocab,
    )
    return {name: 2 * value for name, value in macs.items()}, 2 * start_macs, elementwise


def counted_flops(model: SCACaptioner, features: Mapping[str, Tensor], rows: int) -> float:
    """FlopCounterMode's FLOPs of one step over ``rows`` rows, per row."""
    index = torch.arange(rows) % next(iter(features.values())).shape[0]
    with torch.inference_mode():
        state, memory = model.start(features)
        state = state.select(index)
        words = torch.full((rows,), Vocab.start, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model.step(words, state, memory)
    return counter.get_total_flops() / rows


def search_settings(args: argparse.Namespace) -> dict[str, object]:
    """The ``beam_search`` keyword arguments of this benchmark."""
    return dict(start=Vocab.start, end=Vocab.end, beam_size=args.beam, max_length=args.max_length, suppress=(Vocab.unk,))


def decode_speed(
    model: SCACaptioner, features: Mapping[str, Tensor], args: argparse.Namespace
) -> tuple[float, RowCounter]:
    """Seconds per batch (mean over ``args.batches`` after warm-up) and the rows stepped then."""
    settings = search_settings(args)
    for _ in range(args.warmup):
        beam_search(model, features, **settings)
    counter = RowCounter(model)
    start = time.perf_counter()
    for _ in range(args.batches):
        beam_search(counter, features, **settings)
    return (time.perf_counter() - start) / args.batches, counter


def run(name: str, order: str, kernels: str, args: argparse.Namespace, gflops: float) -> dict[str, object]:
    """One benchmark line for ``SETTINGS[name]`` in attention ``order`` with the ``kernels`` backend."""
    setting = SETTINGS[name]
    torch.manual_seed(0)
    model = build_captioner(setting, order, args.vocab, kernels).eval()
    features = random_features(model, setting.backbone, args.batch)
    seconds, counter = decode_speed(model, features, args)
    breakdown, start_flops, elementwise = analytic_flops(model, features, args.vocab)
    per_row_step = sum(breakdown.values())
    rows_per_image = counter.rows / (args.batch * args.batches)
    flops_per_image = per_row_step * rows_per_image + start_flops
    images_per_s = args.batch / seconds
    result: dict[str, object] = {
        "benchmark": "beam_search",
        "setting": name,
        "order": order,
        "kernels": kernels,
        "layers": list(setting.layers),
        "feature_shapes": {tap: list(x.shape[1:]) for tap, x in features.items()},
        "batch": args.batch,
        "beam": args.beam,
        "max_length": args.max_length,
        "vocab": args.vocab,
        "batches": args.batches,
        "threads": torch.get_num_threads(),
        "seconds_per_batch": round(seconds, 4),
        "images_per_s": round(images_per_s, 1),
        "steps_per_batch": counter.steps / args.batches,
        "rows_per_image": rows_per_image,
        "flops_per_row_step": per_row_step,
        "flops_breakdown_per_row_step": breakdown,
        "start_flops_per_image": start_flops,
        "counted_flops_per_row_step": round(counted_flops(model, features, args.batch * args.beam)),
        "elementwise_per_row_step": elementwise,
        "flops_per_image": round(flops_per_image),
        "matmul_gflops": round(gflops, 1),
        "roofline_fraction": round(flops_per_image * images_per_s / (gflops * 1e9), 3),
    }
    if args.profile:
        settings = search_settings(args)
        result["profile"] = op_profile(lambda: beam_search(model, features, **settings), args.profile)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="lite0:cs,lite0:s,paper:cs", help="comma-separated setting:order")
    parser.add_argument("--kernels", default="plain,cpu", help="comma-separated attention backends")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=5, help="timed batches")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many more batches: where the time goes")
    parser.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # the roofline: measure alone
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [spec.partition(":") for spec in args.runs.split(",")]
    for name, _, order in runs:
        if name not in SETTINGS or not order:
            parser.error(f"--runs: {name}:{order} is not setting:order with setting one of {', '.join(SETTINGS)}")

    if args.one is not None:  # a single run and backend, in this fresh process
        name, _, order = runs[0]
        print(json.dumps(with_peak_memory(lambda: run(name, order, args.kernels, args, args.one))), flush=True)
        return
    roofline = matmul_roofline()
    gflops = float(roofline["gflops"])  # type: ignore[arg-type]
    print(json.dumps(roofline), flush=True)
    same = ["--batch", str(args.batch), "--beam", str(args.beam), "--max-length", str(args.max_length), "--vocab",
            str(args.vocab), "--batches", str(args.batches), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--profile", str(args.profile), "--one", str(gflops)]
    for name, _, order in runs:
        for kernels in args.kernels.split(","):
            print(json.dumps(measured_alone(["--runs", f"{name}:{order}", "--kernels", kernels, *same])), flush=True)


if __name__ == "__main__":
    main()
