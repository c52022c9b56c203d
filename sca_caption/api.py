"""The Python API: ``from sca_caption import Captioner``.

    captioner = Captioner.load()                    # the shipped Flickr8k model, or Captioner.load(path)
    captioner("photo.jpg").caption                  # one image -> one CaptionResult
    captioner([path, pil_image, tensor], beam=5, n_best=3, attention=True)   # a list -> a list

A thin layer over ``captioning.ImageCaptioner``, the code of the caption CLI and the service: the
same checkpoint loading, image decoding (``data.images``), float16 round trip, batches of
``batch_size`` images and beam search, so the three give the same captions for the same image and
settings. Settings left out are the checkpoint's recorded ``decode`` settings, as in the CLI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from sca_caption.captioning import Caption, ImageCaptioner, attention_summary, shipped_checkpoint
from sca_caption.checkpoint import CheckpointError
from sca_caption.data.errors import DataError
from sca_caption.data.images import image_tensor, load_image
from sca_caption.devices import default_device
from sca_caption.errors import SCACaptionError

ImageInput = str | os.PathLike | Image.Image | Tensor


@dataclass(frozen=True)
class ScoredCaption:
    """One caption: ``score`` ranks it (the log-probability, divided by the length penalty if one
    is set), ``log_prob`` is its log-probability, ``finished`` is False if it was cut at max_length."""

    caption: str
    score: float
    log_prob: float
    finished: bool


@dataclass(frozen=True)
class LayerAttention:
    """Where the model looked in one attended ``layer`` as it emitted a word: ``spatial``, the
    weights α over the layer's (h, w) grid (None for a channel-only model), and ``top_channels``,
    the largest channel weights β as (channel, weight), largest first (None for a spatial-only
    model), rounded as the caption CLI's ``--json`` writes them."""

    layer: str
    spatial: Tensor | None
    top_channels: list[tuple[int, float]] | None


@dataclass(frozen=True)
class WordAttention:
    """One word of the best caption and its attention in each attended layer."""

    word: str
    layers: list[LayerAttention]


@dataclass(frozen=True)
class CaptionResult:
    """An image's captions: ``source`` (the file as given, or ``image N`` for an image in memory,
    N counted from 1), the best ``caption`` with its scores, ``n_best`` (every caption asked for,
    best first, the first being ``caption``) and, with ``attention=True``, each word's attention."""

    source: str
    caption: str
    score: float
    log_prob: float
    finished: bool
    n_best: list[ScoredCaption]
    attention: list[WordAttention] | None


class Captioner:
    """A trained captioner that captions image files, Pillow images and tensors."""

    def __init__(self, image_captioner: ImageCaptioner, checkpoint: Path) -> None:
        self.image_captioner = image_captioner
        self.checkpoint = checkpoint

    @classmethod
    def load(
        cls, checkpoint: str | os.PathLike | None = None, *, device: str | None = None, backbone_weights: str | None = None
    ) -> Captioner:
        """The model of ``checkpoint`` (default: the shipped Flickr8k model installed with the
        package) on ``device`` (default: cuda where available, else cpu); ``backbone_weights`` as
        the caption CLI's ``--backbone-weights``. A problem is a one-line ``CheckpointError``."""
        if checkpoint is None:
            checkpoint = shipped_checkpoint()
            if checkpoint is None:
                raise CheckpointError("the shipped model is not installed with this package: pass a checkpoint file")
        image_captioner = ImageCaptioner.from_checkpoint(
            checkpoint, device=default_device(device), backbone_weights=backbone_weights
        )
        return cls(image_captioner, Path(checkpoint))

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        beam: int | None = None,
        n_best: int | None = None,
        length_penalty: str | None = None,
        length_alpha: float | None = None,
        min_length: int | None = None,
        block_trigrams: bool | None = None,
        max_length: int | None = None,
        attention: bool = False,
        top_channels: int = 5,
        batch_size: int = 16,
    ) -> CaptionResult | list[CaptionResult]:
        """Caption one image (a file path, a Pillow image, or a tensor (3 or 1, H, W): uint8, or
        float in [0, 1]) -> a ``CaptionResult``; a list of them, or a (B, C, H, W) tensor -> a list.
        The settings are the caption CLI's options (None: the checkpoint's); ``attention`` keeps
        each word's attention with its ``top_channels`` largest channel weights. Every image is
        decoded before any is captioned, and one that cannot be is a one-line ``DataError``."""
        if batch_size < 1 or top_channels < 1:
            raise SCACaptionError(f"batch_size and top_channels must be positive; got {batch_size} and {top_channels}")
        captioner = self.image_captioner
        settings = captioner.settings(
            beam_size=beam, length_penalty=length_penalty, alpha=length_alpha, min_length=min_length,
            block_trigrams=block_trigrams, n_best=n_best, max_length=max_length, attention=attention,
        )
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, Tensor) and images.dim() == 4)
        inputs = [images] if single else list(images)
        sources = [str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}" for i, image in enumerate(inputs, 1)]
        tensors = [self._image_tensor(image, source) for image, source in zip(inputs, sources)]
        results = []
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start:start + batch_size])
            for source, captions in zip(sources[start:], captioner.caption_features(captioner.features(batch), settings)):
                results.append(self._result(source, captions, attention, top_channels))
        return results[0] if single else results

    def _image_tensor(self, image: ImageInput, source: str) -> Tensor:
        """``image`` as the model input (3, S, S) in [0, 1], decoded as the caption CLI decodes files."""
        size = self.image_captioner.input_size
        if isinstance(image, (str, os.PathLike)):
            return load_image(image, size)
        if isinstance(image, Image.Image):
            return image_tensor(image, size, source)
        if isinstance(image, Tensor):
            return image_tensor(_pil_image(image, source), size, source)
        raise DataError(f"{source}: a {type(image).__name__}, not an image file path, Pillow image or tensor")

    def _result(self, source: str, captions: list[Caption], attention: bool, top_channels: int) -> CaptionResult:
        scored = [ScoredCaption(c.text, c.hypothesis.score, c.hypothesis.log_prob, c.hypothesis.finished) for c in captions]
        words = None
        if attention:
            best = captions[0]
            summary = attention_summary(best, self.image_captioner.layers, top_channels)
            spatial = best.hypothesis.attention is not None and best.hypothesis.attention.spatial is not None
            words = [
                WordAttention(entry["word"], [
                    LayerAttention(
                        layer["layer"],
                        best.spatial_map(t, l) if spatial else None,
                        [(c, w) for c, w in layer["top_channels"]] if "top_channels" in layer else None,
                    )
                    for l, layer in enumerate(entry["layers"])
                ])
                for t, entry in enumerate(summary)
            ]
        best = scored[0]
        return CaptionResult(source, best.caption, best.score, best.log_prob, best.finished, scored, words)


def _pil_image(image: Tensor, source: str) -> Image.Image:
    """A (3 or 1, H, W) tensor, uint8 or float in [0, 1] (rounded to 8 bits, as a file holds it),
    as a Pillow image; ``DataError`` for another shape, type or range."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise DataError(f"{source}: a tensor of shape {tuple(image.shape)}; expected (3, H, W) or (1, H, W)")
    if image.is_floating_point():
        if not bool(((image >= 0) & (image <= 1)).all()):
            raise DataError(f"{source}: a float tensor with values outside [0, 1]")
        image = image.mul(255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise DataError(f"{source}: a {image.dtype} tensor; expected uint8, or float in [0, 1]")
    pixels = image.detach().cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
