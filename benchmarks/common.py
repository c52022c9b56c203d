"""Pieces shared by the captioner benchmarks (``beam_speed.py``, ``captioner_speed.py``).

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``, so they
import this module as ``common``.

Settings (random weights; only the shapes matter):
- ``lite0``: one layer on EfficientNet-Lite0's stage7 tap (320×7×7), attention 256, hidden 512,
  embedding 256 (the issue's CPU configuration);
- ``paper``: the paper's two layers on ResNet-152, res5c_branch2b (512×7×7) then res5c
  (2048×7×7, whose upper stage, conv 1×1 + BN + res5b shortcut + ReLU, runs at every step),
  attention 512, hidden 1000, embedding 100 (the authors' code's sizes);
- ``flickr8k``, ``flickr8k_two``: configs/flickr8k.yaml (attention 128, hidden 384, embedding 256)
  on Lite0 ``stage7``, and its two-layer variant ``stage6`` → ``stage7``;
- ``flickr8k_vgg19``, ``flickr8k_resnet152``: the same sizes on the paper's backbones, one layer
  each: VGG-19 ``conv5_4`` (512×14×14) and ResNet-152 ``res5c`` (2048×7×7): what a CPU recipe
  on those features would cost;
- ``flickr8k_head``, ``flickr8k_lite2_head``: the same sizes on two layers, ``stage7`` → ``head``
  (whose 1×1 conv + BN runs at every step) of Lite0 (320×7×7 then 1280×7×7) and of Lite2
  (352×9×9 then 1280×9×9): the CPU kernels on 1280 channels; ``flickr8k_head_ft``,
  ``flickr8k_lite2_head_ft``: the same with the head's 1×1 conv + BN fine-tuned.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from sca_caption.models.backbones import build_backbone
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.complexity import count_macs


@dataclass(frozen=True)
class Setting:
    """A benchmarked model size: backbone, attended layers and widths; ``finetune_upper``: the
    backbone stages between the attended layers train too (``model.finetune_upper``)."""

    backbone: str
    layers: tuple[str, ...]
    attention_dim: int
    hidden_dim: int
    embed_dim: int
    finetune_upper: bool = False


SETTINGS = {
    "lite0": Setting("efficientnet_lite0", ("stage7",), 256, 512, 256),
    "paper": Setting("resnet152", ("res5c_branch2b", "res5c"), 512, 1000, 100),
    "flickr8k": Setting("efficientnet_lite0", ("stage7",), 128, 384, 256),  # configs/flickr8k.yaml
    "flickr8k_two": Setting("efficientnet_lite0", ("stage6", "stage7"), 128, 384, 256),  # its two-layer variant
    "flickr8k_vgg19": Setting("vgg19", ("conv5_4",), 128, 384, 256),
    "flickr8k_resnet152": Setting("resnet152", ("res5c",), 128, 384, 256),
    "flickr8k_head": Setting("efficientnet_lite0", ("stage7", "head"), 128, 384, 256),
    "flickr8k_lite2_head": Setting("efficientnet_lite2", ("stage7", "head"), 128, 384, 256),
    "flickr8k_head_ft": Setting("efficientnet_lite0", ("stage7", "head"), 128, 384, 256, finetune_upper=True),
    "flickr8k_lite2_head_ft": Setting("efficientnet_lite2", ("stage7", "head"), 128, 384, 256, finetune_upper=True),
}


def build_captioner(setting: Setting, order: str, vocab: int, kernels: str = "cpu") -> SCACaptioner:
    """A captioner of ``setting``'s sizes attending in ``order`` with the attention backend
    ``kernels`` ("plain" or "cpu", the CPU presets' choice), on a randomly initialised backbone."""
    config = ModelConfig(
        backbone=setting.backbone,
        layers=setting.layers,
        order=order,
        attention_dim=setting.attention_dim,
        hidden_dim=setting.hidden_dim,
        embed_dim=setting.embed_dim,
        kernels=kernels,
        finetune_upper=setting.finetune_upper,
    )
    return SCACaptioner(config, vocab, build_backbone(setting.backbone, weights=None))


ROOFLINE_SIZES = (512, 1024, 2048, 3072)


def matmul_roofline(sizes: tuple[int, ...] = ROOFLINE_SIZES, repeats: int = 5) -> dict[str, object]:
    """This machine's float32 matmul roofline: the best GFLOP/s of size×size matmuls over ``sizes``,
    each the best of ``repeats`` timed runs after a warm-up, at the current torch thread count
    (set it before calling). Returns the JSON line the benchmarks print first; its ``gflops`` is
    the figure they divide by."""
    per_size = {}
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        per_size[str(size)] = round(2 * size**3 / best / 1e9, 1)
    best_size = max(per_size, key=per_size.__getitem__)
    return {
        "benchmark": "matmul_fp32_roofline",
        "gflops": per_size[best_size],
        "best_size": int(best_size),
        "gflops_by_size": per_size,
        "threads": torch.get_num_threads(),
    }


def upper_stages(model: SCACaptioner, features: Mapping[str, Tensor]) -> tuple[list[int], int]:
    """Locations m_l (H·W) of every attended layer, and the multiply-adds of one image's pass
    through the backbone stages between them; ``features``: {tap: (B, C, H, W)} cached inputs."""
    encoder = model.encoder
    one = {name: x[:1] for name, x in features.items()}
    x, taps, macs = one[encoder.layer_names[0]], dict(one), 0
    sizes = [x.shape[2] * x.shape[3]]
    for i in range(len(encoder.layer_names) - 1):
        macs += count_macs(encoder.upper, i, x, taps)
        with torch.no_grad():
            x = encoder.upper(i, x, taps)
        taps[encoder.layer_names[i + 1]] = x
        sizes.append(x.shape[2] * x.shape[3])
    return sizes, macs


MATMUL_OPS = frozenset(("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::addmv_"))


def op_profile(run: Callable[[], object], repeats: int, top: int = 12) -> dict[str, object]:
    """Where the time of ``run()`` goes: torch.profiler's self CPU time of every op over ``repeats``
    calls, per call in ms: the ops' total, the share of it spent in matmul-like ops
    (``MATMUL_OPS``, the work the roofline fraction counts) and the ``top`` largest ops. Python
    time between ops is in no op, and the profiler adds its own overhead to every op."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(repeats):
            run()
    per_op = {event.key: event.self_cpu_time_total / 1000 / repeats for event in profiler.key_averages()}
    total = sum(per_op.values())
    largest = sorted(per_op, key=per_op.__getitem__, reverse=True)[:top]
    return {
        "profiled_calls": repeats,
        "ms_per_call": round(total, 1),
        "matmul_share": round(sum(v for k, v in per_op.items() if k in MATMUL_OPS) / total, 3),
        "top_ops_ms": {name: round(per_op[name], 1) for name in largest},
    }


def with_peak_memory(run: Callable[[], dict[str, object]]) -> dict[str, object]:
    """``run()``'s result plus ``peak_rss_mb``: how far the resident memory rose above its level at
    the start. Valid as the only measurement of its process (``ru_maxrss`` never falls): the
    benchmarks run each measurement in a fresh process (``measured_alone``)."""
    with open("/proc/self/statm") as statm:
        resident_kb = int(statm.read().split()[1]) * resource.getpagesize() // 1024
    result = run()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_rss_mb"] = round((peak_kb - resident_kb) / 1024, 1)
    return result


def measured_alone(argv: list[str]) -> dict[str, object]:
    """This benchmark script run again in a fresh process with ``argv`` (one measurement: a
    forked child of a process whose thread pools ran can deadlock), and the JSON line it prints."""
    done = subprocess.run([sys.executable, sys.argv[0], *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{sys.argv[0]} {' '.join(argv)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_seconds(run: Callable[[], object], iterations: int, warmup: int) -> float:
    """Median seconds of ``run()`` over ``iterations`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
