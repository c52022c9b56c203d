"""``python -m sca_caption.train`` with test-side instrumentation (the trainer has no hooks of its
own): interrupted at a known point mid-epoch, or watched, under torchrun too. Leading options:

- ``--pause-after K``: after optimizer step K it prints ``PAUSED`` and sleeps (for a SIGKILL);
- ``--signal-after K NAME``: after step K it sends itself the real signal NAME (e.g. SIGTERM), as
  ``kill`` would arrive in the middle of training;
- ``--signal-group-after K NAME``: the same to its whole process group (its DataLoader workers
  too), as a terminal's Ctrl-C arrives (start it in a session of its own);
- ``--note-saves FILE``: each checkpoint saved appends a line ``RANK NAME STEP`` to FILE;
- ``--collective-timeout S``: collective calls between processes time out after S seconds;
- ``--slow-validation S``: each validation and test decoding takes S seconds longer.

"After step K" wraps ``Trainer._stop_if_signalled``, which every optimizer step ends with (after
any checkpoint of that step). Everything else is the train CLI's own code (``train.main``)."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from sca_caption import distributed, train, trainer
from sca_caption.trainer import Trainer

PAUSED = "PAUSED"


def after_each_step(action: Callable[[int], None]) -> None:
    """Run ``action(step)`` at the end of every optimizer step, before the trainer looks for signals."""
    stop_if_signalled = Trainer._stop_if_signalled

    def wrapped(self: Trainer, started: float) -> None:
        action(self.at.step)
        stop_if_signalled(self, started)

    Trainer._stop_if_signalled = wrapped  # type: ignore[method-assign]


def pause_after(step: int) -> None:
    def pause(at: int) -> None:
        if at == step:
            print(PAUSED, flush=True)
            time.sleep(3600)

    after_each_step(pause)


def signal_after(step: int, name: str, group: bool) -> None:
    number = signal.Signals[name]

    def send(at: int) -> None:
        if at == step:
            os.killpg(os.getpgid(0), number) if group else os.kill(os.getpid(), number)

    after_each_step(send)


def note_saves(file: str) -> None:
    save = trainer.save_checkpoint

    def noted(path: Path, checkpoint: Any) -> None:
        with open(file, "a") as handle:
            handle.write(f"{os.environ.get('RANK', '0')} {Path(path).name} {checkpoint.step}\n")
        save(path, checkpoint)

    trainer.save_checkpoint = noted


def collective_timeout(seconds: str) -> None:
    distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(seconds))


def slow_validation(seconds: str) -> None:
    evaluate = trainer.evaluate_model

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(float(seconds))
        return evaluate(*args, **kwargs)

    trainer.evaluate_model = slow


def instrument(argv: list[str]) -> list[str]:
    """Apply the leading options of ``argv``; returns the train CLI's arguments."""
    while argv and argv[0] in OPTIONS:
        take, apply = OPTIONS[argv[0]]
        apply(*argv[1 : 1 + take])
        argv = argv[1 + take :]
    return argv


OPTIONS: dict[str, tuple[int, Callable[..., None]]] = {
    "--pause-after": (1, lambda step: pause_after(int(step))),
    "--signal-after": (2, lambda step, name: signal_after(int(step), name, group=False)),
    "--signal-group-after": (2, lambda step, name: signal_after(int(step), name, group=True)),
    "--note-saves": (1, note_saves),
    "--collective-timeout": (1, collective_timeout),
    "--slow-validation": (1, slow_validation),
}


if __name__ == "__main__":
    sys.exit(train.main(instrument(sys.argv[1:])))
