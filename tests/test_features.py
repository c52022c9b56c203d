"""Feature cache: values, kill-and-resume, refusal of unfinished/mismatched files, DataLoader reads,
bad images under "error" and "skip"."""

from __future__ import annotations

import os
import pickle
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sca_caption.data.corpus import ImageRecord, images_hash
from sca_caption.data.datasets import load_corpus
from sca_caption.data.errors import BadInputReport, DataError
from sca_caption.data.feature_extraction import extract_features
from sca_caption.data.features import CacheSpec, FeatureCache
from sca_caption.data.images import load_image
from sca_caption.data.shapes import generate_shapes
from sca_caption.io_utils import OutputError
from sca_caption.models.backbones import build_backbone
from sca_caption.models.backbones.base import freeze
from paused_extract import PAUSED
from train_support import subprocess_env

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("stage6", "stage7")  # cached tap: stage6, 192 x 7 x 7


def _records(folder: Path, count: int, bad: dict[int, bytes] | None = None) -> list[ImageRecord]:
    """``count`` small noisy JPEGs; ``bad`` maps an index to the raw bytes written instead."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        path = folder / f"img{i:02d}.jpg"
        if bad and i in bad:
            path.write_bytes(bad[i])
        else:
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(f"img{i:02d}", path, "train", ("a caption",), (("a", "caption"),)))
    return records


def _spec(records: list[ImageRecord], **changes: object) -> CacheSpec:
    spec = CacheSpec("shapes", "data/shapes", "efficientnet_lite0", LAYERS, images_hash(records), weights="none")
    return replace(spec, **changes)


def _extract(records: list[ImageRecord], out: Path, **kwargs: object) -> None:
    extract_features(records, _spec(records), out, workers=0, progress=False, **{"batch_size": 3, **kwargs})


def _datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file, raw, and its attrs (as "attr:<name>")."""
    with h5py.File(path, "r") as f:
        found: dict[str, np.ndarray] = {f"attr:{k}": np.asarray(v) for k, v in f.attrs.items()}
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ImageRecord], Path]:
    folder = tmp_path_factory.mktemp("cache")
    records = _records(folder / "images", 7)
    _extract(records, folder / "f.h5")
    return records, folder / "f.h5"


def test_cache_holds_prefix_outputs_of_the_same_batches(built: tuple[list[ImageRecord], Path]) -> None:
    records, out = built
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = freeze(build_backbone("efficientnet_lite0", weights=None))
    prefix, _ = backbone.split(LAYERS)
    images = torch.stack([load_image(r.path, 224) for r in records])
    with torch.inference_mode():
        expected = torch.cat([prefix(images[s : s + 3])["stage6"] for s in range(0, 7, 3)]).half()
    cache = FeatureCache(out, expect=_spec(records))
    assert len(cache) == 7 and cache.taps == ("stage6",) and cache.shapes == {"stage6": (192, 7, 7)}
    assert cache.image_ids == tuple(r.image_id for r in records)
    for i in range(7):
        row = cache[i]["stage6"]
        assert row.dtype == torch.float32 and row.shape == (192, 7, 7)
        assert torch.equal(row, expected[i].float()), i
    assert torch.equal(cache[cache.index_of("img04")]["stage6"], expected[4].float())
    batch = cache.read_batch([5, 0, 5, 2])["stage6"]
    assert torch.equal(batch, expected[[5, 0, 5, 2]].float())
    with h5py.File(out, "r") as f:
        assert f["taps/stage6"].chunks == (1, 192, 7, 7) and f["taps/stage6"].dtype == np.float16
        attrs = dict(f.attrs)
    assert attrs["complete"] and attrs["backbone"] == "efficientnet_lite0" and attrs["input_size"] == 224
    assert attrs["normalization"] == "tf" and attrs["images_hash"] == images_hash(records)
    assert attrs["version"] == "0.1.0" and attrs["layers"] == '["stage6", "stage7"]'


def test_rerun_of_a_finished_cache_does_nothing(built: tuple[list[ImageRecord], Path]) -> None:
    records, out = built
    before = out.stat().st_mtime_ns
    result = extract_features(records, _spec(records), out, batch_size=3, workers=0, progress=False)
    assert result.already_complete and result.images == 7 and out.stat().st_mtime_ns == before


