"""download_dataset against a local HTTP server on 127.0.0.1 serving small archives made here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from sca_caption.data.datasets import FLICKR30K_FORM, load_corpus
from sca_caption.data.download import DOWNLOAD_FOLDER, Source, download_dataset
from sca_caption.data.errors import DataError
from sca_caption.data.flickr8k import SPLIT_FILES, TOKEN_FILE


@dataclass
class Served:
    """What the server serves, how it misbehaves, and the requests it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True  # answer Range requests with 206 (False: always 200 and the whole file)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping, once
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


def handler_for(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests.append((self.path, self.headers.get("Range")))
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            requested = self.headers.get("Range")
            if served.ranges and requested is not None:
                start = int(requested.removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = served.cut_after.pop(self.path, None)
            if cut is None:
                self.wfile.write(body[start:])
                return
            self.wfile.write(body[start:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[Served, str]]:
    """A server in a thread, and its base URL; always shut down."""
    served = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(served))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


IMAGES = {"a.jpg": jpeg((200, 0, 0)), "b.jpg": jpeg((0, 200, 0)), "c.jpg": jpeg((0, 0, 200))}
CAPTIONS = {"a.jpg": "a red square", "b.jpg": "a green square", "c.jpg": "a blue square"}
SPLITS = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val"}


def karpathy_json() -> bytes:
    images = [
        {"filename": name, "split": SPLITS[name], "sentences": [{"raw": CAPTIONS[name], "tokens": CAPTIONS[name].split()}]}
        for name in IMAGES
    ]
    return json.dumps({"images": images}).encode()


def flickr8k_archives() -> dict[str, bytes]:
    """Archives shaped like the published Flickr8k and Karpathy ones (with the junk they carry)."""
    image_zip = {f"Flicker8k_Dataset/{name}": data for name, data in IMAGES.items()}
    image_zip["__MACOSX/Flicker8k_Dataset/._a.jpg"] = b"resource fork"
    token = "".join(f"{name}#{k}\t{CAPTIONS[name]}\n" for name in IMAGES for k in range(2))
    text_zip = {TOKEN_FILE: token.encode(), "readme.txt": b"Flickr8k"}
    for split, file in SPLIT_FILES.items():
        text_zip[file] = "".join(f"{n}\n" for n, s in SPLITS.items() if s == split).encode()
    karpathy_zip = {"dataset_flickr8k.json": karpathy_json(), "dataset_coco.json": b'{"images": []}'}
    return {
        "/Flickr8k_Dataset.zip": make_zip(image_zip),
        "/Flickr8k_text.zip": make_zip(text_zip),
        "/caption_datasets.zip": make_zip(karpathy_zip),
    }


PROVIDES = {
    "/Flickr8k_Dataset.zip": ("Flicker8k_Dataset",),
    "/Flickr8k_text.zip": (TOKEN_FILE, *SPLIT_FILES.values()),
    "/caption_datasets.zip": ("dataset_flickr8k.json",),
}


def sources_for(base: str, archives: dict[str, bytes], *, checksums: bool = True) -> list[Source]:
    """The Flickr8k table, pointing at the local server, with the archives' real sizes and sha256."""
    return [
        Source(
            f"{base}{path}",
            path.lstrip("/"),
            PROVIDES[path],
            size=len(data) if checksums else None,
            checksum=("sha256", hashlib.sha256(data).hexdigest()) if checksums else None,
        )
        for path, data in archives.items()
    ]


def fetch(root: Path, sources: list[Source], name: str = "flickr8k", **kwargs) -> list[str]:
    """Run download_dataset quietly; the lines it logged."""
    lines: list[str] = []
    download_dataset(name, root, sources=sources, progress=False, log=lines.append, **kwargs)
    return lines


def assert_complete_flickr8k(root: Path) -> None:
    records = load_corpus("flickr8k", root)
    assert [(r.image_id, r.split, r.raw) for r in records] == [
        ("a", "train", ("a red square",)), ("b", "train", ("a green square",)), ("c", "val", ("a blue square",))
    ]
    assert all(r.path.read_bytes() == IMAGES[r.path.name] for r in records)
    assert sorted(p.name for p in root.iterdir()) == sorted(["Flicker8k_Dataset", TOKEN_FILE, *SPLIT_FILES.values(), "dataset_flickr8k.json"])


def assert_no_dataset(root: Path) -> None:
    with pytest.raises(DataError, match="no flickr8k dataset in"):
        load_corpus("flickr8k", root)


def test_full_download_gives_a_dataset_the_reader_loads_and_a_rerun_fetches_nothing(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    root = tmp_path / "flickr8k"
    lines = fetch(root, sources_for(base, served.files))
    assert [path for path, _ in served.requests] == list(served.files)
    assert lines[-1] == f"{root}: the flickr8k dataset is in place"
    assert_complete_flickr8k(root)  # only the entries the readers use; no archives, no .download
    served.requests.clear()
    lines = fetch(root, sources_for(base, served.files))
    assert served.requests == [] and lines[0] == f"{root}: Flicker8k_Dataset already in place"


def test_download_cut_off_mid_file_resumes_with_a_range_request(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    cut = len(served.files["/Flickr8k_Dataset.zip"]) // 2
    served.cut_after["/Flickr8k_Dataset.zip"] = cut
    root = tmp_path / "flickr8k"
    with pytest.raises(DataError) as info:
        fetch(root, sources_for(base, served.files), attempts=1)
    message = str(info.value)
    assert "\n" not in message and f"connection closed after {cut} of" in message
    assert "the same command resumes from there" in message
    part = root / DOWNLOAD_FOLDER / "Flickr8k_Dataset.zip.part"
    assert part.read_bytes() == served.files["/Flickr8k_Dataset.zip"][:cut]
    assert_no_dataset(root)

    fetch(root, sources_for(base, served.files))
    assert served.requests[1] == ("/Flickr8k_Dataset.zip", f"bytes={cut}-")
    assert_complete_flickr8k(root)  # the sha256 of the resumed archive was checked too


def test_a_dropped_connection_is_resumed_within_the_same_run(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    served.cut_after["/Flickr8k_text.zip"] = 100
    root = tmp_path / "flickr8k"
    lines = fetch(root, sources_for(base, served.files))
    assert ("/Flickr8k_text.zip", "bytes=100-") in served.requests
    assert any("trying again from byte 100 (2 of 3)" in line for line in lines)
    assert_complete_flickr8k(root)


def test_server_refusing_range_requests_restarts_the_file_and_succeeds(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    served.ranges = False
    served.cut_after["/Flickr8k_Dataset.zip"] = 300
    root = tmp_path / "flickr8k"
    lines = fetch(root, sources_for(base, served.files))
    assert served.requests[:2] == [("/Flickr8k_Dataset.zip", None), ("/Flickr8k_Dataset.zip", "bytes=300-")]
    assert any("the server does not resume downloads (it answered 200); starting again" in line for line in lines)
    assert_complete_flickr8k(root)


def test_checksum_mismatch_is_one_line_leaves_no_dataset_and_the_next_run_starts_over(server, tmp_path: Path):
    served, base = server
    good = flickr8k_archives()
    served.files = dict(good)
    corrupt = bytearray(good["/Flickr8k_text.zip"])
    corrupt[len(corrupt) // 2] ^= 0xFF
    served.files["/Flickr8k_text.zip"] = bytes(corrupt)
    root = tmp_path / "flickr8k"
    with pytest.raises(DataError) as info:
        fetch(root, sources_for(base, good))
    expected, actual = hashlib.sha256(good["/Flickr8k_text.zip"]).hexdigest(), hashlib.sha256(corrupt).hexdigest()
    assert str(info.value) == (
        f"Flickr8k_text.zip: sha256 mismatch, expected {expected}, got {actual}; removed it, the next run downloads it again"
    )
    assert sorted(p.name for p in (root / DOWNLOAD_FOLDER).iterdir()) == []  # the bad part file is gone
    assert_no_dataset(root)

    served.files = good
    served.requests.clear()
    fetch(root, sources_for(base, good))
    assert served.requests == [("/Flickr8k_text.zip", None), ("/caption_datasets.zip", None)]
    assert_complete_flickr8k(root)


def test_corrupt_archive_without_a_checksum_is_caught_on_extraction(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    served.files["/Flickr8k_Dataset.zip"] = b"<html>not a zip</html>"
    root = tmp_path / "flickr8k"
    with pytest.raises(DataError, match=r"^Flickr8k_Dataset.zip: is not a valid zip archive .*; removed it"):
        fetch(root, sources_for(base, served.files, checksums=False))
    assert list((root / DOWNLOAD_FOLDER).iterdir()) == []
    assert_no_dataset(root)


def test_size_differing_from_the_published_one_stops_before_downloading(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    sources = sources_for(base, served.files)
    sources[0] = Source(sources[0].url, sources[0].file, sources[0].provides, size=123)
    with pytest.raises(DataError, match=r"Flickr8k_Dataset.zip: the server offers \d+ bytes, the published size is 123$"):
        fetch(tmp_path / "flickr8k", sources)


def test_zip_member_escaping_the_folder_is_refused(server, tmp_path: Path):
    served, base = server
    served.files = {"/caption_datasets.zip": make_zip({"dataset_flickr8k.json/../../evil.json": b"{}"})}
    root = tmp_path / "data" / "flickr8k"
    with pytest.raises(DataError, match="would be written outside the folder it is extracted into"):
        fetch(root, sources_for(base, served.files))
    assert not list(tmp_path.rglob("evil.json")) and [p.name for p in root.rglob("*")] == [DOWNLOAD_FOLDER]


def test_archive_without_the_expected_files_and_http_errors_are_one_line(server, tmp_path: Path):
    served, base = server
    served.files = {"/caption_datasets.zip": make_zip({"dataset_coco.json": b"{}"})}
    with pytest.raises(DataError, match="^caption_datasets.zip: has no dataset_flickr8k.json; removed it"):
        fetch(tmp_path / "flickr8k", sources_for(base, served.files))
    missing = Source(f"{base}/nothing.zip", "nothing.zip", ("dataset_flickr8k.json",))
    with pytest.raises(DataError, match=r"^http://127.0.0.1:\d+/nothing.zip: HTTP 404 Not Found$"):
        fetch(tmp_path / "flickr8k", [missing])


def test_flickr30k_without_images_says_where_they_come_from_and_where_they_go(server, tmp_path: Path):
    served, base = server
    served.files = {"/caption_datasets.zip": make_zip({"dataset_flickr30k.json": karpathy_json()})}
    source = Source(f"{base}/caption_datasets.zip", "caption_datasets.zip", ("dataset_flickr30k.json",))
    root = tmp_path / "flickr30k"
    with pytest.raises(DataError) as info:
        fetch(root, [source], "flickr30k")
    message = str(info.value)
    assert message.startswith(f"{root}: dataset_flickr30k.json is in place, but not the images; ")
    assert FLICKR30K_FORM in message and f"{root / 'flickr30k-images'}/" in message and "\n" not in message
    with pytest.raises(DataError, match="no image folder .*request form"):
        load_corpus("flickr30k", root)

    (root / "flickr30k-images").mkdir()
    for name, data in IMAGES.items():
        (root / "flickr30k-images" / name).write_bytes(data)
    fetch(root, [source], "flickr30k")
    assert [r.image_id for r in load_corpus("flickr30k", root)] == ["a", "b", "c"]


def test_datasets_without_a_download_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match=r"shapes dataset is generated \(at data/shapes on first use, elsewhere by preprocess/make_shapes.py\)"):
        download_dataset("shapes", tmp_path)
    with pytest.raises(DataError, match="no download for dataset 'mnist'; choose one of flickr8k, flickr30k, coco"):
        download_dataset("mnist", tmp_path)


def test_a_part_file_already_complete_is_not_downloaded_again(server, tmp_path: Path):
    served, base = server
    data = make_zip({"dataset_flickr8k.json": karpathy_json()})
    served.files = {"/caption_datasets.zip": data}
    checked = Source(f"{base}/caption_datasets.zip", "caption_datasets.zip", ("dataset_flickr8k.json",),
                     checksum=("sha256", hashlib.sha256(data).hexdigest()))  # no size: the server's 416 tells
    root = tmp_path / "flickr8k"
    (root / DOWNLOAD_FOLDER).mkdir(parents=True)
    (root / DOWNLOAD_FOLDER / "caption_datasets.zip.part").write_bytes(data)
    fetch(root, [checked])
    assert served.requests == [("/caption_datasets.zip", f"bytes={len(data)}-")]
    assert (root / "dataset_flickr8k.json").read_bytes() == karpathy_json()

    (root / "dataset_flickr8k.json").unlink()  # a part file longer than the server's file: fetched again
    (root / DOWNLOAD_FOLDER).mkdir()
    (root / DOWNLOAD_FOLDER / "caption_datasets.zip.part").write_bytes(data + b"trailing junk")
    served.requests.clear()
    lines = fetch(root, [checked])
    assert served.requests == [("/caption_datasets.zip", f"bytes={len(data) + 13}-"), ("/caption_datasets.zip", None)]
    assert any(f"the server has nothing past byte {len(data) + 13} (HTTP 416)" in line for line in lines)
    assert (root / "dataset_flickr8k.json").read_bytes() == karpathy_json()


def test_train_download_fetches_nothing_already_in_place_and_explains_flickr30k_images(tmp_path: Path, capsys):
    from sca_caption import train

    root = tmp_path / "flickr30k"
    root.mkdir()
    (root / "dataset_flickr30k.json").write_bytes(karpathy_json())
    argv = ["--dataset", "flickr30k", "--data-root", str(root), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert train.main([*argv, "--download", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert f"{root}: dataset_flickr30k.json already in place" in captured.out
    assert captured.err.startswith(f"error: {root}: dataset_flickr30k.json is in place, but not the images; ")
    assert FLICKR30K_FORM in captured.err and captured.err.count("\n") == 1


def test_a_second_download_into_the_same_folder_is_refused_naming_the_first(server, tmp_path: Path):
    served, base = server
    served.files = flickr8k_archives()
    root = tmp_path / "flickr8k"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(root / DOWNLOAD_FOLDER / ".download.lock")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        with pytest.raises(DataError, match=rf"flickr8k: another download is writing this dataset folder \(process {holder.pid}\)"):
            fetch(root, sources_for(base, served.files))
        assert served.requests == []
    finally:
        holder.kill()
        holder.wait()
    fetch(root, sources_for(base, served.files))  # the holder is gone: the lock is free
    assert_complete_flickr8k(root)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from sca_caption.distributed import ONE_PROCESS
from sca_caption.locks import exclusive
with exclusive(Path(sys.argv[1]), ONE_PROCESS, "busy"):
    print("HELD", flush=True)
    time.sleep(120)
"""
