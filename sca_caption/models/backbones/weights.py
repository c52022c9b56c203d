"""Loading backbone weights: ``weights=None`` (random init), ``"imagenet"`` or a local state dict.

Weights go into the backbone's *source* module, the one whose ``state_dict`` keys are those of the
published files (torchvision's ``features.0.weight``, ``layer4.2.conv3.weight``, ...), before it
is re-cut into tapped stages; so torchvision's ``.pth`` files load as they are. Keys of the
classification head the backbone drops (``classifier.*``, ``fc.*``) may be present and are ignored.

Every failure is a one-line ``DataError`` naming the file (or URL) and the first problem found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from sca_caption.data.errors import DataError
from sca_caption.data.input_files import open_regular
from sca_caption.errors import first_line

WeightsSpec = str | os.PathLike[str] | None
IMAGENET = "imagenet"


@dataclass(frozen=True)
class WeightsLayout:
    """How a backbone's weights files look.

    ``key_prefix`` is prepended to the source module's keys to get the file's keys (``"features."``
    when the source module is VGG's feature stack); ``head_prefixes`` are file keys the backbone
    does not use; ``imagenet_url`` is None where no official ImageNet weights exist.
    """

    backbone: str
    imagenet_url: str | None
    key_prefix: str = ""
    head_prefixes: tuple[str, ...] = ()


def load_weights(module: nn.Module, weights: WeightsSpec, layout: WeightsLayout) -> None:
    """Fill ``module`` from ``weights``: None keeps its random init, ``"imagenet"`` downloads the
    official file through torch.hub (cached in ``$TORCH_HOME/hub/checkpoints``), anything else is
    the path of a state dict file."""
    if weights is None:
        return
    if isinstance(weights, str) and weights == IMAGENET:
        state, origin = _download_imagenet(layout), layout.imagenet_url or ""
    else:
        state, origin = read_state_dict(Path(weights)), str(weights)
    module.load_state_dict(match_state_dict(state, module, layout, origin))


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """The state dict stored in ``path`` (tensors only, loaded on the CPU)."""
    with open_regular(path, "weights file") as handle:  # a FIFO would block torch.load forever
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many types for a foreign or corrupt file
            raise DataError(f"{path}: not a readable PyTorch state dict ({first_line(err)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict of tensors, found a {type(state).__name__}")
    return state


def match_state_dict(
    state: Mapping[str, Tensor], module: nn.Module, layout: WeightsLayout, origin: str
) -> dict[str, Tensor]:
    """``state`` (file keys) -> ``module``'s keys, checked key by key in file order, then for
    missing keys in module order; the first mismatch raises ``DataError`` naming ``origin``.

    Only shapes are read, so ``state`` may hold meta tensors. Head keys, and a BatchNorm
    ``num_batches_tracked`` missing from files saved before PyTorch 0.4.1, keep ``module``'s values.
    """
    own = module.state_dict()
    fail = f"{origin}: not {layout.backbone} weights"
    matched: dict[str, Tensor] = {}
    for file_key, value in state.items():
        if file_key.startswith(layout.head_prefixes):
            continue
        key = file_key.removeprefix(layout.key_prefix) if file_key.startswith(layout.key_prefix) else None
        if key not in own:
            raise DataError(f"{fail} (unexpected key {file_key!r})")
        if value.shape != own[key].shape:
            raise DataError(
                f"{fail} (key {file_key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)})"
            )
        matched[key] = value
    for key, value in own.items():
        if key in matched:
            continue
        file_key = layout.key_prefix + key
        if not (file_key.startswith(layout.head_prefixes) or key.endswith("num_batches_tracked")):
            raise DataError(f"{fail} (missing key {file_key!r})")
        matched[key] = value
    return matched


def _download_imagenet(layout: WeightsLayout) -> Mapping[str, Tensor]:
    if layout.imagenet_url is None:
        raise DataError(
            f"{layout.backbone}: there are no official ImageNet weights; "
            "pass weights=None (random init) or the path of a state dict file"
        )
    url = layout.imagenet_url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError/timeouts are OSErrors; a bad hash is a RuntimeError
        raise DataError(
            f"{url}: could not download {layout.backbone} ImageNet weights ({first_line(err)}); "
            f"fetch that file elsewhere and pass weights='/path/to/{url.rsplit('/', 1)[-1]}' "
            f"or put it in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        ) from None
