"""Extracting backbone-prefix features of a corpus into an HDF5 cache, safe to kill at any moment.

How it survives SIGKILL (an HDF5 file killed mid-write can be unreadable, so none is ever written
in place):

1. Images are cut into batches of ``batch_size`` in corpus order; batch k always holds the same
   images, so a resumed run computes exactly what an uninterrupted one would.
2. Each finished batch goes to ``OUT.parts/part-<k>.npz`` through a temporary file that is fsynced
   and renamed into place, so a part file is either whole or absent. ``OUT.parts/manifest.json``
   pins the settings; parts from other settings are discarded, not mixed in.
3. A rerun skips the batches whose part exists. When all exist, they are merged into a temporary
   HDF5 file beside OUT, marked ``complete``, fsynced and renamed to OUT; then the parts go.

Decoding runs in DataLoader worker processes and part files are written by a background thread,
so both overlap the backbone's forward pass. One extraction per OUT at a time (a lock file says so).

Under torchrun every process of the run calls ``extract_features`` with the same arguments: rank 0
holds the lock and prepares the parts folder, each process computes every world-th batch (rank r
takes batches r, r + world, ...) into the same part files a single process writes, and after a
barrier rank 0 merges them. A part file does not depend on who computed it, so the merged file
equals a single-process run's, and a killed run resumes with any number of processes.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sca_caption.data.corpus import ImageRecord, images_hash
from sca_caption.data.errors import BadInputReport, DataError, SkippedEntry
from sca_caption.data.features import TAPS_GROUP, CacheSpec, is_complete, what_is_at
from sca_caption.data.images import load_image
from sca_caption.distributed import ONE_PROCESS, Processes
from sca_caption.errors import main_process_takes_interrupts
from sca_caption.io_utils import atomic_path, atomic_write, atomic_write_json
from sca_caption.locks import exclusive
from sca_caption.models.backbones import BackbonePrefix, build_cache_backbone
from sca_caption.models.backbones.base import freeze

MANIFEST = "manifest.json"
EXTRACTION_BATCH = 8  # small batches keep the activations in cache: ~1.5-2x the images/s of 32 on a CPU
# on_progress(stage, count): ("part", part files this process has written so far in this call),
# ("merge", rows copied into the merged file so far)
Progress = Callable[[str, int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class ExtractionResult:
    """What a finished extraction wrote: image count, skipped images, whether it was already there."""

    out: Path
    images: int
    skipped: tuple[SkippedEntry, ...]
    already_complete: bool


class ImageFiles(Dataset):
    """Image paths -> (index, image (3, S, S) in [0, 1] or None, problem): decoding errors are
    returned, not raised, so the main process decides between stopping, skipping and reporting,
    and one bad file never stops a batch."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str]:
        try:
            return index, load_image(self.paths[index], self.size), ""
        except DataError as err:
            return index, None, str(err)


@dataclass
class DecodedBatch:
    """One batch after decoding: the images that decoded (B_ok, 3, S, S) and the ones that did not."""

    indices: list[int]
    images: Tensor | None
    failed: list[tuple[int, str]]


def collate_decoded(items: list[tuple[int, Tensor | None, str]]) -> DecodedBatch:
    """DataLoader collate: stack the decoded images, keep the failures aside."""
    ok = [(i, image) for i, image, _ in items if image is not None]
    return DecodedBatch(
        indices=[i for i, _ in ok],
        images=torch.stack([image for _, image in ok]) if ok else None,
        failed=[(i, problem) for i, image, problem in items if image is None],
    )


def extract_features(
    records: Sequence[ImageRecord],
    spec: CacheSpec,
    out: str | Path,
    *,
    batch_size: int = EXTRACTION_BATCH,
    workers: int = 2,
    on_bad: str = "error",
    report: BadInputReport | None = None,
    progress: bool = True,
    processes: Processes = ONE_PROCESS,
    on_progress: Progress | None = None,
) -> ExtractionResult:
    """Write (or finish writing) the feature cache of ``records`` for ``spec`` at ``out``.

    records: the corpus in order, already cut to ``spec.limit``; ``spec.images_hash`` must be theirs.
    on_bad: "error" stops at the first image that cannot be decoded (``DataError``); "skip" leaves it
    out, lists it in the file and in ``report``. Rerunning after a kill resumes where it stopped.
    processes: the run's processes, every one calling this alike (module docstring); rank 0 shows
    the progress bar. A ``DataError`` on one process is raised on all of them.
    on_progress: called after each part file is on disk and after each part is merged (``Progress``).
    """
    out = Path(out)
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if spec.images_hash != images_hash(records):
        raise ValueError("spec.images_hash is not the hash of the records given")
    if not records:
        raise DataError(f"{out}: no images to extract features from")
    parts = out.with_name(out.name + ".parts")
    main = processes.is_main
    with _exclusive(out, processes):
        if processes.main_says(is_complete(out, spec)):
            skipped = _file_skipped(out, records)
            _settle_skipped(skipped, on_bad, report)
            if main and (parts / MANIFEST).is_file():  # a finished extraction's leftover parts
                shutil.rmtree(parts, ignore_errors=True)
            return ExtractionResult(out, _file_images(out), skipped, already_complete=True)
        if out.exists() or out.is_symlink():  # never replaced: it was made from something else
            raise DataError(f"{out}: {what_is_at(out, spec)}; not overwritten: remove it or name another output")
        backbone = freeze(build_cache_backbone(spec.backbone, spec.weights))
        try:
            prefix, _ = backbone.split(spec.layers)
        except ValueError as err:  # layers that are no taps of the backbone, or out of order
            raise DataError(f"{out}: {err}") from None
        manifest = {**asdict(spec), "layers": list(spec.layers), "batch_size": batch_size, "images": len(records)}
        if main:
            _prepare_parts(parts, manifest)
        processes.barrier()
        _together(
            processes, out,
            lambda: _write_parts(
                records, prefix, parts, batch_size, workers, on_bad, progress and main, processes, on_progress
            ),
        )

        def merge() -> None:
            _merge(records, spec, prefix, parts, batch_size, out, on_progress)
            shutil.rmtree(parts)

        _together(processes, out, merge if main else lambda: None)
    skipped = _file_skipped(out, records)
    if report is not None:
        report.skipped.extend(skipped)
    return ExtractionResult(out, _file_images(out), skipped, already_complete=False)


