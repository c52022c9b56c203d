"""The SCA-CNN attention ablation on the shapes dataset: one training run per variant, one JSON line each.

    python benchmarks/shapes_ablation.py                      # all rows, configs/shapes.yaml
    python benchmarks/shapes_ablation.py --rows cs,none train.epochs=4

Rows (``--rows``, comma separated): cs (channel then spatial, the paper's best), sc (spatial then
channel), s (spatial only), c (channel only), none (no attention: the mean feature), cs2 (C-S over
two layers, stage6 and stage7), updown (C-S with Up-Down's two-LSTM decoder, ``model.decoder=updown``). Every row trains from scratch into ``--out-root/<row>`` with the
shapes preset plus the given ``section.key=value`` overrides, and prints the best checkpoint's
test scores (0-1 scale), its best epoch and the wall time of preparation and training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sca_caption.config import load_config
from sca_caption.distributed import start_processes
from sca_caption.prepare import prepare
from sca_caption.trainer import Trainer

ROWS: dict[str, tuple[str, ...]] = {
    "cs": ("model.order=cs",),
    "sc": ("model.order=sc",),
    "s": ("model.order=s",),
    "c": ("model.order=c",),
    "none": ("model.order=none",),
    "cs2": ("model.order=cs", "model.layers=[stage6,stage7]"),
    "updown": ("model.order=cs", "model.decoder=updown"),
}
REPORTED = ("shapes_accuracy", "CIDEr", "Bleu_4", "METEOR", "ROUGE_L")


def run_row(name: str, overrides: list[str], out_root: Path) -> dict[str, object]:
    """Train one row from scratch; its test scores and timings."""
    config = load_config("shapes", overrides=[*ROWS[name], *overrides])
    out = out_root / name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    data = prepare(config, progress=False, log=lambda line: print(line, file=sys.stderr))
    prepared = time.perf_counter()
    result = Trainer(config, data, out, start_processes("cpu"), progress=False, log=lambda line: print(line, file=sys.stderr)).run()
    finished = time.perf_counter()
    return {
        "row": name,
        "order": config.model.order,
        "layers": list(config.model.layers),
        "epochs": config.train.epochs,
        **{key: result.test_scores[key] for key in REPORTED if key in result.test_scores},
        "best_epoch": result.best_epoch,
        "prepare_s": round(prepared - started, 1),
        "train_s": round(finished - prepared, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--out-root", type=Path, default=Path("runs/shapes_ablation"), help="one run folder per row here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every row")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    for name in rows:
        print(json.dumps(run_row(name, args.overrides, args.out_root)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
