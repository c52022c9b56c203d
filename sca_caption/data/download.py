"""Fetch the public parts of a caption dataset into the folder its reader expects.

``download_dataset(name, root)`` takes each of the dataset's ``SOURCES`` in turn:

1. download it into ``<root>/.download/<file>.part``, resuming a partial file with an HTTP range
   request (a server that answers 200 instead of 206 sends the whole file again, with a note);
2. check its size and checksum, then rename it to ``<root>/.download/<file>``; a mismatch is a
   one-line ``DataError`` and the file is removed, so the next run downloads it again;
3. extract only the entries the readers use (``Source.provides``) into a temporary folder in
   ``<root>/.download`` (refusing members that would land outside it), then rename each entry into
   place and delete the archive.

Each entry appears in the root complete or not at all, and the sources are listed in the order they
are put in place: images first, the files the readers recognise a dataset by last. So an
interrupted run never leaves something ``load_corpus`` takes for a dataset, and running the same
command again carries on where it stopped (entries already in place are not fetched again).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from sca_caption.data import flickr8k
from sca_caption.data.datasets import (
    FLICKR30K_IMAGE_FOLDERS,
    default_data_root,
    flickr30k_images_hint,
    karpathy_file,
)
from sca_caption.data.errors import DataError
from sca_caption.distributed import ONE_PROCESS
from sca_caption.locks import exclusive

DOWNLOAD_FOLDER = ".download"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
ATTEMPTS = 3
USER_AGENT = "sca-caption (python urllib)"


@dataclass(frozen=True)
class Source:
    """One file to fetch: where from, how to check it, and which of its entries to put in the root.

    size: bytes, and checksum: ``(hashlib algorithm, hex digest)``, only where a published value
    exists (None: the server's Content-Length and the archive's CRCs are all that is checked).
    provides: paths inside the zip archive (a folder or a file), put at the same path under the root.
    """

    url: str
    file: str
    provides: tuple[str, ...]
    size: int | None = None
    checksum: tuple[str, str] | None = None


def _karpathy(name: str) -> Source:
    # Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json).
    # Size and sha256: tensorflow/datasets, tensorflow_datasets/url_checksums/coco_captions.txt.
    return Source(
        "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "caption_datasets.zip",
        (f"dataset_{name}.json",),
        size=36745453,
        checksum=("sha256", "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"),
    )


SOURCES: dict[str, tuple[Source, ...]] = {
    # Jason Brownlee's public copy of the Flickr8k archives. md5: mlverse/torchvision,
    # R/dataset-flickr.R; no published size was found (the server's Content-Length is checked).
    "flickr8k": (
        Source(
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
            "Flickr8k_Dataset.zip",
            (flickr8k.IMAGE_FOLDERS[0],),
            checksum=("md5", "f18a1e2920de5bd84dae7cf08ec78978"),
        ),
        Source(
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
            "Flickr8k_text.zip",
            (flickr8k.TOKEN_FILE, *flickr8k.SPLIT_FILES.values()),
            checksum=("md5", "bf6c1abcb8e4a833b7f922104de18627"),
        ),
        _karpathy("flickr8k"),
    ),
    # Only the split file: the images come through a request form (flickr30k_images_hint).
    "flickr30k": (_karpathy("flickr30k"),),
    # COCO 2014 from cocodataset.org. Sizes and sha256: tensorflow/datasets,
    # tensorflow_datasets/url_checksums/coco2014.txt (and coco_captions.txt, which agrees).
    "coco": (
        Source(
            "http://images.cocodataset.org/zips/train2014.zip",
            "train2014.zip",
            ("train2014",),
            size=13510573713,
            checksum=("sha256", "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
        ),
        Source(
            "http://images.cocodataset.org/zips/val2014.zip",
            "val2014.zip",
            ("val2014",),
            size=6645013297,
            checksum=("sha256", "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),
        ),
        Source(
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            "annotations_trainval2014.zip",
            ("annotations/captions_train2014.json", "annotations/captions_val2014.json"),
            size=252872794,
            checksum=("sha256", "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
        ),
        _karpathy("coco"),
    ),
}


def download_dataset(
    name: str,
    root: Path | None = None,
    *,
    sources: Sequence[Source] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    attempts: int = ATTEMPTS,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Fetch what is public of dataset ``name`` into ``root`` (default ``data/<name>``); return the root.

    sources: what to fetch (default ``SOURCES[name]``). attempts: connections tried per file before
    giving up (each resumes the last). timeout: seconds any connect or read may wait. For Flickr30k,
    whose images cannot be fetched, a ``DataError`` says where to get them unless they are there.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if name not in SOURCES:
        if name == "shapes":
            raise DataError(
                "the shapes dataset is generated (at data/shapes on first use, elsewhere by "
                "preprocess/make_shapes.py); there is nothing to download"
            )
        raise DataError(f"no download for dataset {name!r}; choose one of {', '.join(SOURCES)}")
    root = Path(root) if root is not None else default_data_root(name)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, found a file")
    busy = f"{root}: another download is writing this dataset folder"
    with exclusive(root / DOWNLOAD_FOLDER / ".download.lock", ONE_PROCESS, busy):
        for source in SOURCES[name] if sources is None else sources:
            if all((root / entry).exists() for entry in source.provides):
                log(f"{root}: {', '.join(source.provides)} already in place")
                continue
            archive = _fetch(
                source, root / DOWNLOAD_FOLDER, progress=progress, log=log, attempts=attempts, timeout=timeout
            )
            _extract_into(archive, source, root, progress=progress)
            archive.unlink()
    _remove_if_empty(root / DOWNLOAD_FOLDER)
    if name == "flickr30k" and not any((root / folder).is_dir() for folder in FLICKR30K_IMAGE_FOLDERS):
        raise DataError(f"{root}: {karpathy_file(name, root).name} is in place, but not the images; {flickr30k_images_hint(root)}")
    log(f"{root}: the {name} dataset is in place")
    return root


# --- downloading -------------------------------------------------------------------------------


class _Interrupted(Exception):
    """The connection failed or ended early; what arrived is kept in the part file."""


def _fetch(
    source: Source, folder: Path, *, progress: bool, log: Callable[[str], None], attempts: int, timeout: float
) -> Path:
    """``folder/<file>``, downloaded (resuming ``<file>.part``) and checked, unless it is already there."""
    archive = folder / source.file
    if archive.exists():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{source.file}.part"
    for attempt in range(1, attempts + 1):
        try:
            _download_once(source, part, progress=progress, log=log, timeout=timeout)
            break
        except _Interrupted as error:
            kept = part.stat().st_size if part.exists() else 0
            if attempt == attempts:
                resume = f"; {part} keeps the {kept} bytes received and the same command resumes from there" if kept else ""
                tries = f" (tried {attempts} times)" if attempts > 1 else ""
                raise DataError(f"{source.url}: {error}{tries}{resume}") from None
            log(f"{source.file}: {error}; trying again from byte {kept} ({attempt + 1} of {attempts})")
    _check(part, source, log)
    os.replace(part, archive)
    return archive


def _download_once(source: Source, part: Path, *, progress: bool, log: Callable[[str], None], timeout: float) -> None:
    """Append the rest of ``source`` to ``part`` over one connection (start over where it cannot resume)."""
    have = part.stat().st_size if part.exists() else 0
    if source.size is not None and have >= source.size:
        if have == source.size:
            return
        log(f"{part}: longer than the published {source.size} bytes; downloading it again")
        part.unlink()
        have = 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(source.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and have:  # nothing past ``have``: complete, or longer than the server's file
            if _range_total(error.headers.get("Content-Range")) == have:
                return
            part.unlink()
            raise _Interrupted(f"the server has nothing past byte {have} (HTTP 416); removed the part file") from None
        raise DataError(f"{source.url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Interrupted(f"cannot connect ({getattr(error, 'reason', error)})") from None
    with response:
        offset, total = _body_start(response, have, part)
        if have and offset == 0:
            log(f"{source.file}: the server does not resume downloads (it answered {response.status}); starting again")
        if source.size is not None and total is not None and total != source.size:
            raise DataError(f"{source.url}: the server offers {total} bytes, the published size is {source.size}")
        received = offset
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=source.file, file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as error:
                    raise _Interrupted(f"connection lost after {received} bytes ({error!r})") from None
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def _body_start(response: http.client.HTTPResponse, have: int, part: Path) -> tuple[int, int | None]:
    """``(offset of the body in the file, the file's size if the server says)``."""
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != have:
            part.unlink()
            raise _Interrupted(f"the server sent another range ({response.headers.get('Content-Range')}); starting over")
        return have, int(match[2]) if match[2] != "*" else None
    length = response.headers.get("Content-Length", "")
    return 0, int(length) if length.isdigit() else None


def _range_total(content_range: str | None) -> int | None:
    """The file size in a 416 answer's ``Content-Range: bytes */SIZE``, if there is one."""
    match = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    return int(match[1]) if match else None


def _check(part: Path, source: Source, log: Callable[[str], None]) -> None:
    """The published size and checksum, where there are any; a mismatch removes the file."""
    size = part.stat().st_size
    if source.size is not None and size != source.size:
        part.unlink()
        raise DataError(f"{source.file}: {size} bytes, expected {source.size}; removed it, the next run downloads it again")
    if source.checksum is None:
        return
    algorithm, expected = source.checksum
    if size > 64 * CHUNK:
        log(f"{source.file}: checking its {algorithm}")
    digest = hashlib.new(algorithm)
    with open(part, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        part.unlink()
        raise DataError(
            f"{source.file}: {algorithm} mismatch, expected {expected}, got {digest.hexdigest()}; "
            "removed it, the next run downloads it again"
        )


# --- extracting --------------------------------------------------------------------------------


def _extract_into(archive: Path, source: Source, root: Path, *, progress: bool) -> None:
    """Extract ``source.provides`` from ``archive`` next to it, then rename each entry into ``root``."""
    staging = archive.with_name(f"{archive.name}.extract")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that stopped while extracting
    try:
        _extract(archive, source.provides, staging, progress=progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for entry in source.provides:
        target = root / entry
        if not target.exists():  # one already there was put in place whole by an earlier run
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / entry, target)
    shutil.rmtree(staging)


def _extract(archive: Path, provides: tuple[str, ...], staging: Path, *, progress: bool) -> None:
    """The members of ``archive`` that are, or are under, one of ``provides``, written into ``staging``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if any(_within(m.filename, entry) for entry in provides)]
            missing = [entry for entry in provides if not any(_within(m.filename, entry) for m in members)]
            if missing:
                raise _Unusable(f"has no {', '.join(missing)}")
            targets = [_member_target(staging, member.filename) for member in members]
            bar = tqdm(zip(members, targets), total=len(members), desc=f"extracting {archive.name}", unit="file",
                       file=sys.stderr, disable=not progress, leave=False)
            for member, target in bar:
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (_Unusable, zipfile.BadZipFile, zlib.error, EOFError) as error:
        archive.unlink()
        problem = error if isinstance(error, _Unusable) else f"is not a valid zip archive ({error})"
        raise DataError(f"{archive.name}: {problem}; removed it, the next run downloads it again") from None
    except OSError as error:
        raise DataError(f"{archive}: extracting into {staging} failed ({error})") from None


class _Unusable(Exception):
    """The archive is a zip, but not one this dataset can use."""


def _within(member: str, entry: str) -> bool:
    """Whether the zip member ``member`` is the entry ``entry`` (a file or folder path) or inside it."""
    name = member.rstrip("/")
    return name == entry or name.startswith(entry + "/")


def _member_target(staging: Path, member: str) -> Path:
    """Where ``member`` is written; one that would land outside ``staging`` (zip-slip) is refused."""
    target = (staging / member).resolve()
    if not target.is_relative_to(staging.resolve()):
        raise _Unusable(f"member {member!r} would be written outside the folder it is extracted into")
    return target


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # absent, or it still holds something
        pass
