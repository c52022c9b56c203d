"""CSRA against average pooling for multi-label tags on real data: one JSON line per row.

    python benchmarks/csra_tags.py --cache data/features/flickr8k_efficientnet_lite0_stage7.h5 \\
        --data-root ../shared/data/flickr8k

Data: the Karpathy Flickr8k splits, each image's cached EfficientNet-Lite0 ``stage7`` map
(320x7x7, frozen ImageNet weights). Tags: the ``--tags`` most frequent content words of the train
captions (``tag_vocabulary``); an image has a tag when any of its captions contains it.

Rows, for each seed:
- ``avg``: a linear classifier (C -> K, with bias) on the average-pooled map;
- ``avg+max``: that trained classifier, not retrained, applied at every location (its class
  activation maps s_kj) and scored mean_j s_kj + λ·max_j s_kj, for every λ of ``--lams``
  (λ = 0 is ``avg``), and once more with the λ of the grid that is best on val;
- ``csra``: ``MultiHeadCSRA`` (λ = 0.1) with each of ``--heads`` heads, trained like ``avg``.

Training: BCE (``tag_loss``), Adam, ``--epochs`` epochs over the train split; the epoch with the best
val mAP is kept. Nothing is selected on test. mAP is over the tags with at least one positive image
in the split scored (``tag_mean_average_precision``). ``params`` counts the trained weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from sca_caption.data.corpus import records_in_split
from sca_caption.data.datasets import load_corpus
from sca_caption.data.features import FeatureCache
from sca_caption.models.blocks.csra import MultiHeadCSRA
from sca_caption.models.complexity import count_parameters
from sca_caption.models.tag_head import tag_loss, tag_mean_average_precision, tag_targets, tag_vocabulary

SPLITS = ("train", "val", "test")
EVAL_BATCH = 500


class AvgLinear(nn.Module):
    """Average pooling then a linear classifier: (B, C, H, W) -> logits (B, K)."""

    def __init__(self, channels: int, num_tags: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_tags)

    def forward(self, maps: Tensor) -> Tensor:
        return self.fc(maps.mean(dim=(2, 3)))

    def avg_max(self, maps: Tensor, lam: float) -> Tensor:
        """The classifier at every location, scored mean + lam · max over them: (B, K)."""
        s = torch.einsum("bchw,kc->bkhw", maps, self.fc.weight).flatten(2) + self.fc.bias[:, None]
        return s.mean(dim=2) + lam * s.amax(dim=2)


def load_split_data(cache_path: Path, data_root: Path, num_tags: int) -> tuple[dict[str, tuple[Tensor, Tensor]], list[str]]:
    """{split: (maps (N, C, H, W) float32, targets (N, K))} and the tag words."""
    records = load_corpus("flickr8k", data_root)
    tags = tag_vocabulary(records_in_split(records, "train"), num_tags)
    cache = FeatureCache(cache_path)
    (tap,) = cache.taps
    data = {}
    for split in SPLITS:
        split_records = records_in_split(records, split)
        maps = cache.read_batch([cache.index_of(r.image_id) for r in split_records])[tap]
        data[split] = (maps, tag_targets(split_records, tags))
    return data, tags


def scores(score: Callable[[Tensor], Tensor], maps: Tensor) -> Tensor:
    """``score`` over ``maps`` in batches, without gradients: (N, K)."""
    with torch.no_grad():
        return torch.cat([score(maps[i : i + EVAL_BATCH]) for i in range(0, len(maps), EVAL_BATCH)])


def train(
    model: nn.Module, data: dict[str, tuple[Tensor, Tensor]], seed: int, epochs: int, batch: int, lr: float
) -> tuple[int, float]:
    """Train ``model`` in place on train; leave it at the epoch best on val. -> (epoch, seconds)."""
    maps, targets = data["train"]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_epoch, best_state = -1.0, 0, None
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for rows in torch.randperm(len(maps), generator=generator).split(batch):
            optimizer.zero_grad()
            tag_loss(model(maps[rows]), targets[rows]).backward()
            optimizer.step()
        model.eval()
        val = tag_mean_average_precision(scores(model, data["val"][0]), data["val"][1])
        if val > best:
            best, best_epoch = val, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)
    return best_epoch, time.perf_counter() - start


def row(method: str, seed: int, score: Callable[[Tensor], Tensor], data: dict[str, tuple[Tensor, Tensor]], **extra: object) -> dict[str, object]:
    """One JSON-ready result: val and test mAP of ``score``."""
    result: dict[str, object] = {"method": method, "heads": None, "lam": None, "seed": seed}
    result.update(extra)
    for split in ("val", "test"):
        maps, targets = data[split]
        result[f"{split}_map"] = round(100 * tag_mean_average_precision(scores(score, maps), targets), 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("data/features/flickr8k_efficientnet_lite0_stage7.h5"))
    parser.add_argument("--data-root", type=Path, default=Path("data/flickr8k"))
    parser.add_argument("--tags", type=int, default=80, help="K, the number of tag words")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lams", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data, tags = load_split_data(args.cache, args.data_root, args.tags)
    channels = data["train"][0].shape[1]
    header: dict[str, object] = {"tags": len(tags), "first_tags": tags[:10], "threads": args.threads}
    header.update({f"{split}_images": len(data[split][0]) for split in SPLITS})
    header.update({f"{split}_tags_scored": int((data[split][1].sum(0) > 0).sum()) for split in ("val", "test")})
    print(json.dumps(header), flush=True)
    for seed in args.seeds:
        torch.manual_seed(seed)
        avg = AvgLinear(channels, len(tags))
        epoch, seconds = train(avg, data, seed, args.epochs, args.batch_size, args.lr)
        params = count_parameters(avg)
        print(json.dumps(row("avg", seed, avg, data, epoch=epoch, train_s=round(seconds, 1), params=params)), flush=True)
        grid = []
        for lam in args.lams:
            grid.append(row("avg+max", seed, lambda m, lam=lam: avg.avg_max(m, lam), data, lam=lam, params=params))
            print(json.dumps(grid[-1]), flush=True)
        chosen = max(grid, key=lambda r: r["val_map"])
        print(json.dumps({**chosen, "method": "avg+max, lam on val"}), flush=True)
        for heads in args.heads:
            torch.manual_seed(seed)
            csra = MultiHeadCSRA(channels, len(tags), heads, lam=0.1)
            epoch, seconds = train(csra, data, seed, args.epochs, args.batch_size, args.lr)
            print(
                json.dumps(
                    row("csra", seed, csra, data, heads=heads, lam=0.1, epoch=epoch, train_s=round(seconds, 1),
                        params=count_parameters(csra))
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
