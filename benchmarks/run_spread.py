"""Mean and spread of finished training runs' scores, per group of runs (e.g. one attention order
over several seeds).

Reads each run folder's ``test_scores.json`` (the trainer's test scores of ``best.pt``) and its
``log.csv`` (the best validation CIDEr and its epoch), and prints one JSON line per run, then one
per group: the mean, the sample standard deviation and the range of each metric, x100 as papers
print them. With two groups a last line gives, per metric, the difference of their means (first
minus second), Welch's t statistic (about 2.8 in magnitude is p = 0.05, two-sided, for three
runs a group; about 2.3 for five) and the exact two-sided permutation p-value of the difference:
the share of all splits of the pooled runs into groups of these sizes whose difference of means
is at least as large in magnitude (20 splits for three runs a group, so never below 0.1; 252 for
five).

    python benchmarks/run_spread.py --group cs=runs/f8k_cs_lite0,runs/f8k_seed_cs_1,runs/f8k_seed_cs_2 \\
        --group s=runs/f8k_seed_s_0,runs/f8k_seed_s_1,runs/f8k_seed_s_2
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
from pathlib import Path

METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def run_scores(folder: Path) -> dict[str, float]:
    """Test scores (x100), the best validation CIDEr (x100) and its epoch of one finished run."""
    test = json.loads((folder / "test_scores.json").read_text())
    with open(folder / "log.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("CIDEr")]
    best = max(rows, key=lambda row: float(row["CIDEr"]))
    scores = {metric: 100 * test[metric] for metric in METRICS}
    scores.update(val_CIDEr=100 * float(best["CIDEr"]), best_epoch=int(best["epoch"]))
    return scores


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 2), "std": round(std, 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", action="append", required=True, metavar="NAME=RUN,RUN,...",
                        help="a named group of run folders (repeatable)")
    args = parser.parse_args()
    groups: list[dict[str, dict[str, float]]] = []
    for group in args.group:
        name, _, runs = group.partition("=")
        folders = [Path(run) for run in runs.split(",") if run]
        if not name or not folders or len(set(folders)) < len(folders):
            parser.error(f"--group {group!r}: needs NAME=RUN,RUN,... with each run once")
        unfinished = [str(f) for f in folders if not (f / "test_scores.json").is_file() or not (f / "log.csv").is_file()]
        if unfinished:
            parser.error(f"--group {name}: unfinished runs (no test_scores.json or log.csv): {', '.join(unfinished)}")
        per_run = {str(folder): run_scores(folder) for folder in folders}
        for folder, scores in per_run.items():
            print(json.dumps({"group": name, "run": folder, **{k: round(v, 2) for k, v in scores.items()}}))
        keys = (*METRICS, "val_CIDEr")
        print(json.dumps({"group": name, "runs": len(folders), **{k: spread([s[k] for s in per_run.values()]) for k in keys}}))
        groups.append(per_run)
    if len(groups) == 2:
        names = [group.partition("=")[0] for group in args.group]
        print(json.dumps({"difference": f"{names[0]} - {names[1]}", **{k: welch(groups, k) for k in (*METRICS, "val_CIDEr")}}))
    return 0


def welch(groups: list[dict[str, dict[str, float]]], key: str) -> dict[str, float | None]:
    """The difference of two groups' means of ``key``, Welch's t (None without spread) and the
    permutation p-value (``permutation_p``)."""
    first, second = ([s[key] for s in group.values()] for group in groups)
    difference = statistics.fmean(first) - statistics.fmean(second)
    p = round(permutation_p(first, second), 3)
    if len(first) < 2 or len(second) < 2:
        return {"difference": round(difference, 2), "welch_t": None, "permutation_p": p}
    error = (statistics.variance(first) / len(first) + statistics.variance(second) / len(second)) ** 0.5
    t = round(difference / error, 2) if error else None
    return {"difference": round(difference, 2), "welch_t": t, "permutation_p": p}


def permutation_p(first: list[float], second: list[float]) -> float:
    """Exact two-sided permutation p-value of mean(first) − mean(second): the share of the ways to
    split the pooled values into groups of these sizes whose |difference of means| reaches the
    observed one (the observed split included)."""
    pooled = first + second
    observed = abs(statistics.fmean(first) - statistics.fmean(second))
    total = sum(pooled)
    splits = list(itertools.combinations(range(len(pooled)), len(first)))
    reached = 0
    for chosen in splits:
        picked = sum(pooled[i] for i in chosen)
        gap = abs(picked / len(first) - (total - picked) / len(second))
        reached += gap >= observed - 1e-9
    return reached / len(splits)


if __name__ == "__main__":
    sys.exit(main())
