"""Download the public files of a caption dataset into its data folder (resumable).

    python preprocess/download.py --dataset flickr8k                 # into data/flickr8k
    python preprocess/download.py --dataset coco --root /big/disk/coco

Stopped at any moment, the same command carries on where it stopped; a dataset folder holds the
readers' files only once they are complete. Flickr30k's images are not public: the error says where
to ask for them and where to put them.
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import sys
from pathlib import Path

from sca_caption.data.download import SOURCES, download_dataset
from sca_caption.errors import command


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=list(SOURCES))
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (default: data/<dataset>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    download_dataset(args.dataset, args.root, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