def _together(processes: Processes, out: Path, action: Callable[[], T]) -> T:
    """``action()`` on this process, then wait for the others; an exception on any process is
    raised on every one (its own where it happened, a ``DataError`` naming ``out`` elsewhere)."""
    try:
        result, error = action(), None
    except Exception as err:  # re-raised below, once the other processes know
        result, error = None, err
    failures = processes.sum(torch.tensor(float(error is not None), device=processes.device))
    if error is not None:
        raise error
    if failures:
        raise DataError(f"{out}: another process of this extraction failed (its error is printed above)")
    return result  # type: ignore[return-value]


def _write_parts(
    records: Sequence[ImageRecord],
    prefix: BackbonePrefix,
    parts: Path,
    batch_size: int,
    workers: int,
    on_bad: str,
    progress: bool,
    processes: Processes,
    on_progress: Progress | None,
) -> None:
    """Compute and store every batch of this process's share (every world-th, from its rank) that
    has no part file yet, or one with images that failed to decode (so a fixed file is picked
    up, and "error" raises at it)."""
    batches = [list(range(s, min(s + batch_size, len(records)))) for s in range(0, len(records), batch_size)]
    mine = range(processes.rank, len(batches), processes.world)
    todo = [k for k in mine if not _part_done(_part_path(parts, k))]
    done_images = sum(len(batches[k]) for k in mine) - sum(len(batches[k]) for k in todo)
    loader = DataLoader(
        ImageFiles([r.path for r in records], prefix.backbone.input_size),
        batch_sampler=[batches[k] for k in todo],
        num_workers=workers,
        collate_fn=collate_decoded,
        worker_init_fn=main_process_takes_interrupts,
    )
    total = sum(len(batches[k]) for k in mine)
    bar = tqdm(total=total, initial=done_images, unit="img", desc="features", disable=not progress)
    pending: Future[None] | None = None
    written = 0

    def landed() -> None:
        """Wait for the part in flight (surfacing write errors), then report it."""
        nonlocal written
        assert pending is not None
        pending.result()
        written += 1
        if on_progress is not None:
            on_progress("part", written)

    with ThreadPoolExecutor(max_workers=1) as writer, bar, torch.inference_mode():
        for k, batch in zip(todo, loader):
            if batch.failed and on_bad == "error":
                raise DataError(batch.failed[0][1])
            features = prefix(batch.images) if batch.images is not None else None
            arrays = _part_arrays(batch, features, prefix.outputs)
            if pending is not None:
                landed()  # at most one part in flight
            pending = writer.submit(_save_part, _part_path(parts, k), arrays)
            bar.update(len(batches[k]))
        if pending is not None:
            landed()


def _part_arrays(batch: DecodedBatch, features: dict[str, Tensor] | None, taps: Sequence[str]) -> dict[str, np.ndarray]:
    arrays = {
        "indices": np.asarray(batch.indices, dtype=np.int64),
        "failed": np.asarray([i for i, _ in batch.failed], dtype=np.int64),
        "problems": np.asarray([p for _, p in batch.failed], dtype=np.str_),
    }
    for tap in taps:
        arrays[f"tap_{tap}"] = (
            features[tap].contiguous().to(torch.float16).numpy() if features is not None else np.empty((0,), np.float16)
        )
    return arrays


