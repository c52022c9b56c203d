"""sca-caption: image captioning with SCA-CNN (Chen et al., CVPR 2017).

``from sca_caption import Captioner`` is the Python API (``sca_caption.api``); it is imported on
first use, so importing the package (as every command does) loads no torch."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "Captioner":
        from sca_caption.api import Captioner

        return Captioner
    raise AttributeError(f"module 'sca_caption' has no attribute {name!r}")
