"""Sharing the CPU: the thread count that importing the package gives torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sca_caption import threads

REPO = Path(__file__).resolve().parents[1]
PROBE = "import os, sca_caption, torch, json; print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads()]))"


def probe(**env: str) -> list:
    """In a fresh process: import the package then torch -> [OMP_WAIT_POLICY, OMP_NUM_THREADS, torch's threads]."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", threads.SETTING)}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_free_cores_counts_the_idle_share_of_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # user nice system idle iowait ...: over the sample, 2 cores' worth of time passed, half of it idle
    samples = iter([[100, 0, 0, 100, 0, 0], [200, 0, 0, 200, 0, 0]])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: {0, 1})
    assert threads.free_cores(0) == 1
    samples = iter([[0, 0, 0, 0, 0], [10, 0, 0, 0, 0]])  # every core busy: still one thread
    assert threads.free_cores(0) == 1
    samples = iter([[0, 0, 0, 0, 0], [0, 0, 0, 9, 1]])  # idle and waiting on I/O count as free
    assert threads.free_cores(0) == 2
    samples = iter([[0, 0, 0, 0, 0], [0, 10, 0, 0, 0]])  # so does niced work: it yields to this process
    assert threads.free_cores(0) == 2


def test_importing_the_package_first_sets_torchs_threads_to_the_free_cores() -> None:
    policy, count, torch_threads = probe()
    assert policy is None  # OpenMP's own wait: a passive one halves the speed alone
    assert 1 <= int(count) <= len(os.sched_getaffinity(0)) and torch_threads == int(count)


def test_a_number_of_threads_or_torchs_defaults_can_be_asked_for() -> None:
    assert probe(SCA_CAPTION_THREADS="1") == [None, "1", 1]
    policy, count, torch_threads = probe(SCA_CAPTION_THREADS="torch")
    assert policy is None and count is None
    assert torch_threads == len(os.sched_getaffinity(0))  # torch's own default: every core


def test_the_users_openmp_settings_are_kept() -> None:
    assert probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "1", 1]


def test_a_bad_setting_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-c", "import sca_caption"], env={**os.environ, "PYTHONPATH": str(REPO), threads.SETTING: "two"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: SCA_CAPTION_THREADS='two': expected 'torch' or a number of threads >= 1"
