"""``python -m sca_caption.train`` stopped at a known point mid-epoch, for tests that interrupt it.
The test side wraps ``Trainer._stop_if_signalled`` (which every optimizer step ends with, after
any checkpoint of that step); the trainer has no hook of its own. First arguments:

- ``--pause-after K``: after optimizer step K it prints ``PAUSED`` and sleeps (for a SIGKILL);
- ``--signal-after K NAME``: after step K it sends itself the real signal NAME (e.g. SIGTERM), as
  ``kill`` would arrive in the middle of training;
- ``--signal-group-after K NAME``: the same to its whole process group (its DataLoader workers
  too), as a terminal's Ctrl-C arrives (start it in a session of its own).

Everything else is the train CLI's own code (``train.main``)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

from sca_caption import train
from sca_caption.trainer import Trainer

PAUSED = "PAUSED"


def callback(argv: list[str]) -> tuple[Callable[[int], None], list[str]]:
    """The action after each step the first arguments ask for, and the train CLI's arguments."""
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


def after_each_step(action: Callable[[int], None]) -> None:
    """Run ``action(step)`` at the end of every optimizer step, before the trainer looks for signals."""
    stop_if_signalled = Trainer._stop_if_signalled

    def wrapped(self: Trainer, started: float) -> None:
        action(self.at.step)
        stop_if_signalled(self, started)

    Trainer._stop_if_signalled = wrapped  # type: ignore[method-assign]


if __name__ == "__main__":
    action, rest = callback(sys.argv[1:])
    after_each_step(action)
    sys.exit(train.main(rest))
