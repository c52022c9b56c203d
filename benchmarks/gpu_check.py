"""One-command GPU check (issue #25): every CUDA path of the project run once, in minutes.

    python benchmarks/gpu_check.py                        # on a CUDA machine: every check, < 8 min
    python benchmarks/gpu_check.py --device cpu --tiny    # the same code paths on the CPU, tiny sizes
    python benchmarks/gpu_check.py --checks train_speed,ddp_step

Each check prints one JSON line ``{"check": NAME, "ok": true|false|null, ...figures}``; a check
that fails prints ``ok: false`` with a one-line ``error`` and the others still run; ``ok: null``
(with a ``reason``) is a check skipped for want of data. Exit status 1 if any check failed.

Checks, in order:
- ``environment``: the device, torch and CUDA versions.
- ``train_speed``: the paper configuration's training step (``captioner_speed.training_iteration``,
  the trainer's own step): captions/s and peak GPU memory, bf16 autocast off and on, with both
  attention backends ("plain", what a GPU runs, and the "cpu" kernels).
- ``beam_speed``: beam search images/s of the same model (``beam_speed.decode_speed``), both backends.
- ``resume``: a tiny shapes run of the train CLI stopped by SIGTERM mid-epoch and continued with
  ``--resume`` on the device ends with the weights and optimizer state of an uninterrupted run
  (exactly, or within ``RESUME_TOLERANCE`` where GPU kernels add in another order), and the CUDA
  generator state saved in its ``last.pt`` is restored by ``checkpoint.restore_rng_state``.
- ``ddp_step``: one optimizer step through ``DistributedDataParallel`` in a process group of one
  (NCCL on CUDA, gloo on the CPU) against the same step without it.
- ``serve_batching``: the service's ``MicroBatcher`` with the shipped model, concurrent one-image
  requests micro-batched against one at a time (``max_batch`` 1): images/s of each.
- ``shipped_captions``: the shipped model's captions of the first Flickr8k test images on the
  device against the CPU's: how many differ, and for each the two captions and their scores (a
  differing caption is a near-tie, within ``NEAR_TIE`` of the CPU's score, that the device's
  float rounding tipped the other way). Needs ../shared/data/flickr8k (``--data-root``).

The speed checks use random weights (``weights=None``): ResNet-152's ImageNet weights cannot be
downloaded on a machine without network, and only the shapes matter for speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

from beam_speed import decode_speed, random_features as beam_features
from caption_speed import DEFAULT_DATA
from captioner_speed import Shapes, feature_shapes, random_features, training_iteration
from common import SETTINGS, Setting, build_captioner, median_seconds
from sca_caption.captioning import ImageCaptioner, shipped_checkpoint
from sca_caption.checkpoint import restore_rng_state
from sca_caption.config import TrainConfig
from sca_caption.data.caption_dataset import CaptionBatch
from sca_caption.data.shapes import generate_shapes
from sca_caption.devices import HELP as DEVICE_HELP, device_name
from sca_caption.optimization import make_optimizer
from sca_caption.phases import cross_entropy_step
from sca_caption.serve.app import ServiceLimits
from sca_caption.serve.batcher import MicroBatcher

REPO = Path(__file__).resolve().parents[1]
RANDOM_WEIGHTS = "random (weights=None): ImageNet weights cannot be downloaded here; only the shapes matter for speed"
RESUME_TOLERANCE = 1e-5  # largest |difference| of a weight or optimizer value after --resume on a GPU
NEAR_TIE = 0.05  # nats: a device caption within this of the CPU caption's score is a rounding near-tie
# Two attended layers with a backbone stage between them, as the paper's, at tiny widths.
TINY_SETTING = Setting("efficientnet_lite0", ("stage6", "stage7"), 16, 32, 16)


@dataclass(frozen=True)
class Sizes:
    """How much each check does: the training and beam-search batch shapes, the service load and
    the number of Flickr8k test images compared."""

    setting: Setting
    batch: int
    steps: int
    vocab: int
    iterations: int
    warmup: int
    beam_batch: int
    beam: int
    max_length: int
    beam_batches: int
    requests: int
    clients: int
    images: int


FULL = Sizes(SETTINGS["paper"], 64, 16, 3000, 10, 2, 64, 5, 16, 3, 128, 16, 100)
TINY = Sizes(TINY_SETTING, 4, 4, 50, 2, 1, 2, 2, 5, 1, 8, 4, 8)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA measure the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_mb(device: torch.device) -> float | None:
    """The most memory torch allocated on the GPU since the last reset, MB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_environment(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    return {"ok": True, "device": str(device), "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if on_gpu else None, "sizes": "tiny" if sizes is TINY else "full",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def training_run(device: torch.device, sizes: Sizes, shapes: Shapes, kernels: str, bf16: bool) -> dict[str, Any]:
    """Captions/s and peak GPU memory of the training step at ``sizes`` on cached features of
    ``shapes``, one backend, bf16 on or off."""
    torch.manual_seed(0)
    model = build_captioner(sizes.setting, "cs", sizes.vocab, kernels).to(device)
    features = {tap: x.to(device) for tap, x in random_features(shapes, sizes.batch).items()}
    captions = torch.randint(4, sizes.vocab, (sizes.batch, sizes.steps + 1))
    captions[:, 0] = 1
    iteration = training_iteration(model, features, captions.to(device), bf16)
    reset_peak(device)
    seconds = median_seconds(lambda: (iteration(), synchronize(device)), sizes.iterations, sizes.warmup)
    return {"kernels": kernels, "bf16": bf16, "seconds_per_batch": round(seconds, 4),
            "captions_per_s": round(sizes.batch / seconds, 1), "peak_gpu_mb": peak_gpu_mb(device)}


def check_train_speed(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    shapes = feature_shapes(sizes.setting.backbone, sizes.setting.layers)
    runs = [one_of_several(lambda: training_run(device, sizes, shapes, kernels, bf16), kernels=kernels, bf16=bf16)
            for bf16 in (False, True) for kernels in ("plain", "cpu")]
    return {"ok": all(r["ok"] for r in runs), "setting": setting_name(sizes), "weights": RANDOM_WEIGHTS,
            "batch": sizes.batch, "steps": sizes.steps, "vocab": sizes.vocab, "runs": runs}


def beam_run(device: torch.device, sizes: Sizes, kernels: str) -> dict[str, Any]:
    """Beam-search images/s at ``sizes`` with one backend."""
    setting = sizes.setting
    torch.manual_seed(0)
    model = build_captioner(setting, "cs", sizes.vocab, kernels).eval().to(device)
    features = {tap: x.to(device) for tap, x in beam_features(model, setting.backbone, sizes.beam_batch).items()}
    settings = argparse.Namespace(beam=sizes.beam, max_length=sizes.max_length, batches=sizes.beam_batches, warmup=1)
    reset_peak(device)
    seconds, counter = decode_speed(model, features, settings)  # beam search's results are on the host: synchronised
    return {"kernels": kernels, "seconds_per_batch": round(seconds, 4), "images_per_s": round(sizes.beam_batch / seconds, 1),
            "steps_per_batch": counter.steps / sizes.beam_batches, "peak_gpu_mb": peak_gpu_mb(device)}


def check_beam_speed(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    runs = [one_of_several(lambda: beam_run(device, sizes, kernels), kernels=kernels) for kernels in ("plain", "cpu")]
    return {"ok": all(r["ok"] for r in runs), "setting": setting_name(sizes), "weights": RANDOM_WEIGHTS,
            "batch": sizes.beam_batch, "beam": sizes.beam, "max_length": sizes.max_length, "vocab": sizes.vocab, "runs": runs}


def tiny_run_settings(root: Path) -> list[str]:
    """Overrides of a tiny shapes run: 24 training images (4 steps of 30 captions), one epoch,
    a tiny model with dropout (its masks must repeat after --resume), the plain attention."""
    values = {
        "data.data_root": root / "shapes", "data.feature_cache": root / "features" / "shapes_stage7.h5",
        "data.batch_size": 30, "train.epochs": 1, "train.lr": 0.01, "train.warmup_steps": 0, "train.meteor": False,
        "train.checkpoint_every": "null", "decode.beam_size": 2, "model.layers": "[stage7]", "model.hidden_dim": 32,
        "model.attention_dim": 16, "model.embed_dim": 16, "model.dropout": 0.3, "model.kernels": "plain",
    }
    return [f"{key}={value}" for key, value in values.items()]


def train_cli(
    device: torch.device, out: Path, settings: list[str], *leading: str, resume: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m sca_caption.train`` on ``device`` into ``out``; ``leading``: options of
    tests/paused_train.py, which then runs the CLI (interrupted at a known step)."""
    program = [str(REPO / "tests" / "paused_train.py"), *leading] if leading else ["-m", "sca_caption.train"]
    command = [sys.executable, *program, "--no-progress", "--device", str(device), "--out", str(out),
               *(["--resume"] if resume else []), *settings]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def check_resume(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_shapes(root / "shapes", seed=0, counts={"train": 24, "val": 4, "test": 4})
        settings = tiny_run_settings(root)
        whole = train_cli(device, root / "whole", settings)
        if whole.returncode != 0:
            return {"ok": False, "error": f"the uninterrupted run failed: {last_line(whole.stderr)}"}
        stopped = train_cli(device, root / "split", settings, "--signal-after", "2", "SIGTERM")
        if "stopped by SIGTERM after step 2" not in stopped.stderr:
            return {"ok": False, "error": f"the run was not stopped after step 2: {last_line(stopped.stderr)}"}
        interrupted = torch.load(root / "split" / "last.pt", weights_only=True)
        cuda_states = len(interrupted["rng"]["cuda"])
        rng_restored = rng_state_restores(interrupted["rng"], device)
        resumed = train_cli(device, root / "split", settings, resume=True)
        if resumed.returncode != 0:
            return {"ok": False, "error": f"the resumed run failed: {last_line(resumed.stderr)}"}
        a = torch.load(root / "whole" / "last.pt", weights_only=True)
        b = torch.load(root / "split" / "last.pt", weights_only=True)
    pairs = list(zip(tensors(a["model"]) + tensors(a["optimizer"]), tensors(b["model"]) + tensors(b["optimizer"])))
    exact = all(torch.equal(x, y) for x, y in pairs)
    largest = max(float((x.double() - y.double()).abs().max()) for x, y in pairs if x.numel())
    same_steps = (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    return {"ok": bool(same_steps and largest <= RESUME_TOLERANCE and rng_restored), "stopped_at_step": interrupted["step"],
            "final_step": b["step"], "tensors_compared": len(pairs), "bitwise_equal": exact,
            "max_abs_difference": largest, "cuda_rng_states_saved": cuda_states, "rng_restored": rng_restored}


def rng_state_restores(rng: dict[str, Any], device: torch.device) -> bool:
    """Whether ``restore_rng_state`` brings back the saved torch CPU state and, on CUDA, every
    saved GPU state (which a CUDA run must have saved), after the generators have moved on."""
    torch.manual_seed(12345)
    torch.rand(3)
    if device.type == "cuda":
        torch.rand(3, device=device)
        if not rng["cuda"]:
            return False
    restore_rng_state(rng)
    cuda_now = torch.cuda.get_rng_state_all() if device.type == "cuda" else []
    return torch.equal(torch.get_rng_state(), rng["torch"]) and all(
        torch.equal(now, saved) for now, saved in zip(cuda_now, rng["cuda"], strict=True)
    )


def tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a nested dict/list (a state dict), in the order of its keys."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def check_ddp_step(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    backend = "nccl" if device.type == "cuda" else "gloo"
    setting = sizes.setting
    shapes = feature_shapes(setting.backbone, setting.layers)
    features = {tap: x.to(device) for tap, x in random_features(shapes, sizes.batch).items()}
    captions = torch.randint(4, sizes.vocab, (sizes.batch, sizes.steps + 1), device=device)
    captions[:, 0] = 1
    batch, tokens, train = CaptionBatch(features, captions, None), int((captions[:, 1:] != 0).sum()), TrainConfig()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        stepped = []
        for wrap in (False, True):
            torch.manual_seed(0)
            model = build_captioner(setting, "cs", sizes.vocab, "plain").to(device).train()
            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if wrap else model
            optimizer = make_optimizer(model, train.lr, train.weight_decay)
            torch.manual_seed(1)  # the same dropout masks in both
            loss = cross_entropy_step(model, ddp, optimizer, batch, 0, tokens, sizes.batch, 1, train)
            synchronize(device)
            stepped.append((float(loss), [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    finally:
        dist.destroy_process_group()
    (plain_loss, plain), (ddp_loss, wrapped) = stepped
    largest = max(float((x - y).abs().max()) for x, y in zip(plain, wrapped))
    return {"ok": bool(largest <= RESUME_TOLERANCE and abs(plain_loss - ddp_loss) <= 1e-5), "backend": backend,
            "world_size": 1, "loss": round(ddp_loss, 6), "loss_without_ddp": round(plain_loss, 6),
            "max_abs_weight_difference": largest}


def check_serve_batching(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    path = shipped_checkpoint()
    if path is None:
        return {"ok": None, "reason": "no shipped checkpoint (checkpoints/flickr8k_cs_lite0.pt)"}
    captioner = ImageCaptioner.from_checkpoint(path, device=device)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, captioner.input_size, captioner.input_size, generator=generator) for _ in range(sizes.requests)]
    settings, wait = captioner.settings(), ServiceLimits().max_wait_ms
    rates, captions = {}, {}
    for mode, max_batch in (("batched", sizes.clients), ("single", 1)):
        rates[mode], captions[mode], batch_sizes = asyncio.run(serve_rate(captioner, images, settings, max_batch, sizes.clients, wait))
        rates[f"{mode}_batch_sizes"] = batch_sizes
    same = sum(a == b for a, b in zip(captions["batched"], captions["single"]))
    # micro-batching happened, one-at-a-time did not batch, and the captions agree but for the
    # float rounding of other batch sizes (README: near-ties at most)
    batched = max(rates["batched_batch_sizes"]) > 1 and max(rates["single_batch_sizes"]) == 1
    return {"ok": bool(batched and same >= 0.95 * sizes.requests), "model": str(path.name), "beam": settings.beam_size, "requests": sizes.requests,
            "clients": sizes.clients, "max_wait_ms": wait, "batched_images_per_s": rates["batched"],
            "single_images_per_s": rates["single"], "batched_over_single": round(rates["batched"] / rates["single"], 3),
            "batch_sizes": {"batched": rates["batched_batch_sizes"], "single": rates["single_batch_sizes"]},
            "same_captions": same}


async def serve_rate(
    captioner: ImageCaptioner, images: list[torch.Tensor], settings: Any, max_batch: int, clients: int, wait_ms: float
) -> tuple[float, list[str], dict[int, int]]:
    """Images/s of ``clients`` concurrent clients each sending one image per request through a
    ``MicroBatcher`` until every image is captioned (after an untimed pass over the first
    ``clients``), the captions, and how many images were decoded in batches of each size."""
    batcher = MicroBatcher(captioner, max_batch=max_batch, max_wait_ms=wait_ms)
    batcher.start()
    try:
        await send_all(batcher, images[:clients], settings, clients)
        start = time.perf_counter()
        decoded = await send_all(batcher, images, settings, clients)
        seconds = time.perf_counter() - start
    finally:
        await batcher.close()
    batch_sizes: dict[int, int] = {}
    for d in decoded:
        batch_sizes[d.batch_size] = batch_sizes.get(d.batch_size, 0) + 1
    return round(len(images) / seconds, 2), [d.captions[0].text for d in decoded], dict(sorted(batch_sizes.items()))


async def send_all(batcher: MicroBatcher, images: list[torch.Tensor], settings: Any, clients: int) -> list[Any]:
    """Every image as a one-image request, ``clients`` requests in flight at a time; the results in order."""
    results: list[Any] = [None] * len(images)
    waiting = iter(range(len(images)))

    async def client() -> None:
        for i in waiting:
            results[i] = (await batcher.caption([images[i]], settings))[0]

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


def check_shipped_captions(device: torch.device, sizes: Sizes, data_root: Path) -> dict[str, Any]:
    listing, folder, path = data_root / "Flickr_8k.testImages.txt", data_root / "Flicker8k_Dataset", shipped_checkpoint()
    if not listing.is_file() or not folder.is_dir():
        return {"ok": None, "reason": f"no Flickr8k test images: {listing} or {folder} is absent"}
    if path is None:
        return {"ok": None, "reason": "no shipped checkpoint (checkpoints/flickr8k_cs_lite0.pt)"}
    paths = [folder / name for name in listing.read_text().split()[: sizes.images]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        return {"ok": False, "error": f"{len(missing)} of the first {len(paths)} test images are missing from {folder}, first {missing[0]}"}
    on_device, on_cpu = (best_captions(ImageCaptioner.from_checkpoint(path, device=d), paths) for d in (device, torch.device("cpu")))
    failed = [p.name for p, d, c in zip(paths, on_device, on_cpu) if d is None or c is None]
    if failed:
        return {"ok": False, "error": f"{len(failed)} image(s) could not be read, first {failed[0]}"}
    differing = [
        {"image": p.name, "device": d["caption"], "device_score": d["score"], "cpu": c["caption"], "cpu_score": c["score"],
         "score_gap": round(d["score"] - c["score"], 5), "cpu_margin_to_second": c["margin"]}
        for p, d, c in zip(paths, on_device, on_cpu) if d["caption"] != c["caption"]
    ]
    same = [abs(d["score"] - c["score"]) for d, c in zip(on_device, on_cpu) if d["caption"] == c["caption"]]
    return {"ok": all(abs(d["score_gap"]) <= NEAR_TIE for d in differing), "model": path.name, "device": str(device),
            "images": len(paths), "differing": len(differing), "near_tie_nats": NEAR_TIE,
            "max_score_difference_same_caption": round(max(same, default=0.0), 6), "differences": differing}


def best_captions(captioner: ImageCaptioner, paths: list[Path]) -> list[dict[str, Any] | None]:
    """Per path its best caption, score and the score margin to the second best (None: unreadable)."""
    settings = captioner.settings(n_best=min(2, captioner.decode.beam_size))
    found: list[dict[str, Any] | None] = []
    for result in captioner.caption_files(paths, settings, batch_size=16, workers=2):
        captions = getattr(result, "captions", None)
        if captions is None:
            found.append(None)
            continue
        scores = [c.hypothesis.score for c in captions]
        found.append({"caption": captions[0].text, "score": round(scores[0], 5),
                      "margin": round(scores[0] - scores[1], 5) if len(scores) > 1 else None})
    return found


CHECKS: dict[str, Callable[[torch.device, Sizes, Path], dict[str, Any]]] = {
    "environment": check_environment,
    "train_speed": check_train_speed,
    "beam_speed": check_beam_speed,
    "resume": check_resume,
    "ddp_step": check_ddp_step,
    "serve_batching": check_serve_batching,
    "shipped_captions": check_shipped_captions,
}


def one_of_several(run: Callable[[], dict[str, Any]], **names: Any) -> dict[str, Any]:
    """``run()``'s figures with ``ok: true``, or ``names`` with ``ok: false`` and the error's line."""
    try:
        return {"ok": True, **run()}
    except Exception as error:  # one configuration failing leaves the others to measure
        return {"ok": False, **names, "error": describe(error)}


def describe(error: BaseException) -> str:
    """The error in one line: its type, first message line and where it was raised."""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}{at}"


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


def setting_name(sizes: Sizes) -> str:
    return next((name for name, s in SETTINGS.items() if s == sizes.setting), "tiny")


def check_names(text: str) -> list[str]:
    """``--checks``: comma-separated names of ``CHECKS`` (an argparse ``type``)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown check {', '.join(unknown) or repr(text)}; choose from {', '.join(CHECKS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_name, default="cuda", help=f"{DEVICE_HELP.split(' (')[0]} (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the code paths in a minute or two, no figures worth reading")
    parser.add_argument("--checks", type=check_names, default=list(CHECKS),
                        help=f"comma-separated, in the order to run (default all: {','.join(CHECKS)})")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="Flickr8k folder (default ../shared/data/flickr8k)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = TINY if args.tiny else FULL
    failed = False
    for name in args.checks:
        start = time.perf_counter()
        try:
            result = CHECKS[name](device, sizes, args.data_root)
        except Exception as error:  # a check that fails is reported, and the next one runs
            result = {"ok": False, "error": describe(error)}
        failed |= result["ok"] is False
        print(json.dumps({"check": name, **result, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
