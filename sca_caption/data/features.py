"""The HDF5 feature cache: what a cache file holds, and the lazy reader the trainer uses.

A cache file (written by ``sca_caption.data.feature_extraction``) holds:

- one float16 dataset per cached tap (``BackbonePrefix.outputs``), shape (N, C, H, W), chunked one
  image per chunk, under ``taps/<name>``;
- ``image_ids`` (N,): the images present, in corpus order;
- ``skipped_ids`` / ``skipped_problems``: images left out under ``--on-bad-image skip`` and why;
- attrs: dataset, data_root, backbone, weights, layers, taps, input_size, normalization (name,
  mean, std), images_hash (of the records covered), limit, batch_size, version (the
  ``sca_caption.__version__`` that wrote it) and ``complete`` (set last, True only for a finished file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from sca_caption import __version__
from sca_caption.data.errors import DataError

TAPS_GROUP = "taps"
EXTRACT_SCRIPT = "preprocess/extract_features.py"
# Attrs that must equal the expected value for a cache to be used (data_root and limit only shape
# the command that builds it: the images themselves are pinned by images_hash).
CHECKED_ATTRS = ("backbone", "weights", "layers", "images_hash", "version")


@dataclass(frozen=True)
class CacheSpec:
    """What a feature cache is built from; also the arguments of the command that builds it.

    The extractor stores it in the file; a trainer builds the one it needs (``images_hash`` of its
    records) and passes it to ``FeatureCache(path, expect=...)``.

    weights: "imagenet", "none" (random init) or the path of a state dict file.
    images_hash: ``corpus.images_hash`` of the records the cache covers (the first ``limit`` if given).
    """

    dataset: str
    data_root: str
    backbone: str
    layers: tuple[str, ...]
    images_hash: str
    weights: str = "imagenet"
    limit: int | None = None
    version: str = __version__

    def command(self, out: str | Path) -> str:
        """The shell command that builds (or resumes building) this cache at ``out``."""
        parts = [
            "python", EXTRACT_SCRIPT, "--dataset", self.dataset, "--data-root", self.data_root,
            "--backbone", self.backbone, "--weights", self.weights, "--layers", *self.layers, "--out", str(out),
        ]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        return shlex.join(parts)

    def file_name(self) -> str:
        """``<dataset>_<backbone>_<layer>-<layer>_<key>.h5``: the default cache file of this spec,
        ``key`` a hash of every checked attr, so caches of other images, weights or versions
        never share a path."""
        key = hashlib.sha256(json.dumps([self.dataset, *(str(getattr(self, a)) for a in CHECKED_ATTRS)]).encode())
        return f"{self.dataset}_{self.backbone}_{'-'.join(self.layers)}_{key.hexdigest()[:8]}.h5"

    def attrs(self) -> dict[str, Any]:
        """The spec as HDF5 attrs (``limit`` None stored as 0)."""
        return {
            "dataset": self.dataset,
            "data_root": self.data_root,
            "backbone": self.backbone,
            "weights": self.weights,
            "layers": json.dumps(list(self.layers)),
            "images_hash": self.images_hash,
            "limit": self.limit or 0,
            "version": self.version,
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> CacheSpec:
        """Inverse of ``attrs`` (``attrs`` is an ``h5py`` AttributeManager or a dict)."""
        return cls(
            dataset=str(attrs["dataset"]),
            data_root=str(attrs["data_root"]),
            backbone=str(attrs["backbone"]),
            layers=tuple(json.loads(attrs["layers"])),
            images_hash=str(attrs["images_hash"]),
            weights=str(attrs["weights"]),
            limit=int(attrs["limit"]) or None,
            version=str(attrs["version"]),
        )


def differences(found: CacheSpec, expected: CacheSpec) -> list[str]:
    """``"name X, expected Y"`` for each checked attr that differs."""
    out = []
    for name in CHECKED_ATTRS:
        have, want = getattr(found, name), getattr(expected, name)
        if have != want:
            show = (lambda v: " ".join(v)) if name == "layers" else str
            out.append(f"{name} {show(have)}, expected {show(want)}")
    return out


def _stored_spec(path: Path) -> tuple[CacheSpec, bool] | None:
    """The spec a cache file at ``path`` was built from and whether it is finished; None for
    anything else (absent, not a regular file — h5py would wait at a FIFO — or not a cache)."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            return CacheSpec.from_attrs(f.attrs), bool(f.attrs.get("complete", False))
    except (OSError, KeyError, ValueError):
        return None


