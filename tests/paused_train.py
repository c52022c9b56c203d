"""``python -m sca_caption.train`` that stops after optimizer step K (``--pause-after K``, first
argument): it prints ``PAUSED`` and sleeps, so a test can SIGKILL it at a known point mid-epoch.
The pause is a ``Trainer`` step callback; everything else is the train CLI's own code."""

from __future__ import annotations

import sys
import time

from sca_caption.distributed import start_processes
from sca_caption.prepare import prepare
from sca_caption.train import experiment_config, parse_args
from sca_caption.trainer import Trainer

PAUSED = "PAUSED"


def main(argv: list[str]) -> None:
    assert argv[0] == "--pause-after"
    pause_after, args = int(argv[1]), parse_args(argv[2:])

    def pause(step: int) -> None:
        if step == pause_after:
            print(PAUSED, flush=True)
            time.sleep(3600)

    config = experiment_config(args)
    processes = start_processes(args.device)
    Trainer(config, prepare(config, progress=False, processes=processes), args.out, processes, progress=False, on_step=pause).run()


if __name__ == "__main__":
    main(sys.argv[1:])
