"""Build the word vocabulary of a caption corpus's train split and write it as JSON.

    python preprocess/build_vocab.py --dataset flickr8k --data-root data/flickr8k --min-count 5 --out vocab.json
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import sys
from pathlib import Path

from sca_caption.data.datasets import CORPORA, load_corpus
from sca_caption.data.errors import ON_BAD_CHOICES, BadInputReport, DataError
from sca_caption.data.vocab import Vocab, build_vocab
from sca_caption.errors import command
from sca_caption.io_utils import check_output_file


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=CORPORA)
    parser.add_argument("--data-root", type=Path, default=None, help="dataset folder (default: data/<dataset>)")
    parser.add_argument("--min-count", type=int, default=5, help="keep words seen at least this often in train")
    parser.add_argument("--out", type=Path, required=True, help="vocabulary JSON to write")
    parser.add_argument("--on-bad", choices=ON_BAD_CHOICES, default="error", help="stop at bad input, or skip and report it")
    args = parser.parse_args(argv)
    if args.min_count < 1:
        parser.error(f"--min-count must be at least 1, got {args.min_count}")

    check_output_file(args.out, "vocabulary file")
    if args.out.exists():  # only a vocabulary is replaced
        try:
            Vocab.load(args.out)
        except DataError as err:
            raise DataError(f"{args.out}: exists and is not a vocabulary file; not overwritten") from err
    report = BadInputReport()
    records = load_corpus(args.dataset, args.data_root, on_bad=args.on_bad, report=report)
    vocab = build_vocab(records, args.min_count, "--min-count")
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} entries (4 special) from {len(records)} images, min count {args.min_count}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
