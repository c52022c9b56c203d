"""``python -m sca_caption.serve``: the real uvicorn server in a subprocess on a free loopback
port, found with the checkpoint rule and named in its first log line, answering and shutting down
cleanly; its arguments (loopback unless asked, limits) and a missing checkpoint in one line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import pytest

from caption_support import save_tiny_checkpoint
from serve_support import as_answer, library_captions, photo_bytes
from sca_caption import captioning
from sca_caption.captioning import DecodeSettings, ImageCaptioner
from sca_caption.serve.__main__ import listening_socket, main, parse_args

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"sca_caption.serve: serving on http://127\.0\.0\.1:(\d+)")


def wait_for_port(log: Path, process: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = STARTED.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"the server did not start: {log.read_text(errors='replace')}")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_the_real_server_serves_on_loopback_and_shuts_down(tmp_path, stop):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoints" / "shapes" / "best.pt")
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sca_caption.serve", "--port", "0", "--max-wait-ms", "0"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        port = wait_for_port(log, process)
        first_line = log.read_text().splitlines()[0]
        assert first_line == "sca_caption.serve: checkpoint checkpoints/shapes/best.pt (the newest trained checkpoint), device cpu"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:  # no proxy
            assert http.get("/healthz").json() == {"status": "ok", "queued": 0}
            answer = http.post("/v1/captions?beam=3&n_best=2", content=photo_bytes(1), headers={"content-type": "image/png"})
            assert answer.status_code == 200
            captioner = ImageCaptioner.from_checkpoint(checkpoint)
            want = as_answer(library_captions(captioner, [photo_bytes(1)], DecodeSettings(beam_size=3, n_best=2))[0])
            got = answer.json()["results"][0]["n_best"]
            # the server runs one torch thread, this process maybe more: float sums may differ in the last bits
            assert [(c["caption"], c["finished"]) for c in got] == [(c["caption"], c["finished"]) for c in want]
            assert [c["score"] for c in got] == pytest.approx([c["score"] for c in want], rel=1e-5)
            assert http.post("/v1/captions", content=b"x", headers={"content-type": "image/png"}).status_code == 422
            assert http.get("/").text.startswith("<!doctype html>")
    finally:
        process.send_signal(stop)
        status = process.wait(timeout=60)
    assert status == 0 and "Application shutdown complete" in log.read_text() and "error" not in log.read_text()


@pytest.mark.slow
def test_a_slow_body_times_out_and_sigterm_stops_at_once_answering_queued_requests_503(tmp_path):
    """A client sending one byte a second is answered 408 after --body-timeout-s; a request queued
    for a batch that would wait a minute is answered 503 on SIGTERM, and the server exits in seconds."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt")
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sca_caption.serve", "--checkpoint", str(checkpoint), "--port", "0",
             "--max-wait-ms", "60000", "--body-timeout-s", "2"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        port = wait_for_port(log, process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n".encode())
            start = time.monotonic()
            answer = b""
            for _ in range(8):  # one byte a second until the server answers
                try:
                    slow.sendall(b"x")
                except OSError:
                    break
                slow.settimeout(1)
                try:
                    answer += slow.recv(4096)
                except TimeoutError:
                    continue
                if answer:
                    break
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - start < 5
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as http:
            queued = ThreadPoolExecutor(1).submit(
                http.post, "/v1/captions", content=photo_bytes(1), headers={"content-type": "image/png"}
            )
            while http.get("/healthz").json()["queued"] != 1:
                time.sleep(0.05)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answer = queued.result(timeout=30)
            status = process.wait(timeout=30)
        assert answer.status_code == 503 and answer.json() == {"error": "the server is shutting down; send the request again later"}
        assert status == 0 and time.monotonic() - start < 10  # the batch would have waited 60 s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_need_no_flag(host):
    assert parse_args(["--host", host]).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "example.org"])
def test_another_host_needs_allow_remote(capsys, host):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--host", host])
    assert exited.value.code == 2
    assert f"--host {host} is not a loopback address: add --allow-remote" in capsys.readouterr().err
    assert parse_args(["--host", host, "--allow-remote"]).host == host  # parsed only: nothing is bound here


@pytest.mark.parametrize("argv", [
    ["--max-batch", "0"], ["--max-wait-ms", "-1"], ["--max-upload-mb", "0"], ["--port", "70000"],
    ["--max-wait-ms", "nan"], ["--max-wait-ms", "inf"], ["--max-wait-ms", "1e12"], ["--max-upload-mb", "inf"],
    ["--max-upload-mb", "nan"], ["--max-batch", "100000"], ["--body-timeout-s", "0"], ["--body-timeout-s", "inf"],
])
def test_impossible_limits_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m sca_caption.serve: error:")


def test_without_any_checkpoint_it_says_how_to_make_one(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(captioning, "shipped_checkpoint", lambda: None)  # a package without its shipped model
    assert main(["--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint: neither checkpoints/flickr8k_cs_lite0.pt")
    assert "python -m sca_caption.train" in err[0]


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no checkpoint here: the port is refused first
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        assert main(["--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: 127.0.0.1:{port}: cannot listen there (OSError: ")
    assert "in use" in err[0]
    assert err[0].endswith("pick another --port or --host")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_listening_socket_takes_ipv4_and_ipv6_loopback(host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with listening_socket(host, 0) as sock:
        assert sock.getsockname()[0] == host and sock.getsockname()[1] > 0


def test_the_prefix_runs_in_chunks_with_the_same_features(tmp_path, capsys):
    captioner = ImageCaptioner.from_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    images = torch.rand(5, 3, captioner.input_size, captioner.input_size, generator=torch.Generator().manual_seed(0))
    whole = captioner.features(images)
    calls = []
    captioner.prefix.register_forward_hook(lambda module, inputs, outputs: calls.append(len(inputs[0])))
    captioner.prefix_chunk = 2
    chunked = captioner.features(images)
    assert calls == [2, 2, 1]
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)
    assert parse_args(["--prefix-chunk", "4"]).prefix_chunk == 4
    with pytest.raises(SystemExit):
        parse_args(["--prefix-chunk", "17", "--max-batch", "16"])
