"""Speed when the CPU is shared: the trainer's step and beam search alone and beside busy processes.

Each remedy runs in a fresh process (OpenMP reads its environment once, when torch loads), once
alone and once beside each count of ``--busy`` processes that this script starts itself (pure
Python loops, one core each, killed when the measurement ends and ending on their own after
``--seconds`` plus a margin). Per remedy, workload and load it prints one JSON line: the first
iteration's seconds (where a spinning thread waits longest) and the median rate of the following
iterations over ``--seconds`` (training: captions/s; beam search: images/s), and the share of the
same remedy's rate alone.

Workloads (the shapes preset, ``configs/shapes.yaml``, the default experiment; random weights and
features): ``train``, the trainer's cross-entropy step on 64 captions of 20 words; ``beam``, beam
search (the preset's beam 3) of 64 images.

Remedies:
- ``torch``: torch's defaults (threads = cores, OpenMP's default wait policy): what every command
  did before ``sca_caption.threads`` (``SCA_CAPTION_THREADS=torch``);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` alone, threads = cores;
- ``one``: one thread, default wait policy;
- ``shipped``: what ``import sca_caption`` does by default (``sca_caption.threads``: the free
  cores, sampled in the worker's own start).

Usage: python benchmarks/contention.py [--remedies torch,passive,one,shipped]
       [--workloads train,beam] [--busy 1,2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REMEDIES = ("torch", "passive", "one", "shipped")
WORKLOADS = ("train", "beam")
BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def remedy_environment(remedy: str) -> dict[str, str]:
    """The environment a worker of ``remedy`` starts with (before torch loads)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "SCA_CAPTION_THREADS")}
    if remedy != "shipped":
        env["SCA_CAPTION_THREADS"] = "torch"  # the package leaves torch's defaults alone
    if remedy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def worker(remedy: str, workload: str, seconds: float) -> dict[str, object]:
    """Build the workload in this process, apply the remedy's thread count and measure."""
    import sca_caption  # noqa: F401 (before torch, as every command: the ``shipped`` remedy's threads)
    import torch

    if remedy == "one":
        torch.set_num_threads(1)
    run, items = build_workload(workload)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return {
        "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "first_iteration_s": round(first, 3), "iterations": len(times), "rate": round(items / median, 1),
    }


def build_workload(workload: str):  # noqa: ANN201 (a benchmark's closure)
    """``(run, items)``: one iteration of ``workload`` as a call and the captions or images it does."""
    import torch

    from captioner_speed import feature_shapes, random_features, training_iteration
    from sca_caption.config import load_config
    from sca_caption.decoding import decode
    from sca_caption.models.backbones import build_backbone
    from sca_caption.models.captioner import SCACaptioner

    config = load_config("shapes")
    torch.manual_seed(0)
    vocab, batch, words = 40, 64, 20
    model = SCACaptioner(config.model, vocab, build_backbone(config.model.backbone, weights=None))
    features = random_features(feature_shapes(config.model.backbone, config.model.layers), batch)
    if workload == "train":
        captions = torch.randint(4, vocab, (batch, words + 1))
        captions[:, 0] = 1
        return training_iteration(model, features, captions), batch
    model.eval()
    settings = config.decode.with_max_length(words)

    def search() -> None:
        with torch.inference_mode():
            decode(model, features, settings)

    return search, batch


def measure(remedy: str, workload: str, busy: int, seconds: float) -> dict[str, object]:
    """One worker of ``remedy`` on ``workload`` beside ``busy`` busy-loop processes."""
    loops = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=seconds + 120)], start_new_session=True)
        for _ in range(busy)
    ]
    try:
        done = subprocess.run(
            [sys.executable, sys.argv[0], "--worker", remedy, "--workloads", workload, "--seconds", str(seconds)],
            env=remedy_environment(remedy), capture_output=True, text=True, timeout=seconds + 600,
        )
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if done.returncode != 0:
        raise SystemExit(f"worker {remedy} {workload} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remedies", default=",".join(REMEDIES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--busy", default="1,2", help="comma-separated counts of busy processes beside the worker")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement after the first iteration")
    parser.add_argument("--worker", choices=REMEDIES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.workloads, args.seconds)), flush=True)
        return
    loads = [0, *(int(n) for n in args.busy.split(","))]
    for workload in args.workloads.split(","):
        for remedy in args.remedies.split(","):
            alone = None
            for busy in loads:
                result = measure(remedy, workload, busy, args.seconds)
                alone = alone or result["rate"]
                unit = "captions_per_s" if workload == "train" else "images_per_s"
                line = {"benchmark": "contention", "workload": workload, "remedy": remedy, "busy": busy,
                        "cores": os.cpu_count(), unit: result["rate"], "share_of_alone": round(result["rate"] / alone, 3),
                        **{k: v for k, v in result.items() if k != "rate"}}
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
