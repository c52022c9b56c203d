"""The ``--device`` option every command shares: checked while the arguments are parsed, so a
name torch does not know or a GPU this machine lacks is a one-line usage error before any work."""

from __future__ import annotations

import argparse

import torch

HELP = "cpu, cuda or cuda:N (default: cuda where available, else cpu)"


def device_name(name: str) -> str:
    """``name`` if it is a device torch knows and this machine has (an argparse ``type``)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device name ({HELP.split(' (')[0]})") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: only cpu and cuda devices are supported")
    if device.type == "cpu" and device.index not in (None, 0):
        raise argparse.ArgumentTypeError(f"{name!r}: there is one cpu device, cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``, checked by ``device_name``; None when not given (see ``default_device``)."""
    parser.add_argument("--device", type=device_name, default=None, help=HELP)


def default_device(name: str | None) -> str:
    """``name``, else cuda where available, else cpu."""
    return name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu")
