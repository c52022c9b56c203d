"""CPU threads that share the machine: how many torch uses, and how they wait.

torch's defaults (one intra-op thread per core, OpenMP's spinning wait) collapse when another
process holds a core: every parallel op waits at its barrier for the thread whose core is taken
(BENCHMARKS.md, "Sharing the CPU"). So ``import sca_caption`` (every command, the Python API),
when torch is not loaded yet and the environment does not say otherwise, sets

- ``OMP_NUM_THREADS`` to the cores free when the process starts (``free_cores``: the idle share
  of the cores this process may run on, over a tenth of a second), at least one;
- ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps instead of spinning.

``SCA_CAPTION_THREADS=torch`` keeps torch's defaults (the behaviour before this module); a number
``SCA_CAPTION_THREADS=N`` sets N threads. ``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` set by the
user are kept as they are.
"""

from __future__ import annotations

import os
import sys
import time

SETTING = "SCA_CAPTION_THREADS"


def free_cores(seconds: float = 0.1) -> int:
    """The cores of this process's affinity set that were idle over ``seconds``, rounded, at
    least 1 (all of them where ``/proc/stat`` cannot be read)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return cores
    total = sum(after) - sum(before)
    idle = (after[3] + after[4]) - (before[3] + before[4])  # idle and iowait
    if total <= 0:
        return cores
    machine = os.cpu_count() or cores
    return max(1, min(cores, round(machine * idle / total)))


def _cpu_times() -> list[int]:
    """The machine's summed CPU times from ``/proc/stat`` (user, nice, system, idle, iowait, ...)."""
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:]]


def share_the_cpu() -> None:
    """Set the thread count and wait policy above for the torch this process will load; nothing
    once torch is loaded, or with ``SCA_CAPTION_THREADS=torch``."""
    setting = os.environ.get(SETTING, "").strip()
    if setting == "torch" or "torch" in sys.modules:
        return
    if setting and not (setting.isdigit() and int(setting) >= 1):
        raise SystemExit(f"error: {SETTING}={setting!r}: expected 'torch' or a number of threads >= 1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = setting or str(free_cores())