def is_complete(path: Path, spec: CacheSpec) -> bool:
    """Whether ``path`` is a finished cache built from ``spec``."""
    stored = _stored_spec(path)
    return stored is not None and stored[1] and not differences(stored[0], spec)


def what_is_at(path: Path, spec: CacheSpec) -> str:
    """What ``path`` holds, for a refusal to overwrite it with the cache of ``spec``."""
    if not path.is_file():
        return "not a regular file"
    stored = _stored_spec(path)
    if stored is None:
        return "not a feature cache of this sca-caption version"
    found, complete = stored
    if not complete:
        return "an unfinished feature cache"
    diff = differences(found, spec)
    return f"a feature cache built with {'; '.join(diff)}" if diff else "the feature cache these settings need"


class FeatureCache:
    """Lazy, DataLoader-safe reader of a feature cache: ``cache[i]`` -> {tap: float32 (C, H, W)}.

    Refuses (``DataError``, one line with the rebuild command) a missing, unreadable, unfinished or
    mismatched file. Only the image ids are read up front; features are read per request. The
    HDF5 handle is opened on first read in each process and never pickled, so DataLoader workers
    (fork or spawn) each open their own.
    """

    def __init__(self, path: str | Path, expect: CacheSpec | None = None) -> None:
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid = -1
        self.spec, meta = self._validate(expect)
        self.taps: tuple[str, ...] = meta["taps"]
        self.image_ids: tuple[str, ...] = meta["image_ids"]
        self.skipped: dict[str, str] = meta["skipped"]
        self.shapes: dict[str, tuple[int, int, int]] = meta["shapes"]
        self.input_size: int = meta["input_size"]
        # ``BackbonePrefix.fingerprint()`` of the prefix that computed the features (hex); None in
        # caches extracted before it was recorded
        self.prefix_fingerprint: str | None = meta["prefix_fingerprint"]
        self._row = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Row ``index`` (corpus order among present images): {tap: float32 (C, H, W)}."""
        if not 0 <= index < len(self.image_ids):
            raise IndexError(f"{self.path}: row {index} out of range 0..{len(self.image_ids) - 1}")
        datasets = self._open()
        return {tap: torch.from_numpy(self._read_rows(datasets[tap], [index])[0]).float() for tap in self.taps}

    def check_computed_by(self, fingerprint: bytes, whose: str) -> None:
        """Refuse (``DataError``, one line) a cache whose features another backbone prefix computed
        than the one with ``fingerprint`` (``whose``: e.g. "this run's"). A cache that did not
        record its prefix passes."""
        if self.prefix_fingerprint is not None and self.prefix_fingerprint != fingerprint.hex():
            raise DataError(
                f"{self.path}: its features were computed by another backbone prefix than {whose} (prefix "
                f"fingerprint {self.prefix_fingerprint[:12]}… there, {fingerprint.hex()[:12]}… here: other weights or "
                f"backbone code); remove it and build it again with: {self.spec.command(self.path)}"
            )

    def index_of(self, image_id: str) -> int:
        """The row of ``image_id``; ``KeyError`` naming the cache if it is absent (or was skipped)."""
        if image_id not in self._row:
            why = f"skipped at extraction ({self.skipped[image_id]})" if image_id in self.skipped else "not in it"
            raise KeyError(f"{self.path}: image {image_id!r} {why}")
        return self._row[image_id]

    def read_batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Rows ``indices`` (any order, repeats allowed): {tap: float32 (B, C, H, W)}.

        Each distinct row is read once, in file order, as its raw chunk (one image, unfiltered)
        straight into a float16 buffer; torch then widens it to float32. That skips HDF5's
        selection machinery, which dominates the cost of small random reads.
        """
        datasets = self._open()
        order = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= len(self.image_ids)):
            raise IndexError(f"{self.path}: rows out of range 0..{len(self.image_ids) - 1}")
        unique, inverse = torch.unique(order, sorted=True, return_inverse=True)
        rows = unique.tolist()
        return {tap: torch.from_numpy(self._read_rows(datasets[tap], rows)).float()[inverse] for tap in self.taps}

    @staticmethod
    def _read_rows(dataset: h5py.Dataset, rows: list[int]) -> np.ndarray:
        """Rows of one tap as float16 (len(rows), C, H, W), each read as its raw chunk."""
        out = np.empty((len(rows), *dataset.shape[1:]), dtype=np.float16)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for j, row in enumerate(rows):
            _, raw = dataset.id.read_direct_chunk((row, 0, 0, 0))
            flat[j] = np.frombuffer(raw, dtype=np.uint8)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"], state["_datasets"], state["_pid"] = None, {}, -1
        return state

    def close(self) -> None:
        """Close this process's HDF5 handle (reopened on the next read)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._datasets, self._pid = None, {}, -1

    def _open(self) -> dict[str, h5py.Dataset]:
        """This process's tap datasets, opening the file on first use (a forked worker must not
        reuse the parent's handle, hence the pid check)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._datasets = {tap: self._handle[f"{TAPS_GROUP}/{tap}"] for tap in self.taps}
            self._pid = os.getpid()
        return self._datasets

    def _validate(self, expect: CacheSpec | None) -> tuple[CacheSpec, dict[str, Any]]:
        def refuse(problem: str, spec: CacheSpec | None) -> DataError:
            """The refusal, with the command that makes the cache ``spec`` names: here when nothing
            is here, else beside this file under its default name (a file is never replaced)."""
            if spec is None:
                return DataError(f"{self.path}: {problem}")
            if not self.path.exists():
                return DataError(f"{self.path}: {problem}; build it with: {spec.command(self.path)}")
            beside = self.path.with_name(spec.file_name())
            return DataError(f"{self.path}: {problem}; build one beside it with: {spec.command(beside)}")

        if not self.path.is_file():
            raise refuse("no feature cache here", expect)
        try:
            with h5py.File(self.path, "r") as f:
                try:
                    found = CacheSpec.from_attrs(f.attrs)
                    complete = bool(f.attrs.get("complete", False))
                    if complete and not (expect is not None and differences(found, expect)):
                        meta = _read_meta(f)
                except (KeyError, ValueError) as err:
                    raise refuse(f"not a feature cache ({type(err).__name__}: {err})", expect) from None
        except OSError as err:
            raise refuse(f"not a readable HDF5 file ({str(err).splitlines()[0]})", expect) from None
        if not complete:
            raise refuse("unfinished feature cache (its extraction did not complete)", expect or found)
        if expect is not None and (diff := differences(found, expect)):
            raise refuse(f"feature cache built with {'; '.join(diff)}", expect)
        return found, meta


