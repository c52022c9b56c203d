"""Generate the built-in shapes dataset (images plus dataset_shapes.json) into a folder.

    python preprocess/make_shapes.py --out data/shapes --seed 0 --train 4000 --val 200 --test 500
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import sys
from pathlib import Path

from sca_caption.data.datasets import default_data_root
from sca_caption.data.shapes import DEFAULT_COUNTS, generate_shapes
from sca_caption.errors import command
from sca_caption.io_utils import check_output_folder


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_data_root("shapes"), help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    for split, count in DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"{split} images (default {count})")
    args = parser.parse_args(argv)
    counts = {split: getattr(args, split) for split in DEFAULT_COUNTS}
    if any(n < 0 for n in counts.values()):
        parser.error("image counts must not be negative")
    check_output_folder(args.out, "shapes dataset folder")
    json_path = generate_shapes(args.out, args.seed, counts)
    per_split = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"{json_path}: {sum(counts.values())} images ({per_split}), seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
