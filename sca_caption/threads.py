"""CPU threads that share the machine: how many intra-op threads torch uses.

torch's default, one thread per core, collapses when another process holds a core: every parallel
op waits at its barrier, spinning, for the thread whose core is taken (beside one busy process the
shapes training step fell from 421 to 4.5 captions/s on 2 cores; BENCHMARKS.md, "Sharing the
CPU"). A passive OpenMP wait avoids the collapse but halves the speed alone (215), and so do
shorter spins; one thread per *free* core keeps both (421 alone; 295 beside a busy process). So
``import sca_caption`` (every command, the Python API), when torch is not loaded yet and the
environment does not say otherwise, sets ``OMP_NUM_THREADS`` to the cores free when the process
starts (``free_cores``), at least one. A process that takes a core later still slows a run that
started with every core.

``SCA_CAPTION_THREADS=torch`` keeps torch's defaults (the behaviour before this module); a number
``SCA_CAPTION_THREADS=N`` sets N threads. An ``OMP_NUM_THREADS`` the user set is kept. For
bit-for-bit repeats of a training run across machines or loads, set the thread count.
"""

from __future__ import annotations

import os
import sys
import time

SETTING = "SCA_CAPTION_THREADS"


def free_cores(seconds: float = 0.1) -> int:
    """The cores of this process's affinity set that were idle (or running niced work, which
    yields to this process) over ``seconds``, rounded, at least 1 (all of them where
    ``/proc/stat`` cannot be read)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return cores
    total = sum(after) - sum(before)
    idle = sum(after[i] - before[i] for i in (1, 3, 4))  # nice, idle and iowait
    if total <= 0:
        return cores
    machine = os.cpu_count() or cores
    return max(1, min(cores, round(machine * idle / total)))


def _cpu_times() -> list[int]:
    """The machine's summed CPU times from ``/proc/stat`` (user, nice, system, idle, iowait, ...)."""
    with open("/proc/stat") as stat:
        return [int(value) for value in stat.readline().split()[1:]]


def share_the_cpu() -> None:
    """Set the thread count above for the torch this process will load; nothing once torch is
    loaded, or with ``SCA_CAPTION_THREADS=torch``."""
    setting = os.environ.get(SETTING, "").strip()
    if setting == "torch" or "torch" in sys.modules:
        return
    if setting and not (setting.isdigit() and int(setting) >= 1):
        raise SystemExit(f"error: {SETTING}={setting!r}: expected 'torch' or a number of threads >= 1")
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = setting or str(free_cores())
