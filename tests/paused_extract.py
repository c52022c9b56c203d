"""``preprocess/extract_features.py`` that stops at a known point (``--pause-at STAGE:K``, first
argument): when the extractor reports ``K`` for ``STAGE`` ("part": part files this process wrote,
"merge": rows merged) it prints ``PAUSED`` and sleeps, so a test can SIGKILL it there. The pause is
an ``extract_features`` progress callback; everything else is the CLI's own code. Under torchrun
each process pauses at its own K-th part file; only rank 0 merges."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

from sca_caption.data.feature_extraction import extract_features
from sca_caption.distributed import start_processes

PAUSED = "PAUSED"
CLI = Path(__file__).resolve().parents[1] / "preprocess" / "extract_features.py"


def main(argv: list[str]) -> None:
    assert argv[0] == "--pause-at"
    stage, count = argv[1].split(":")
    cli = runpy.run_path(str(CLI))  # the CLI's functions (its main does not run)
    args = cli["parse_args"](argv[2:])

    def pause(reached: str, done: int) -> None:
        if (reached, done) == (stage, int(count)):
            print(PAUSED, flush=True)
            time.sleep(3600)

    processes = start_processes("cpu")
    records, spec = processes.main_first(lambda: cli["extraction_inputs"](args))
    extract_features(
        records, spec, args.out, batch_size=args.batch_size, workers=args.workers, progress=False,
        processes=processes, on_progress=pause,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
