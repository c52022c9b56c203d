"""A CNN seen as a chain of stages between named feature taps, split for multi-layer SCA.

A ``TappedBackbone`` is an ordered list of stages. Stage i maps the output of tap i-1 (the image
for the first stage) to tap i; a stage may also read earlier taps by name (``side_inputs``, e.g.
a ResNet bottleneck's shortcut). SCA-CNN attends several taps and feeds each attended map through
the following stages to get the next attended layer, at every decoding step. So the backbone
splits into:

- a frozen *prefix*: image -> the lowest attended tap plus every earlier tap a later stage still
  reads. That is what the HDF5 feature cache stores, and what the caption CLI runs on new images.
- *upper* chains: attended tap l -> tap l+1, run inside the decoding step. A side input is taken
  from the taps computed so far in that step, attended values included, else from the prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation applied to RGB images scaled to [0, 1]: (x - mean) / std."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, H, W)."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std


IMAGENET = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TensorFlow-trained EfficientNet-Lite wants (x*255 - 127) / 128, i.e. mean 127/255, std 128/255.
TF_LITE = Normalization("tf", (127 / 255,) * 3, (128 / 255,) * 3)


class Stage(nn.Module):
    """Maps the previous tap (B, C_in, H, W) to the next one (B, C_out, H', W').

    ``side_inputs`` names earlier taps this stage also reads; they arrive in ``taps``.
    """

    side_inputs: tuple[str, ...] = ()

    def forward(self, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class Plain(Stage):
    """A stage that is just a module of its input."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:
        return self.body(x)


@dataclass(frozen=True)
class TapInfo:
    """A named feature tap: channels and spatial stride relative to the input image."""

    name: str
    channels: int
    stride: int


class TappedBackbone(nn.Module):
    """An image CNN as ``stages``, one per named tap, in forward order."""

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[TapInfo, Stage]],
        normalization: Normalization,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        self.name = name
        self.tap_info = {info.name: info for info, _ in stages}
        self.taps = tuple(info.name for info, _ in stages)
        self.stages = nn.ModuleDict({info.name: stage for info, stage in stages})
        self.normalization = normalization
        self.input_size = input_size

    def forward(self, images: Tensor, until: str | None = None) -> dict[str, Tensor]:
        """Normalised images (B, 3, H, W) -> every tap up to ``until`` (default: all), by name."""
        last = self.taps.index(until) if until is not None else len(self.taps) - 1
        out: dict[str, Tensor] = {}
        x = images
        for name in self.taps[: last + 1]:
            x = self.stages[name](x, out)
            out[name] = x
        return out

    def cached_taps(self, layers: Sequence[str]) -> tuple[str, ...]:
        """What the prefix must output for attending ``layers``: the lowest one plus every earlier
        tap that a stage above it reads."""
        self._check_layers(layers)
        low = self.taps.index(layers[0])
        top = self.taps.index(layers[-1])
        needed = [layers[0]]
        for name in self.taps[low + 1 : top + 1]:
            for side in self.stages[name].side_inputs:
                if self.taps.index(side) < low and side not in needed:
                    needed.append(side)
        return tuple(needed)

    def split(self, layers: Sequence[str]) -> tuple["BackbonePrefix", "UpperChain"]:
        """The frozen prefix for ``layers`` and the chain mapping each attended layer to the next."""
        self._check_layers(layers)
        return BackbonePrefix(self, self.cached_taps(layers)), UpperChain(self, layers)

    def _check_layers(self, layers: Sequence[str]) -> None:
        unknown = [l for l in layers if l not in self.tap_info]
        if not layers or unknown:
            raise ValueError(f"{self.name} has taps {', '.join(self.taps)}; got {list(layers)}")
        order = [self.taps.index(l) for l in layers]
        if order != sorted(set(order)):
            raise ValueError(f"layers must be distinct taps of {self.name} in forward order: {list(layers)}")


