"""sca-caption: image captioning with SCA-CNN (Chen et al., CVPR 2017).

``from sca_caption import Captioner`` is the Python API (``sca_caption.api``); it is imported on
first use, so importing the package (as every command does) loads no torch. Importing it before
torch sets torch's CPU threads to the free cores (``sca_caption.threads``)."""

from __future__ import annotations

from sca_caption.threads import share_the_cpu

__version__ = "0.1.0"

share_the_cpu()


def __getattr__(name: str) -> object:
    if name == "Captioner":
        from sca_caption.api import Captioner

        return Captioner
    raise AttributeError(f"module 'sca_caption' has no attribute {name!r}")
