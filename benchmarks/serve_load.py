"""Load on the captioning service: a fixed number of requests from a fixed number of concurrent
clients to a server on 127.0.0.1, then it stops; with micro-batching on and off, and the caption
CLI's speed on the same images for comparison, all in one run.

For each mode it starts ``python -m sca_caption.serve`` on a free loopback port (``batched``:
``--max-batch`` = the client count; ``single``: ``--max-batch 1``, one image at a time) and
warms it up: bursts of 1, 2, ... up to the client count of concurrent requests, so that every
batch size has been decoded once (the allocator's working set grows with the largest shapes
seen), then ``--warmup`` requests. It reads the server's resident memory, sends ``--requests``
requests (each one Flickr8k photo as a raw ``image/jpeg`` body, cycling through the first
``--n``), reads it again, and prints one JSON line: images/s, p50/p95/p99 latency, errors
(non-200 answers or failed requests), the batch sizes the server reported, and the memory
before and after. Before the modes: the CLI's images/s (``caption_speed.run``, batch size =
the client count, on the same photos) and the model's time per image at batch 1 and at the
client count (backbone prefix, beam search); after them, one line with the ratios: the decode
stage's speed-up (beam search per image, batch 1 over the client count), the prefix's, and the
whole request's (``batched_over_single``).

    python benchmarks/serve_load.py --random-model flickr8k --beam 3 --clients 16 --requests 2000

``--modes large`` instead sends ``--large-clients`` concurrent uploads of a ``--large-side``
square PNG (flat, a few hundred KB, just under the pixel limit at 9400) and prints the server's
peak resident memory (VmHWM) before and after them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch
from PIL import Image

from caption_speed import DEFAULT_DATA, RANDOM_VOCAB, random_checkpoint, run as cli_run
from sca_caption.captioning import DecodeSettings, ImageCaptioner, collect_images
from sca_caption.data.images import load_image

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"sca_caption.serve: serving on http://127\.0\.0\.1:(\d+)")


class Server:
    """``python -m sca_caption.serve`` in a subprocess on a free loopback port, logging to a file."""

    def __init__(self, checkpoint: Path, log: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "sca_caption.serve", "--checkpoint", str(checkpoint), "--port", "0", *extra]
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self._port()}"

    def _port(self, timeout: float = 300.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = STARTED.search(self.log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("the server did not start in time")

    def resident_mb(self, key: str = "VmRSS") -> float:
        """Resident memory now (VmRSS) or at its peak so far (VmHWM), MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(key + r":\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def load(url: str, bodies: list[bytes], requests: int, clients: int, beam: int, media_type: str = "image/jpeg") -> dict:
    """``requests`` captioning requests from ``clients`` concurrent clients; timings and errors."""
    latencies: list[float] = []
    batch_sizes: Counter[int] = Counter()
    errors = 0
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests:
            body = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            try:
                answer = await http.post(f"{url}/v1/captions?beam={beam}", content=body, headers={"content-type": media_type})
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if answer.status_code != 200:
                errors += 1
                continue
            batch_sizes[answer.json()["results"][0]["timing"]["batch_size"]] += 1

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=600, trust_env=False) as http:  # no proxy
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": requests,
        "seconds": round(seconds, 2),
        "images_per_s": round((requests - errors) / seconds, 2),
        "p50_ms": round(quantiles[49] * 1000, 1),
        "p95_ms": round(quantiles[94] * 1000, 1),
        "p99_ms": round(quantiles[98] * 1000, 1),
        "errors": errors,
        "batch_sizes": dict(sorted(batch_sizes.items())),
    }