class BackbonePrefix(nn.Module):
    """Image -> the taps the feature cache stores for a set of attended layers.

    Takes images in [0, 1] (B, 3, H, W) and applies the backbone's normalisation itself, so the
    cache and the caption CLI share one code path.
    """

    def __init__(self, backbone: TappedBackbone, outputs: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.outputs = tuple(outputs)
        self._until = max(outputs, key=backbone.taps.index)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) in [0, 1] -> {tap name: (B, C, h, w)} for each name in ``outputs``."""
        taps = self.backbone(self.backbone.normalization(images), until=self._until)
        return {name: taps[name] for name in self.outputs}

    def fingerprint(self) -> bytes:
        """The sha256 digest (32 bytes) of everything the prefix computes with: the weights and
        buffers of the stages it runs (in the order the stages hold them, by shape and value, not
        by module name, so another implementation of the same network has the same fingerprint),
        its normalisation, input size and outputs. It names the weights, not the code: that another
        implementation computes the same features is what ``export`` checks on the feature cache."""
        digest = hashlib.sha256()
        norm = self.backbone.normalization
        digest.update(repr((self.backbone.name, norm.mean, norm.std, self.backbone.input_size, self.outputs)).encode())
        for name in self.backbone.taps[: self.backbone.taps.index(self._until) + 1]:
            digest.update(name.encode())
            for value in self.backbone.stages[name].state_dict().values():
                digest.update(repr(tuple(value.shape)).encode())
                digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.digest()


class UpperChain(nn.Module):
    """The backbone stages between consecutive attended layers, run inside each decoding step."""

    def __init__(self, backbone: TappedBackbone, layers: Sequence[str]) -> None:
        super().__init__()
        self.layers = tuple(layers)
        low = backbone.taps.index(layers[0])
        top = backbone.taps.index(layers[-1])
        self._backbone_name = backbone.name
        self._taps = backbone.taps[low : top + 1]
        self.stages = nn.ModuleDict({n: backbone.stages[n] for n in self._taps[1:]})

    def forward(self, i: int, x: Tensor, taps: Mapping[str, Tensor]) -> Tensor:
        """Attended layer ``layers[i]`` (B, C, H, W) -> layer ``layers[i + 1]``.

        ``taps`` holds the cached prefix outputs and the layers attended so far in this step.
        """
        start, end = self.layers[i], self.layers[i + 1]
        seen = dict(taps)
        seen[start] = x
        for name in self._taps[self._taps.index(start) + 1 : self._taps.index(end) + 1]:
            x = self.stages[name](x, seen)
            seen[name] = x
        return x


BackboneBuilder = Callable[..., TappedBackbone]
_REGISTRY: dict[str, BackboneBuilder] = {}
_FAMILIES: dict[str, BackboneBuilder] = {}
_FAMILY_MODELS: dict[str, Callable[[str], None]] = {}  # family -> its check of a model name


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``builder(weights=...)`` available as ``build_backbone(name, ...)``."""

    def add(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = builder
        return builder

    return add


def register_backbone_family(family: str, check_model: Callable[[str], None]) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: make ``builder(model, weights=...)`` available as
    ``build_backbone(f"{family}:{model}", ...)``, for a library's whole model zoo;
    ``check_model(model)`` raises a one-line ValueError for a name the library lacks, without
    building anything."""

    def add(builder: BackboneBuilder) -> BackboneBuilder:
        if family in _FAMILIES:
            raise ValueError(f"backbone family {family!r} registered twice")
        _FAMILIES[family] = builder
        _FAMILY_MODELS[family] = check_model
        return builder

    return add


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def list_backbone_families() -> list[str]:
    """Registered families, sorted; ``build_backbone`` takes ``<family>:<model>`` for each."""
    return sorted(_FAMILIES)


def check_backbone_name(name: str) -> str:
    """``name`` if it is a registered backbone or ``<family>:<model>`` of a registered family
    that has ``model``, else a one-line ValueError: the choices, or the family's word on the
    model. Nothing is built."""
    family, sep, model = name.partition(":")
    if name in _REGISTRY:
        return name
    if sep and model and family in _FAMILIES:
        _FAMILY_MODELS[family](model)
        return name
    families = "".join(f", {f}:<model>" for f in list_backbone_families())
    raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}{families}")


def build_backbone(name: str, **kwargs: object) -> TappedBackbone:
    """Build a registered backbone, or ``<family>:<model>``, by name; kwargs go to its builder
    (e.g. ``weights=None``)."""
    check_backbone_name(name)
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    family, _, model = name.partition(":")
    return _FAMILIES[family](model, **kwargs)


def build_cache_backbone(name: str, weights: str) -> TappedBackbone:
    """The backbone as a feature cache and a checkpoint name it: ``weights`` "imagenet", a state
    dict path, or "none" for a random init seeded with 0 (so every stage that rebuilds it, the
    extractor, the trainer and the caption tool, gets the same weights). The global RNG is left
    untouched."""
    if weights != "none":
        return build_backbone(name, weights=weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_backbone(name, weights=None)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with gradients off; returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = [
    "IMAGENET",
    "TF_LITE",
    "BackbonePrefix",
    "Normalization",
    "Plain",
    "Stage",
    "TapInfo",
    "TappedBackbone",
    "UpperChain",
    "build_backbone",
    "build_cache_backbone",
    "check_backbone_name",
    "freeze",
    "list_backbone_families",
    "list_backbones",
    "register_backbone",
    "register_backbone_family",
]