def test_progress_is_reported_after_each_part_and_each_merged_part(tmp_path: Path) -> None:
    records = _records(tmp_path / "images", 7)
    out = tmp_path / "f.h5"
    reported: list[tuple[str, int, list[str]]] = []

    def record(stage: str, count: int) -> None:  # what is on disk at each report
        reported.append((stage, count, sorted(p.name for p in (tmp_path / "f.h5.parts").glob("part-*.npz"))))

    _extract(records, out, on_progress=record)
    parts = [f"part-{k:06d}.npz" for k in range(3)]
    assert reported == [
        ("part", 1, parts[:1]), ("part", 2, parts[:2]), ("part", 3, parts),
        ("merge", 3, parts), ("merge", 6, parts), ("merge", 7, parts),
    ]
    assert FeatureCache(out).image_ids == tuple(r.image_id for r in records)


def test_a_full_disk_while_merging_is_one_line_and_the_rerun_merges_the_kept_parts(tmp_path: Path) -> None:
    records = _records(tmp_path / "images", 7)
    out = tmp_path / "f.h5"

    def full_disk(stage: str, count: int) -> None:
        if stage == "merge":
            raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"f.h5: not written, the file there is unchanged .*No space left") as caught:
        _extract(records, out, on_progress=full_disk)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5.parts", "images"]  # no temporary file
    stages: list[str] = []
    _extract(records, out, on_progress=lambda stage, count: stages.append(stage))
    assert set(stages) == {"merge"} and FeatureCache(out).image_ids == tuple(r.image_id for r in records)


def test_dataloader_with_two_workers_reads_every_row(built: tuple[list[ImageRecord], Path]) -> None:
    records, out = built
    cache = FeatureCache(out)
    direct = torch.stack([cache[i]["stage6"] for i in range(len(cache))])  # opens a handle in this process
    state = pickle.dumps(cache)
    assert b"h5py" not in state
    loader = DataLoader(cache, batch_size=2, num_workers=2)
    read = torch.cat([batch["stage6"] for batch in loader])
    assert torch.equal(read, direct)


def _refusal(path: Path, expect: CacheSpec | None) -> str:
    with pytest.raises(DataError) as caught:
        FeatureCache(path, expect=expect)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_unfinished_unreadable_and_absent_caches_are_refused(
    built: tuple[list[ImageRecord], Path], tmp_path: Path
) -> None:
    records, out = built
    spec = _spec(records)
    unfinished = tmp_path / "unfinished.h5"
    unfinished.write_bytes(out.read_bytes())
    with h5py.File(unfinished, "a") as f:
        f.attrs["complete"] = False
    message = _refusal(unfinished, spec)
    beside = unfinished.with_name(spec.file_name())
    assert "unfinished" in message and message.endswith(f"build one beside it with: {spec.command(beside)}")
    assert "build one beside it with: python preprocess/extract_features.py --dataset shapes" in _refusal(unfinished, None)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(out.read_bytes()[:4096])  # a file cut mid-write
    assert "not a readable HDF5 file" in _refusal(garbage, spec)
    assert "no feature cache here" in _refusal(tmp_path / "absent.h5", spec)
    compressed = tmp_path / "compressed.h5"
    compressed.write_bytes(out.read_bytes())
    with h5py.File(compressed, "a") as f:
        data = f["taps/stage6"][()]
        del f["taps/stage6"]
        f.create_dataset("taps/stage6", data=data, chunks=data.shape, compression="gzip")
    assert "not a feature cache (ValueError: /taps/stage6 is not float16" in _refusal(compressed, spec)
    # uncompressed but filtered, one image per chunk: raw chunk bytes would be shuffled or checksummed
    for name, options in (("shuffled", {"shuffle": True}), ("checksummed", {"fletcher32": True})):
        filtered = tmp_path / f"{name}.h5"
        filtered.write_bytes(out.read_bytes())
        with h5py.File(filtered, "a") as f:
            data = f["taps/stage6"][()]
            del f["taps/stage6"]
            f.create_dataset("taps/stage6", data=data, chunks=(1, *data.shape[1:]), **options)
        message = _refusal(filtered, spec)
        assert "not a feature cache (ValueError: /taps/stage6 is not float16" in message and "without filters" in message, name


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"backbone": "efficientnet_lite2"}, "backbone efficientnet_lite0, expected efficientnet_lite2"),
        ({"layers": ("stage5", "stage7")}, "layers stage6 stage7, expected stage5 stage7"),
        ({"images_hash": "0123456789abcdef"}, "expected 0123456789abcdef"),
        ({"version": "9.9.9"}, "version 0.1.0, expected 9.9.9"),
        ({"weights": "imagenet"}, "weights none, expected imagenet"),
    ],
)
def test_mismatched_cache_refused_with_rebuild_command(
    built: tuple[list[ImageRecord], Path], change: dict[str, object], shown: str
) -> None:
    records, out = built
    expect = _spec(records, **change)
    message = _refusal(out, expect)
    beside = out.with_name(expect.file_name())
    assert shown in message and message.endswith(f"build one beside it with: {expect.command(beside)}")