def _read_meta(f: h5py.File) -> dict[str, Any]:
    taps = tuple(json.loads(f.attrs["taps"]))
    return {
        "taps": taps,
        "image_ids": tuple(_strings(f["image_ids"])),
        "skipped": dict(zip(_strings(f["skipped_ids"]), _strings(f["skipped_problems"]))),
        "shapes": {t: _checked_shape(f[f"{TAPS_GROUP}/{t}"]) for t in taps},
        "input_size": int(f.attrs["input_size"]),
        "prefix_fingerprint": str(f.attrs["prefix_fingerprint"]) if "prefix_fingerprint" in f.attrs else None,
    }


def _checked_shape(dataset: h5py.Dataset) -> tuple[int, int, int]:
    """(C, H, W) of a tap dataset laid out as the extractor writes it (float16, one image per
    chunk, no HDF5 filter: ``read_batch`` reads the chunks' raw bytes, which any filter, shuffle
    and fletcher32 included, would change); ValueError otherwise."""
    shape = tuple(dataset.shape[1:])
    one_image_chunks = dataset.chunks == (1, *shape)
    filters = dataset.id.get_create_plist().get_nfilters()
    if dataset.dtype != np.float16 or len(shape) != 3 or not one_image_chunks or filters:
        raise ValueError(f"{dataset.name} is not float16 (N, C, H, W) chunked one image per chunk without filters")
    return shape  # type: ignore[return-value]


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in dataset[()]]
