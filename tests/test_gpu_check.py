"""benchmarks/gpu_check.py: its arguments, a failing check reported while the others go on, and
its CPU dry run (``--device cpu --tiny``) end to end, every check passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
CHECKS = ["environment", "train_speed", "beam_speed", "resume", "ddp_step", "serve_batching", "shipped_captions"]
NEED_DATA = {"shipped_captions"}  # ok null with a reason where ../shared/data is absent


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def lines(done: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "meta"], "only cpu and cuda devices are supported"),
        (["--device", "tpu"], "is not a device name"),
        (["--device", "cpu", "--checks", "environment,warp_speed"], "unknown check warp_speed"),
        (["--device", "cpu", "--checks", ","], "unknown check"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(args: list[str], message: str) -> None:
    done = gpu_check(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_default_device_is_cuda_and_refused_without_it() -> None:
    done = gpu_check("--checks", "environment")
    assert done.returncode == 2
    assert "'cuda': CUDA is not available on this machine" in done.stderr


def test_a_failing_check_says_why_and_the_next_still_runs(tmp_path: Path) -> None:
    (tmp_path / "Flicker8k_Dataset").mkdir()
    (tmp_path / "Flickr_8k.testImages.txt").write_text("missing_photo.jpg\n")
    done = gpu_check("--device", "cpu", "--tiny", "--checks", "shipped_captions,environment", "--data-root", str(tmp_path))
    assert done.returncode == 1, done.stderr[-2000:]
    failed, environment = lines(done)
    assert failed["check"] == "shipped_captions" and failed["ok"] is False
    assert failed["error"] == f"1 of the first 1 test images are missing from {tmp_path / 'Flicker8k_Dataset'}, first missing_photo.jpg"
    assert environment["check"] == "environment" and environment["ok"] is True
    assert environment["device"] == "cpu" and environment["sizes"] == "tiny"


def test_absent_data_skips_the_caption_comparison_with_a_reason(tmp_path: Path) -> None:
    done = gpu_check("--device", "cpu", "--tiny", "--checks", "shipped_captions", "--data-root", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr[-2000:]
    (skipped,) = lines(done)
    assert skipped["ok"] is None and "no Flickr8k test images" in skipped["reason"]


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check() -> None:
    done = gpu_check("--device", "cpu", "--tiny", timeout=600)
    results = lines(done)
    assert [r["check"] for r in results] == CHECKS, done.stderr[-2000:]
    for result in results:
        if result["ok"] is None:
            assert result["check"] in NEED_DATA and result["reason"], result
        else:
            assert result["ok"] is True, result
    assert done.returncode == 0
    by_name = {r["check"]: r for r in results}
    train = by_name["train_speed"]["runs"]
    assert {(r["kernels"], r["bf16"]) for r in train} == {(k, b) for k in ("plain", "cpu") for b in (False, True)}
    assert all(r["captions_per_s"] > 0 and r["peak_gpu_mb"] is None for r in train)
    assert {r["kernels"] for r in by_name["beam_speed"]["runs"]} == {"plain", "cpu"}
    resume = by_name["resume"]
    assert (resume["stopped_at_step"], resume["final_step"], resume["bitwise_equal"], resume["rng_restored"]) == (2, 4, True, True)
    ddp = by_name["ddp_step"]
    assert (ddp["backend"], ddp["max_abs_weight_difference"]) == ("gloo", 0.0)
    serve = by_name["serve_batching"]
    assert set(serve["batch_sizes"]["single"]) == {"1"} and max(map(int, serve["batch_sizes"]["batched"])) > 1
    shipped = by_name["shipped_captions"]
    if shipped["ok"] is not None:  # the CPU against itself: nothing differs
        assert (shipped["images"], shipped["differing"], shipped["max_score_difference_same_caption"]) == (8, 0, 0.0)