def test_rebuild_command_is_quoted_for_the_shell() -> None:
    spec = CacheSpec("flickr8k", "/data/my flickr", "efficientnet_lite0", ("stage5", "stage7"), "abc", limit=100)
    command = spec.command("out dir/f.h5")
    assert command == (
        "python preprocess/extract_features.py --dataset flickr8k --data-root '/data/my flickr' "
        "--backbone efficientnet_lite0 --weights imagenet --layers stage5 stage7 --out 'out dir/f.h5' --limit 100"
    )
    assert shlex.split(command)[5] == "/data/my flickr"


def test_bad_image_error_then_skip(tmp_path: Path) -> None:
    records = _records(tmp_path / "images", 5, bad={3: b"this is text, not a JPEG"})
    out = tmp_path / "f.h5"
    with pytest.raises(DataError) as caught:
        _extract(records, out, batch_size=2)
    assert str(caught.value) == f"{records[3].path}: not an image file Pillow can read"
    assert not out.exists() and (tmp_path / "f.h5.parts" / "part-000000.npz").exists()  # batch 0 kept

    report = BadInputReport()
    result = extract_features(
        records, _spec(records), out, batch_size=2, workers=0, on_bad="skip", report=report, progress=False
    )
    assert result.images == 4 and len(report) == 1 and report.skipped[0].file == records[3].path
    assert "not an image file" in report.summary()
    cache = FeatureCache(out)
    assert cache.image_ids == ("img00", "img01", "img02", "img04")
    assert list(cache.skipped) == ["img03"] and "not an image file" in cache.skipped["img03"]
    with pytest.raises(KeyError, match="skipped at extraction"):
        cache.index_of("img03")
    with pytest.raises(DataError, match="img03.jpg: not an image file"):  # "error" never accepts a skip
        _extract(records, out, batch_size=2)


def test_parts_of_other_settings_or_a_foreign_folder_are_refused_not_emptied(tmp_path: Path) -> None:
    records = _records(tmp_path / "images", 4)
    _extract(records, tmp_path / "fresh.h5")
    parts = tmp_path / "f.h5.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"batch_size": 2}')
    np.savez(parts / "part-000000.npz", indices=np.arange(3), failed=np.zeros(0, np.int64), problems=np.zeros(0, str),
             tap_stage6=np.zeros((3, 192, 7, 7), np.float16))
    with pytest.raises(DataError, match=r"f.h5.parts: the unfinished extraction of other settings \(dataset None there"):
        _extract(records, tmp_path / "f.h5")
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "part-000000.npz"]
    (parts / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"f.h5.parts: not the parts folder of an extraction; not touched"):
        _extract(records, tmp_path / "f.h5")
    assert [p.name for p in parts.iterdir()] == ["part-000000.npz"] and not (tmp_path / "f.h5").exists()
    shutil.rmtree(parts)
    _extract(records, tmp_path / "f.h5")
    fresh, again = _datasets(tmp_path / "fresh.h5"), _datasets(tmp_path / "f.h5")
    assert fresh.keys() == again.keys() and all(np.array_equal(fresh[k], again[k]) for k in fresh)


EXTRACT = REPO / "preprocess" / "extract_features.py"
PAUSED_EXTRACT = Path(__file__).with_name("paused_extract.py")


def _command(script: Path, data_root: Path, out: Path, *first: str, processes: int = 1) -> list[str]:
    """``script`` (the extractor CLI or ``paused_extract.py``, whose ``first`` arguments come before
    the CLI's) on the shapes corpus at ``data_root``, alone or under torchrun with ``processes``."""
    options = ["--dataset", "shapes", "--data-root", str(data_root), "--backbone", "efficientnet_lite0"]
    options += ["--weights", "none", "--layers", *LAYERS, "--out", str(out), "--batch-size", "2", "--workers", "1"]
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launch, str(script), *first, *options]


