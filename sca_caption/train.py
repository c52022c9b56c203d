"""Train an SCA-CNN captioner: prepares what is missing, trains, validates, keeps checkpoints.

    python -m sca_caption.train                                  # shapes, configs/shapes.yaml
    python -m sca_caption.train --dataset flickr8k --data-root ../shared/data/flickr8k train.epochs=5
    python -m sca_caption.train --resume                         # continue checkpoints/shapes/last.pt
    torchrun --nproc_per_node 2 -m sca_caption.train ...         # data parallel (gloo/NCCL)

Settings: configs/<dataset>.yaml, then --config FILE, then ``section.key=value`` overrides.
Writes best.pt, last.pt, log.csv, test_scores.json and config.yaml into --out
(default checkpoints/<dataset>).
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import json
import sys
from pathlib import Path

from sca_caption.config import ExperimentConfig, load_config
from sca_caption.data.datasets import CORPORA
from sca_caption.data.download import download_dataset
from sca_caption.devices import add_device_option
from sca_caption.io_utils import check_output_folder, check_path_name
from sca_caption.distributed import start_processes, stop_processes
from sca_caption.errors import command
from sca_caption.prepare import data_root, prepare
from sca_caption.trainer import Trainer, TrainingError, TrainResult, resume_checkpoint

DEFAULT_DATASET = "shapes"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sca_caption.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=CORPORA, default=None, help=f"preset configs/<dataset>.yaml (default {DEFAULT_DATASET} without --config)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file applied after the preset")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder (default data/<dataset>)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default checkpoints/<dataset>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                        help="start a new run from this checkpoint's model weights (e.g. train.scst_after=0 on a cross-entropy run)")
    parser.add_argument("--download", action="store_true", help="first fetch the dataset's public files (preprocess/download.py)")
    add_device_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-3 model.layers=[stage6,stage7]")
    args = parser.parse_args(argv)
    if args.resume and args.init_from is not None:
        parser.error("--resume continues a run, --init-from starts one: pass one of them")
    return args


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    """Preset < --config < overrides < --data-root."""
    preset = args.dataset or (DEFAULT_DATASET if args.config is None else None)
    overrides = list(args.overrides)
    if args.data_root is not None:
        overrides.append(f"data.data_root={json.dumps(str(args.data_root))}")
    return load_config(preset, args.config, overrides)


def print_result(result: TrainResult) -> None:
    """The test scores (x100, as papers print them) and where the run is."""
    scores = ", ".join(f"{name} {100 * value:.1f}" for name, value in result.test_scores.items())
    print(f"test scores of the best epoch ({result.best_epoch}): {scores}")
    print(json.dumps({"test": result.test_scores, "best_epoch": result.best_epoch, "out": str(result.out)}))


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = experiment_config(args)  # config_rules refuse settings that cannot work together
    processes = start_processes(args.device)
    try:
        out = check_path_name(args.out, "run folder") if args.out is not None else Path("checkpoints") / config.data.dataset
        if not args.resume and (out / "test_scores.json").exists():
            # a finished run: re-running the same command (the README's first) redoes nothing
            print(f"{out} holds a finished run (best.pt, test_scores.json); --out DIR starts another")
            return 0
        check_output_folder(out, "run folder")
        if args.init_from is not None and args.init_from.name in ("best.pt", "last.pt") and args.init_from.resolve().parent == out.resolve():
            raise TrainingError(f"{args.init_from}: the run would write over the checkpoint it starts from; pass another --out")
        if args.resume:
            resume_checkpoint(out, config)  # refused before any preparation when absent or of other settings
        progress = not args.no_progress
        if processes.is_main and args.download:
            download_dataset(config.data.dataset, data_root(config), progress=progress)
        data = prepare(config, progress=progress, processes=processes)  # every rank extracts a share
        trainer = Trainer(config, data, out, processes, resume=args.resume, progress=progress, init_from=args.init_from)
        result = trainer.run()
    finally:
        stop_processes(processes)
    if processes.is_main:
        print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
