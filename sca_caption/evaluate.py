"""Score a trained checkpoint on a split: beam search, COCO-format results, BLEU/METEOR/ROUGE-L/CIDEr.

    python -m sca_caption.evaluate --checkpoint checkpoints/shapes/best.pt --split test --beam 5
    python -m sca_caption.evaluate --checkpoint CKPT --data-root ../shared/data/flickr8k --out results.json

The dataset, vocabulary, backbone and caption length come from the checkpoint; the references
are all captions of the split in the dataset. A missing feature cache is extracted first. Scores
print x100 (as papers print them) and, on the last line, as JSON on pycocoevalcap's 0-1 scale;
for shapes also ``shapes_accuracy``.
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import json
import sys
from pathlib import Path

import torch

from sca_caption.data.corpus import SPLITS
from sca_caption.decode_options import add_decode_options, decode_changes
from sca_caption.decoding import DecodeSettings
from sca_caption.devices import add_device_option, default_device
from sca_caption.errors import command
from sca_caption.io_utils import COCO_RESULTS, check_output_file, check_output_folder
from sca_caption.evaluation import evaluate_checkpoint
from sca_caption.metrics import write_coco_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sca_caption.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a best.pt or last.pt of a training run")
    parser.add_argument("--split", choices=SPLITS, default="test")
    add_decode_options(parser)
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: beside the checkpoint, named after the split and decoding, e.g. results_test_beam3.json)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder (default: the checkpoint's)")
    parser.add_argument("--no-meteor", action="store_true", help="leave METEOR out (saves a Java start)")
    add_device_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _results_id(image_id: str, dataset: str) -> int | str:
    """An image's id in the results file: COCO's numeric ids as ints (as COCO's own results files
    and ``pycocotools`` have them, and as the caption CLI writes them), other ids as they are."""
    return int(image_id) if dataset == "coco" else image_id


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(default_device(args.device))
    if args.out is not None:
        check_output_file(args.out, "results file", inputs={args.checkpoint: "the checkpoint to evaluate"},
                          replaces=COCO_RESULTS)
    else:
        check_output_folder(args.checkpoint.parent, "results file (--out puts it elsewhere)")
    evaluation, config = evaluate_checkpoint(
        args.checkpoint, args.split, device=device, decode_changes=decode_changes(args), data_root=args.data_root,
        meteor=not args.no_meteor, progress=not args.no_progress,
    )
    print(f"{len(evaluation.captions)} captions of the {args.split} split, {_describe(config.decode)}")
    if evaluation.missing:
        print(f"note: {len(evaluation.missing)} image(s) of the split are not in the feature cache and were not scored")
    for name, value in evaluation.scores.items():
        print(f"{name:>16} {100 * value:6.2f}")
    sys.stdout.flush()  # the scores first: a results file that cannot be written loses nothing
    out = args.out
    if out is None:  # named after the decoding, known now: the same rule as --out, before writing
        out = args.checkpoint.with_name(results_name(args.split, config.decode))
        check_output_file(out, "results file", replaces=COCO_RESULTS)
    write_coco_results(out, {_results_id(k, config.data.dataset): v for k, v in evaluation.captions.items()})
    print(f"{out}: the captions, as COCO results")
    print(json.dumps(evaluation.scores))
    return 0


def results_name(split: str, decode: DecodeSettings) -> str:
    """``results_<split>_beam<k>.json``, with each other decoding setting that is not the default
    in the name (``_average``, ``_wu1.5``, ``_min2``, ``_blocked``), so that two decodings never
    share a results file."""
    parts = [f"results_{split}_beam{decode.beam_size}"]
    if decode.length_penalty != "none":
        parts.append(decode.length_penalty + (f"{decode.alpha:g}" if decode.length_penalty == "wu" else ""))
    if decode.min_length:
        parts.append(f"min{decode.min_length}")
    if decode.block_trigrams:
        parts.append("blocked")
    return "_".join(parts) + ".json"


def _describe(decode: DecodeSettings) -> str:
    """"beam 3", plus the constraints and penalty that are on."""
    parts = [f"beam {decode.beam_size}"]
    if decode.length_penalty != "none":
        parts.append(f"length penalty {decode.length_penalty}" + (f" (alpha {decode.alpha})" if decode.length_penalty == "wu" else ""))
    if decode.min_length:
        parts.append(f"at least {decode.min_length} word{'s' if decode.min_length != 1 else ''}")
    if decode.block_trigrams:
        parts.append("trigrams blocked")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
