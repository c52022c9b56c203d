"""Serve captions over HTTP: the JSON API (``/v1/captions``, ``/v1/model``, ``/healthz``, the
OpenAPI schema at ``/docs``) and the web page at ``/``.

    python -m sca_caption.serve [--checkpoint CKPT] [--host 127.0.0.1] [--port 8000]
        [--max-batch N] [--max-wait-ms T] [--max-upload-mb M] [--body-timeout-s S]

Without ``--checkpoint``: the shipped Flickr8k model ``checkpoints/flickr8k_cs_lite0.pt`` if
present, else the newest ``checkpoints/*/best.pt``, else the shipped model installed with the
package; the first log line says which. It binds to
the loopback address unless ``--allow-remote`` is given with another ``--host``; CUDA when
present, else the CPU (``--device``). Exit status 2 when it cannot start (bad arguments, an
unusable checkpoint). SIGTERM or Ctrl-C stops it within seconds: images still waiting for a
batch are answered 503 at once, the batch being decoded finishes, and a connection still open
after ``SHUTDOWN_GRACE_S`` is closed.
"""

from __future__ import annotations

from sca_caption.errors import exit_on_ctrl_c_until_command

if __name__ == "__main__":  # first: a Ctrl-C during the imports below (seconds) is one line, not a traceback
    exit_on_ctrl_c_until_command()

import argparse
import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from sca_caption.captioning import ImageCaptioner, default_checkpoint
from sca_caption.devices import add_device_option, default_device
from sca_caption.errors import SCACaptionError, command, first_line
from sca_caption.serve.app import BOUNDS, ServiceLimits, create_app
from sca_caption.serve.batcher import MicroBatcher
from sca_caption.serve.model_card import model_card
from sca_caption.serve.prefix_chunk import fastest_prefix_chunk

DEFAULTS = ServiceLimits()
SHUTDOWN_GRACE_S = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sca_caption.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: checkpoints/flickr8k_cs_lite0.pt if present, else the newest checkpoints/*/best.pt, "
                             "else the shipped model installed with the package")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host that is not a loopback address")
    parser.add_argument("--port", type=int, default=8000, help="default 8000; 0: any free port")
    parser.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, metavar="N",
                        help=f"images per beam-search batch (default {DEFAULTS.max_batch}; 1: one at a time)")
    parser.add_argument("--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms, metavar="T",
                        help=f"how long a batch waits for more images (default {DEFAULTS.max_wait_ms:g})")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULTS.max_upload_mb, metavar="M",
                        help=f"largest request body (default {DEFAULTS.max_upload_mb:g})")
    parser.add_argument("--max-images", type=int, default=DEFAULTS.max_images,
                        help=f"images in one request (default {DEFAULTS.max_images})")
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULTS.body_timeout_s, metavar="S",
                        help=f"a request body not received within S seconds is answered 408 (default {DEFAULTS.body_timeout_s:g})")
    parser.add_argument("--prefix-chunk", type=int, default=0, metavar="N",
                        help="images per backbone-prefix pass (default 0: the fastest per image here, measured at start-up)")
    add_device_option(parser)
    parser.add_argument("--backbone-weights", default=None,
                        help="the weights the checkpoint's feature cache was built with (default: those its config names)")
    args = parser.parse_args(argv)
    try:
        args.limits = ServiceLimits(**{name: getattr(args, name) for name in BOUNDS})
    except ValueError as err:
        parser.error(f"--{str(err).replace('_', '-')}")
    if not 0 <= args.prefix_chunk <= args.max_batch:
        parser.error(f"--prefix-chunk {args.prefix_chunk}: must be 0 (measure) to --max-batch ({args.max_batch})")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: not a port number (0-65535)")
    if not args.allow_remote and not _is_loopback(args.host):
        parser.error(f"--host {args.host} is not a loopback address: add --allow-remote to serve other machines")
    args.device = default_device(args.device)
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may name any address
        return False


class Server(uvicorn.Server):
    """uvicorn's server, stopping ``batcher`` first when its shutdown begins: otherwise uvicorn
    waits for the requests still queued (up to ``--max-wait-ms``) before the app may stop it."""

    def __init__(self, config: uvicorn.Config, batcher: MicroBatcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.batcher.stop()
        await super().shutdown(sockets)


class ServiceError(SCACaptionError):
    """The service cannot start where asked (the address is taken or not this machine's)."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, made before the model loads so that a port in
    use is one line at once (``ServiceError``), not an error after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # ::1, :: are IPv6
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise ServiceError(f"{host}:{port}: cannot listen there ({first_line(error)}); pick another --port or --host") from None


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with listening_socket(args.host, args.port) as sock:
        checkpoint, which = (args.checkpoint, "as given") if args.checkpoint is not None else default_checkpoint()
        print(f"sca_caption.serve: checkpoint {checkpoint} ({which}), device {args.device}", file=sys.stderr, flush=True)
        captioner = ImageCaptioner.from_checkpoint(checkpoint, device=args.device, backbone_weights=args.backbone_weights)
        captioner.prefix_chunk = args.prefix_chunk or fastest_prefix_chunk(captioner, args.max_batch)
        print(f"sca_caption.serve: backbone prefix in chunks of {captioner.prefix_chunk} "
              f"({'as given' if args.prefix_chunk else 'the fastest per image here'})", file=sys.stderr, flush=True)
        card = model_card(checkpoint)
        app = create_app(captioner, card=card, limits=args.limits)
        config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        print(f"sca_caption.serve: serving on http://{where}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            Server(config, app.state.batcher).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly on Ctrl-C/SIGTERM, then passes the signal on
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
