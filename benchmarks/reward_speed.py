"""CIDEr-D reward speed (``sca_caption.rewards``): a self-critical batch of samples and greedy baselines.

    python benchmarks/reward_speed.py                      # synthetic: 6000 images x 5 refs, V = 2539
    python benchmarks/reward_speed.py --dataset flickr8k --data-root ../shared/data/flickr8k

Synthetic training references: lengths 8..16, words drawn with Zipf weights 1/rank (so n-grams
repeat as in real captions). With ``--dataset`` the train split's real references and vocabulary.
A batch is ``--images`` random training images x ``--samples`` rows of ``--length`` words (half
references with a third of their words replaced, half random words, each cut at a random length
from 1, then ``<end>``), scored with ``CiderD.score``; ``--baseline`` adds one more row per image
(the greedy caption of SCST). Prints JSON lines: the build time, then the median and best time per
batch over ``--repeats`` batches and rewards per second, on ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from sca_caption.data.datasets import load_corpus
from sca_caption.data.vocab import SPECIALS, build_vocab
from sca_caption.rewards import CiderD, DocumentFrequency, train_references


def synthetic_references(images: int, vocab_size: int, rng: random.Random) -> list[list[list[int]]]:
    """Five captions of 8..16 Zipf-distributed word ids per image."""
    words = list(range(len(SPECIALS), vocab_size))
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return [[rng.choices(words, weights, k=rng.randint(8, 16)) for _ in range(5)] for _ in range(images)]


def batch(
    references: list[list[list[int]]], args: argparse.Namespace, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, length) candidates (``<end>`` then ``<pad>``) and (rows,) their images."""
    images = rng.sample(range(len(references)), args.images)
    words = list({w for refs in references[:200] for r in refs for w in r})
    rows, owners = [], []
    for image in images:
        for sample in range(args.samples + args.baseline):
            if sample % 2:
                row = [rng.choice(words) for _ in range(args.length)]
            else:
                row = list(rng.choice(references[image]))
                row = [rng.choice(words) if rng.random() < 1 / 3 else w for w in row][: args.length]
            row = row[: rng.randint(1, args.length)] + [2]
            rows.append((row + [0] * args.length)[: args.length])
            owners.append(image)
    return torch.tensor(rows), torch.tensor(owners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("flickr8k", "coco"), help="real train references, not synthetic")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--vocab", type=int, default=2539)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    if args.dataset:
        records = load_corpus(args.dataset, args.data_root)
        vocab = build_vocab(records, args.min_count)
        vocab_size, references = len(vocab), train_references(records, vocab)
    else:
        vocab_size, references = args.vocab, synthetic_references(args.train_images, args.vocab, rng)
    start = time.perf_counter()
    df = DocumentFrequency.build(references, vocab_size)
    df_s = time.perf_counter() - start
    cider = CiderD(references, df)
    build_s = time.perf_counter() - start
    print(json.dumps({
        "references": args.dataset or "synthetic", "train_images": len(references), "vocab": vocab_size,
        "ngrams": len(df.keys), "reference_entries": len(cider.ref_keys),
        "document_frequency_s": round(df_s, 3), "build_s": round(build_s, 3),
    }))
    batches = [batch(references, args, rng) for _ in range(args.repeats + 3)]
    times = []
    for i, (candidates, images) in enumerate(batches):
        start = time.perf_counter()
        cider.score(candidates, images)
        if i >= 3:  # warm-up batches left out
            times.append(time.perf_counter() - start)
    rows = len(batches[0][0])
    median = statistics.median(times)
    print(json.dumps({
        "rows": rows, "images": args.images, "samples": args.samples, "baseline": args.baseline, "length": args.length,
        "threads": args.threads, "median_ms": round(1e3 * median, 2), "best_ms": round(1e3 * min(times), 2),
        "rewards_per_s": round(rows / median),
    }))


if __name__ == "__main__":
    main()
