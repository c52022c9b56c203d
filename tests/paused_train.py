"""``python -m sca_caption.train`` with a step callback, for tests that interrupt it at a known
point mid-epoch. First arguments:

- ``--pause-after K``: after optimizer step K it prints ``PAUSED`` and sleeps (for a SIGKILL);
- ``--signal-after K NAME``: after step K it sends itself the real signal NAME (e.g. SIGTERM), as
  ``kill`` would arrive in the middle of training;
- ``--signal-group-after K NAME``: the same to its whole process group (its DataLoader workers
  too), as a terminal's Ctrl-C arrives (start it in a session of its own).

Everything else is the train CLI's own code (``train.main`` with the callback's trainer)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

from sca_caption.distributed import start_processes
from sca_caption.errors import command
from sca_caption.prepare import prepare
from sca_caption.train import experiment_config, parse_args
from sca_caption.trainer import Trainer

PAUSED = "PAUSED"


def callback(argv: list[str]) -> tuple[Callable[[int], None], list[str]]:
    """The step callback the first arguments ask for, and the train CLI's arguments."""
    if argv[0] == "--pause-after":
        step = int(argv[1])

        def pause(at: int) -> None:
            if at == step:
                print(PAUSED, flush=True)
                time.sleep(3600)

        return pause, argv[2:]
    assert argv[0] in ("--signal-after", "--signal-group-after")
    step, number, group = int(argv[1]), signal.Signals[argv[2]], argv[0] == "--signal-group-after"

    def send(at: int) -> None:
        if at == step:
            os.killpg(os.getpgid(0), number) if group else os.kill(os.getpid(), number)

    return send, argv[3:]


@command
def main(argv: list[str] | None) -> int:
    on_step, rest = callback(argv or [])
    args = parse_args(rest)
    config = experiment_config(args)
    processes = start_processes(args.device)
    data = prepare(config, progress=False, processes=processes)
    Trainer(config, data, args.out, processes, resume=args.resume, progress=False, on_step=on_step).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