def _finish(command: list[str]) -> str:
    """Run ``command`` to its end (one thread per process); its stdout. Fails the test if it fails."""
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _paused(command: list[str], times: int, timeout: float = 240.0) -> subprocess.Popen[str]:
    """Start ``command`` and return once it has printed PAUSED ``times`` times (once per process
    that reached the pause point); fails the test if it ends or takes longer than ``timeout``."""
    process = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + timeout
    while sum(PAUSED in line for line in output) < times:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            _kill_all(process)
            pytest.fail(f"the extractor did not pause {times} time(s):\n" + "".join(output)[-3000:])
        output.append(line)
    return process


def _kill_all(process: subprocess.Popen[str]) -> None:
    """SIGKILL ``process`` and every process under it (torchrun starts its workers in their own
    sessions, so no process group covers them all), at once."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    run, grew = {process.pid}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in run} - run
        run |= below
        grew = bool(below)
    for pid in run:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A 12-image shapes corpus (6 batches of 2) and every dataset and attr of its cache as one
    uninterrupted process writes it."""
    folder = tmp_path_factory.mktemp("twelve")
    data_root = folder / "shapes"
    generate_shapes(data_root, counts={"train": 8, "val": 2, "test": 2})
    _finish(_command(EXTRACT, data_root, folder / "whole.h5"))
    expected = _datasets(folder / "whole.h5")
    assert len(expected["image_ids"]) == 12
    return data_root, expected


def _assert_same(path: Path, expected: dict[str, np.ndarray]) -> None:
    """``path`` holds exactly ``expected``'s datasets and attrs, value for value."""
    found = _datasets(path)
    assert found.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(found[name], expected[name]), name


def _killed_at(
    pause: str, data_root: Path, killed: Path, *, processes: int, paused: int, parts_left: list[int]
) -> None:
    """Run the paused extractor until ``paused`` processes reached ``pause``, check that a second
    extraction of the same file is refused meanwhile, SIGKILL the run, and check what it left:
    no cache, and exactly the part files ``parts_left``."""
    process = _paused(_command(PAUSED_EXTRACT, data_root, killed, "--pause-at", pause, processes=processes), paused)
    try:
        with pytest.raises(DataError, match="another extraction is writing this file"):
            records = load_corpus("shapes", data_root)
            extract_features(records, _spec(records), killed, batch_size=2, workers=0, progress=False)
    finally:
        _kill_all(process)
    assert not killed.exists()
    parts = sorted(p.name for p in killed.with_name(killed.name + ".parts").glob("part-*.npz"))
    assert parts == [f"part-{k:06d}.npz" for k in parts_left]


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    twelve: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    data_root, expected = twelve
    killed = tmp_path / "killed.h5"
    # Killed after two of six part files; the rerun resumes from those and is killed in the merge.
    _killed_at("part:2", data_root, killed, processes=1, paused=1, parts_left=[0, 1])
    assert not any(tmp_path.glob(".killed.h5.*.tmp"))
    _killed_at("merge:6", data_root, killed, processes=1, paused=1, parts_left=list(range(6)))
    assert any(tmp_path.glob(".killed.h5.*.tmp"))  # the merge's temporary file, cut off
    assert "written, 12 images, 0 skipped" in _finish(_command(EXTRACT, data_root, killed))
    _assert_same(killed, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5"]  # no parts, tmp, lock


@pytest.mark.slow
def test_two_processes_write_what_one_writes(twelve: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    data_root, expected = twelve
    out = tmp_path / "two.h5"
    stdout = _finish(_command(EXTRACT, data_root, out, processes=2))
    assert stdout.count("written, 12 images, 0 skipped") == 1  # rank 0 reports, rank 1 is silent
    _assert_same(out, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.h5"]


@pytest.mark.slow
def test_two_processes_killed_then_resumed_by_one(
    twelve: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    data_root, expected = twelve
    killed = tmp_path / "killed.h5"
    # Rank 0 computes batches 0, 2, 4 and rank 1 batches 1, 3, 5: killed once each wrote two
    # parts, then again in rank 0's merge (rank 1 waiting for it); one process finishes the file.
    _killed_at("part:2", data_root, killed, processes=2, paused=2, parts_left=[0, 1, 2, 3])
    _killed_at("merge:6", data_root, killed, processes=2, paused=1, parts_left=list(range(6)))
    assert "written, 12 images, 0 skipped" in _finish(_command(EXTRACT, data_root, killed))
    _assert_same(killed, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.h5"]
