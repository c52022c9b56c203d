"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, NCCL on GPU).

``torchrun --nproc_per_node N -m sca_caption.train ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` for each process; without them the run is a single process and nothing here talks
to other processes. Rank 0 loads the corpus and writes the vocabulary first, then the others; all
extract the feature cache together (each a share of the images, rank 0 merging). Every process
trains and validates; rank 0 alone writes checkpoints and logs, while the others wait for it at
the collective calls below.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from sca_caption.devices import default_device

# The longest waits: rank 0 merging the processes' shares of a feature cache, or writing checkpoints.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for one process)."""
        if self.distributed:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> float:
        """The sum of a scalar ``value`` (on any device) over all processes."""
        if self.distributed:
            value = value.detach().to(self.device, copy=True)  # NCCL reduces only tensors on the GPU
            dist.all_reduce(value)
        return float(value)

    def main_first(self, action: Callable[[], T]) -> T:
        """``action()`` on every process, rank 0's run first and the others' after it: for work
        whose first run writes files (a generated dataset, a vocabulary) the later ones read."""
        if self.is_main:
            result = action()
        self.barrier()
        if not self.is_main:
            result = action()
        return result

    def main_says(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every process."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())


ONE_PROCESS = Processes(0, 1, torch.device("cpu"))  # a run of one process: nothing to talk to


def start_processes(device: str | None = None) -> Processes:
    """Join the process group ``torchrun`` describes in the environment (if any) and pick the device.

    device: "cpu", "cuda" or "cuda:N"; None takes CUDA where available. Under torchrun on CUDA each
    process uses GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = torch.device(default_device(device))
    if chosen.type == "cuda" and (world > 1 or chosen.index is None):
        chosen = torch.device("cuda", local_rank)  # set_device needs an index: "cuda" alone is GPU 0
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, world, chosen)


def stop_processes(processes: Processes) -> None:
    """Leave the process group (after the last collective call)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()
