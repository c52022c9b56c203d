"""Caption image files with a trained checkpoint.

    python -m sca_caption.caption [--checkpoint CKPT] PATH...

PATH: an image file, a folder (its image files by extension, sorted, not recursive) or a glob
pattern (quote it; ``**`` recurses). Without ``--checkpoint``: the shipped Flickr8k model
``checkpoints/flickr8k_cs_lite0.pt`` if present, else the newest ``checkpoints/*/best.pt``, else
the shipped model installed with the package, run from any folder (``captioning.default_checkpoint``),
named in a note on stderr.

stdout, one line per image in input order: ``PATH<TAB>CAPTION``. With ``--n-best K``: K lines
per image, ``PATH<TAB>RANK<TAB>SCORE<TAB>CAPTION`` with RANK 1..K (best first) and SCORE the
ranking score (the log-probability, divided by the length penalty if one is set), 4 decimals.
So that a record is always one line of tab-separated fields, PATH is printed with a backslash,
tab, newline or carriage return in it escaped as ``\\\\``, ``\\t``, ``\\n``, ``\\r``, and bytes of a
name that are not UTF-8 as ``\\xNN``, here and in ``--json`` (other paths print as they are).

``--json FILE``: a COCO results list, one entry per captioned image: ``image_id`` (the number of
a COCO file name, else the file name stem), ``caption``, ``file``, ``score``, ``log_prob``,
``finished`` (false if cut at --max-length), with ``--n-best`` the list ``n_best``, and per word
``attention``: for each attended layer the spatial map's ``grid`` [h, w], ``argmax`` [row, col],
its ``weight`` and ``entropy`` (nats), and ``top_channels`` [[channel, weight], ...].

``--attention DIR``: one PNG per image (its file name stem, ``-2``... on repeats) showing each
word's spatial attention per layer over the image.

A file that cannot be captioned (missing, unreadable, not an image, truncated, too large) is
reported on stderr in one line; the others are still captioned. Exit status: 0 when every image
was captioned, 1 when any file failed, 2 when nothing was run (bad arguments, a pattern matching
nothing, a folder without images, an unusable checkpoint).
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sca_caption.attention_maps import png_names, render_attention
from sca_caption.captioning import (
    GLOB_CHARACTERS,
    CaptionedImage,
    DecodeSettings,
    FailedImage,
    ImageCaptioner,
    collect_images,
    default_checkpoint,
    path_text,
    result_entry,
)
from sca_caption.decode_options import DECODE_OPTIONS, add_decode_options, decode_changes
from sca_caption.devices import add_device_option, default_device
from sca_caption.errors import Interrupted, SCACaptionError, command
from sca_caption.io_utils import COCO_RESULTS, OutputError, atomic_write, atomic_write_text, check_output_file, check_output_folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sca_caption.caption",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: checkpoints/flickr8k_cs_lite0.pt if present, else the newest checkpoints/*/best.pt, "
                             "else the shipped model installed with the package")
    add_decode_options(parser, DECODE_OPTIONS)  # --n-best K: K lines per image, PATH RANK SCORE CAPTION
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write COCO-format results here")
    parser.add_argument("--attention", type=Path, default=None, metavar="DIR", help="write attention PNGs here")
    parser.add_argument("--top-channels", type=int, default=5, help="channels per word and layer in --json (default 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2; 0: none)")
    add_device_option(parser)
    parser.add_argument("--backbone-weights", default=None,
                        help="imagenet, none or a state dict file: the weights the checkpoint's feature cache was "
                             "built with (default: those its config names)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.top_channels < 1:
        parser.error("--batch-size and --top-channels must be positive, --workers not negative")
    args.device = default_device(args.device)
    return args


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json is not None:
        check_output_file(args.json, "--json file")
    if args.attention is not None:
        check_output_folder(args.attention, "--attention folder")
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint, which = default_checkpoint()
        print(f"note: no --checkpoint given: using {checkpoint} ({which})", file=sys.stderr)
    paths = collect_images(args.paths)
    _check_outputs_are_not_inputs(args, paths)
    if args.json is not None:  # replaces only a results file, never the checkpoint (the images: just above)
        check_output_file(args.json, "--json file", inputs={checkpoint: "the checkpoint"}, replaces=COCO_RESULTS)
    captioner = ImageCaptioner.from_checkpoint(checkpoint, device=args.device, backbone_weights=args.backbone_weights)
    if args.attention is not None and not captioner.has_spatial_attention:
        _error(f"{checkpoint}: its model (order {captioner.model.config.order!r}) has no spatial attention to draw")
        return 2
    settings = captioner.settings(**decode_changes(args), attention=args.json is not None or args.attention is not None)
    many = any(os.path.isdir(p) or GLOB_CHARACTERS.search(p) for p in args.paths)
    tally = Tally()
    try:
        _run(captioner, paths, settings, args, tally, progress=many and not args.no_progress)
    except (KeyboardInterrupt, SCACaptionError) as stopped:  # keep what was done
        kept = ""
        if args.json is not None and tally.entries:
            atomic_write_text(args.json, _json_lines(tally.entries))
            kept = f"; {args.json} holds the captions of those"
        if isinstance(stopped, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {tally.done} of {len(paths)} images{kept}") from None
        raise
    if args.json is not None:
        atomic_write_text(args.json, _json_lines(tally.entries))
    failed = tally.failed
    if failed:
        _error(f"{failed} of {len(paths)} image{'s' if len(paths) != 1 else ''} could not be captioned")
    return 1 if failed else 0


def _check_outputs_are_not_inputs(args: argparse.Namespace, paths: list[Path]) -> None:
    """Refuse (``OutputError``) a ``--json`` file or an ``--attention`` PNG that is one of the images."""
    inputs = {os.path.realpath(p) for p in paths}
    outputs = [(args.json, "--json")] if args.json is not None else []
    if args.attention is not None:
        outputs += [(args.attention / name, f"--attention {args.attention}") for name in png_names(paths)]
    for path, option in outputs:
        if os.path.realpath(path) in inputs:
            raise OutputError(f"{path}: is one of the images to caption; {option} would overwrite it")


@dataclass
class Tally:
    """How far ``_run`` got: the JSON entry of each image captioned (None without ``--json``),
    recorded before its caption is printed, and the failures."""

    captioned: list[dict[str, Any] | None] = field(default_factory=list)
    failed: int = 0

    @property
    def done(self) -> int:
        return len(self.captioned) + self.failed

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [entry for entry in self.captioned if entry is not None]


def _run(
    captioner: ImageCaptioner, paths: list[Path], settings: DecodeSettings, args: argparse.Namespace, tally: Tally,
    progress: bool,
) -> None:
    """Caption ``paths``, printing as results come and counting them in ``tally``."""
    names = png_names(paths) if args.attention is not None else []
    if args.attention is not None:
        args.attention.mkdir(parents=True, exist_ok=True)
    results = captioner.caption_files(
        paths, settings, batch_size=args.batch_size, workers=args.workers, keep_images=args.attention is not None
    )
    with tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr, disable=not progress) as bar:
        for index, result in enumerate(results):
            bar.update(1)
            if isinstance(result, FailedImage):
                tally.failed += 1
                tqdm.write(f"error: {result.problem}", file=sys.stderr)
                continue
            if args.attention is not None:
                best = result.captions[0]
                title = f"{result.path}: {best.text}  (score {best.hypothesis.score:.4f})"
                assert result.image is not None
                with atomic_write(args.attention / names[index]) as handle:
                    render_attention(result.image, best, captioner.layers, title).save(handle, format="PNG")
            entry = None
            if args.json is not None:
                entry = result_entry(
                    result, captioner.layers, n_best=args.n_best is not None, attention=True,
                    top_channels=args.top_channels,
                )
            tally.captioned.append(entry)  # recorded first: every caption printed is in the JSON
            _print_captions(result, args.n_best is not None)


RECORD_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _print_captions(result: CaptionedImage, scored: bool) -> None:
    path = path_text(str(result.path).translate(RECORD_ESCAPES))  # one line of UTF-8, whatever the file's name
    if not scored:
        print(f"{path}\t{result.captions[0].text}", flush=True)
        return
    for rank, caption in enumerate(result.captions, start=1):
        print(f"{path}\t{rank}\t{caption.hypothesis.score:.4f}\t{caption.text}", flush=True)


def _json_lines(entries: list[dict[str, Any]]) -> str:
    """A JSON list with one entry per line (readable, and far shorter than indented)."""
    return "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n]\n"


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