def large_uploads(checkpoint: Path, scratch: Path, side: int, clients: int, beam: int) -> dict:
    """The server's peak resident memory (VmHWM) after start-up and after ``clients`` concurrent
    uploads of a flat ``side`` x ``side`` RGB PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 140, 160)).save(buffer, "PNG")
    body = buffer.getvalue()
    server = Server(checkpoint, scratch / "large.log", "--max-upload-mb", str(max(1, len(body) * 2 // 2**20 + 1)))
    try:
        before = server.resident_mb("VmHWM")
        result = asyncio.run(load(server.url, [body], clients, clients, beam, "image/png"))
        peak = server.resident_mb("VmHWM")
    finally:
        server.stop()
    return {"benchmark": "serve_large_uploads", "side": side, "png_kb": round(len(body) / 1024), "clients": clients,
            "errors": result["errors"], "seconds": result["seconds"], "peak_rss_before_mb": round(before, 1),
            "peak_rss_after_mb": round(peak, 1)}


def model_split(captioner: ImageCaptioner, paths: list[Path], beam: int, batch_sizes: tuple[int, ...]) -> dict:
    """Where a batch's model time goes, per image: the backbone prefix and the beam search, at
    each of ``batch_sizes`` (over the first max(batch_sizes) photos, after one warm-up pass)."""
    images = torch.stack([load_image(p, captioner.input_size) for p in paths[: max(batch_sizes)]])
    settings = DecodeSettings(beam_size=beam)
    split = {}
    for size in batch_sizes:
        batches = [images[i : i + size] for i in range(0, len(images), size)]
        captioner.caption_features(captioner.features(batches[0]), settings)
        prefix = search = 0.0
        for batch in batches:
            start = time.perf_counter()
            features = captioner.features(batch)
            middle = time.perf_counter()
            captioner.caption_features(features, settings)
            prefix, search = prefix + middle - start, search + time.perf_counter() - middle
        split[f"batch_{size}"] = {"prefix_ms": round(prefix / len(images) * 1000, 1), "beam_ms": round(search / len(images) * 1000, 1)}
    return split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="distinct photos, cycled (default 64)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="Flickr8k folder")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random --random-model model")
    parser.add_argument("--random-model", choices=sorted(RANDOM_VOCAB), default="flickr8k")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="requests after the bursts, before the first memory reading")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", choices=["batched", "single", "large"], default=["batched", "single"],
                        help="large: only the large-upload memory check")
    parser.add_argument("--large-side", type=int, default=9400, help="the large mode's PNG side (default 9400)")
    parser.add_argument("--large-clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="the CLI's image decoding processes")
    args = parser.parse_args()

    paths = collect_images([str(args.data_root / "Flicker8k_Dataset")])[: args.n]
    bodies = [p.read_bytes() for p in paths]
    common = {"beam": args.beam, "clients": args.clients, "photos": len(paths), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or random_checkpoint(Path(scratch) / "random.pt", args.random_model)
        model = str(args.checkpoint) if args.checkpoint else f"random {args.random_model} model"
        if args.modes == ["large"]:
            print(json.dumps(large_uploads(checkpoint, Path(scratch), args.large_side, args.large_clients, args.beam)), flush=True)
            return 0
        captioner = ImageCaptioner.from_checkpoint(checkpoint)
        cli = cli_run(captioner, paths, DecodeSettings(beam_size=args.beam), batch_size=args.clients, workers=args.workers)
        print(json.dumps({"benchmark": "caption_cli", "model": model, **common, **cli}), flush=True)
        split = model_split(captioner, paths, args.beam, (1, args.clients))
        print(json.dumps({"benchmark": "model_ms_per_image", "model": model, **common, **split}), flush=True)
        del captioner
        speeds = {}
        for mode in args.modes:
            max_batch = args.clients if mode == "batched" else 1
            server = Server(checkpoint, Path(scratch) / f"{mode}.log", "--max-batch", str(max_batch),
                            "--max-wait-ms", str(args.max_wait_ms))
            try:
                for burst in range(1, args.clients + 1):
                    asyncio.run(load(server.url, bodies, burst, burst, args.beam))
                asyncio.run(load(server.url, bodies, args.warmup, args.clients, args.beam))
                before = server.resident_mb()
                result = asyncio.run(load(server.url, bodies, args.requests, args.clients, args.beam))
                after = server.resident_mb()
            finally:
                server.stop()
            speeds[mode] = result["images_per_s"]
            print(json.dumps({
                "benchmark": "serve_load", "mode": mode, "model": model, "max_batch": max_batch,
                "max_wait_ms": args.max_wait_ms, **common, **result, "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1), "rss_growth": round(after / before - 1, 4),
            }), flush=True)
    one, many = split["batch_1"], split[f"batch_{args.clients}"]
    summary = {"benchmark": "serve_vs_cli", "cli_images_per_s": cli["images_per_s"], **{f"{m}_images_per_s": v for m, v in speeds.items()},
               "decode_speedup": round(one["beam_ms"] / many["beam_ms"], 3), "prefix_speedup": round(one["prefix_ms"] / many["prefix_ms"], 3)}
    if "batched" in speeds:
        summary["batched_over_cli"] = round(speeds["batched"] / cli["images_per_s"], 3)
        if "single" in speeds:
            summary["batched_over_single"] = round(speeds["batched"] / speeds["single"], 3)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