def _save_part(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def _merge(
    records: Sequence[ImageRecord],
    spec: CacheSpec,
    prefix: BackbonePrefix,
    parts: Path,
    batch_size: int,
    out: Path,
    on_progress: Progress | None,
) -> None:
    """All part files -> OUT, through a temporary HDF5 file renamed into place once complete (``atomic_path``)."""
    part_files = [_part_path(parts, k) for k in range(math.ceil(len(records) / batch_size))]
    present: list[int] = []
    failed: list[int] = []
    problems: list[str] = []
    for path in part_files:
        with np.load(path, allow_pickle=False) as part:
            present += part["indices"].tolist()
            failed += part["failed"].tolist()
            problems += part["problems"].tolist()
    backbone = prefix.backbone
    size = backbone.input_size
    with torch.inference_mode():
        shapes = {tap: tuple(x.shape[1:]) for tap, x in prefix(torch.zeros(1, 3, size, size)).items()}
    row = 0
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            for tap, shape in shapes.items():
                f.create_dataset(
                    f"{TAPS_GROUP}/{tap}", shape=(len(present), *shape), dtype=np.float16, chunks=(1, *shape)
                )
            _write_strings(f, "image_ids", [records[i].image_id for i in present])
            _write_strings(f, "skipped_ids", [records[i].image_id for i in failed])
            _write_strings(f, "skipped_problems", problems)
            for path in part_files:
                with np.load(path, allow_pickle=False) as part:
                    count = len(part["indices"])
                    for tap in prefix.outputs:
                        if count:
                            f[f"{TAPS_GROUP}/{tap}"][row : row + count] = part[f"tap_{tap}"]
                row += count
                if on_progress is not None:
                    on_progress("merge", row)
            norm = backbone.normalization
            f.attrs.update(spec.attrs())
            f.attrs.update(
                taps=json.dumps(list(prefix.outputs)),
                input_size=size,
                normalization=norm.name,
                normalization_mean=np.asarray(norm.mean),
                normalization_std=np.asarray(norm.std),
                batch_size=batch_size,
                prefix_fingerprint=prefix.fingerprint().hex(),
            )
            f.attrs["complete"] = True


def _write_strings(f: h5py.File, name: str, values: Sequence[str]) -> None:
    f.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())


def _skipped_entries(
    records: Sequence[ImageRecord], failed: Sequence[int], problems: Sequence[str]
) -> tuple[SkippedEntry, ...]:
    """Skipped images as report entries (the stored problem starts with the file name; dropped here)."""
    return tuple(
        SkippedEntry(records[i].path, None, problem.removeprefix(f"{records[i].path}: "))
        for i, problem in zip(failed, problems)
    )


def _settle_skipped(skipped: Sequence[SkippedEntry], on_bad: str, report: BadInputReport | None) -> None:
    """Skipped images of a finished file (from a ``skip`` run): an error under "error", else reported."""
    if skipped and on_bad == "error":
        raise DataError(str(skipped[0]))
    if report is not None:
        report.skipped.extend(skipped)


def _prepare_parts(parts: Path, manifest: dict[str, object]) -> None:
    """Make the parts folder for ``manifest``, or keep the parts of an unfinished extraction of the
    same settings (dropping any temporary file a killed run left); a folder there that holds
    anything else is refused, never emptied."""
    manifest_path = parts / MANIFEST
    if parts.exists() or parts.is_symlink():
        try:
            found = json.loads(manifest_path.read_text()) if parts.is_dir() else None
        except (OSError, ValueError):
            found = None
        temporaries_only = parts.is_dir() and all(p.name.startswith(".") and p.name.endswith(".tmp") for p in parts.iterdir())
        if found is None and temporaries_only:  # killed between making the folder and writing its manifest
            found = manifest
        if not isinstance(found, dict):
            raise DataError(f"{parts}: not the parts folder of an extraction; not touched: remove it or name another output")
        if found != manifest:
            keys = [k for k, v in manifest.items() if found.get(k) != v]
            changed = "; ".join(f"{k} {found.get(k)!r} there, {manifest[k]!r} here" for k in keys[:2])
            changed += f"; {len(keys) - 2} more" if len(keys) > 2 else ""
            raise DataError(f"{parts}: the unfinished extraction of other settings ({changed}); remove it to start over")
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob(".*.tmp"):
        stale.unlink()
    if not manifest_path.exists():
        atomic_write_json(manifest_path, manifest)


def _part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:06d}.npz"


def _part_done(path: Path) -> bool:
    """A part file exists and every image of its batch decoded."""
    if not path.exists():
        return False
    with np.load(path, allow_pickle=False) as part:
        return part["failed"].size == 0


def _file_images(out: Path) -> int:
    with h5py.File(out, "r") as f:
        return len(f["image_ids"])


def _file_skipped(out: Path, records: Sequence[ImageRecord]) -> tuple[SkippedEntry, ...]:
    with h5py.File(out, "r") as f:
        ids = [s.decode() for s in f["skipped_ids"][()]]
        problems = [s.decode() for s in f["skipped_problems"][()]]
    row = {r.image_id: i for i, r in enumerate(records)}
    return _skipped_entries(records, [row[i] for i in ids], problems)


@contextmanager
def _exclusive(out: Path, processes: Processes) -> Iterator[None]:
    """``OUT.lock`` held for the extraction (``locks.exclusive``); the temporary HDF5 files of
    killed runs are removed once it is taken."""
    with exclusive(out.with_name(out.name + ".lock"), processes, f"{out}: another extraction is writing this file"):
        if processes.is_main:
            for stale in out.parent.glob(f".{out.name}.*.tmp"):
                stale.unlink()
        yield
