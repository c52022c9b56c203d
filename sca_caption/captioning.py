"""Captioning image files with a trained checkpoint: the library behind ``python -m sca_caption.caption``.

One batch at a time: image files are decoded in DataLoader workers by ``load_image`` (the feature
cache's decoder), run through the ``BackbonePrefix`` of ``TappedBackbone.split`` (the feature
cache's module), rounded to float16 and back, and captioned by ``beam_search`` over the
``SCACaptioner``.

Cached and uncached images give the same captions: the cache stores the prefix outputs as float16,
which the trainer reads back as float32, so the prefix outputs here take the same round trip. The
model therefore sees exactly what it was trained on, and on the CPU an image's features equal its
cache row bit for bit (the prefix gives the same values whatever batch an image is in), and its
captions, scores and attention are identical when decoded in the same batches (for another batch
size the decoder's float32 matrix products may round differently in the last bits). On a GPU the
convolutions round differently from a CPU-built cache, so features can differ in the last float16 bit.

The backbone's weights are not in a checkpoint (only the stages above the lowest attended layer
are, as part of the model): the backbone is rebuilt by name with the weights its config names
(``data.backbone_weights``, the feature cache's ``--weights``: "imagenet", "none" = random init
seeded with 0, or a state dict path), and the frozen stages it holds are checked against them.
"""

from __future__ import annotations

import glob
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sca_caption.checkpoint import CheckpointError, load_checkpoint
from sca_caption.data.errors import DataError
from sca_caption.data.feature_extraction import ImageFiles, collate_decoded
from sca_caption.data.vocab import Vocab
from sca_caption.decoding import Hypothesis, beam_search
from sca_caption.models.backbones import BackbonePrefix, TappedBackbone, build_cache_backbone
from sca_caption.models.backbones.base import freeze
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.errors import ModelConfigError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GLOB_CHARACTERS = re.compile(r"[*?\[]")
DEFAULT_CAPTION_WORDS = 20  # the data config's defaults, for checkpoints that lack them
DEFAULT_BACKBONE_WEIGHTS = "imagenet"


class NoImagesError(DataError):
    """A PATH argument that names no image: a pattern matching nothing or a folder holding no image."""


def collect_images(arguments: Sequence[str]) -> list[Path]:
    """The image files named by ``arguments``, in argument order.

    - a folder: its files with an image extension (``IMAGE_EXTENSIONS``, any case), sorted by name,
      not recursive;
    - a glob pattern (``*``, ``?`` or ``[`` in a path that does not exist as written; ``**``
      recurses): its matches, sorted, a matched folder expanded as above;
    - anything else: an image file, taken as it is, existing or not (a missing, unreadable or
      non-image file is reported when it is decoded, and the other images are still captioned).

    A pattern that matches nothing or a folder that holds no image is a ``NoImagesError``.
    """
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            paths += _folder_images(path)
        elif GLOB_CHARACTERS.search(argument) and not path.exists():
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise NoImagesError(f"{argument}: the pattern matches no file")
            for match in matches:
                paths += _folder_images(Path(match)) if Path(match).is_dir() else [Path(match)]
        else:
            paths.append(path)
    return paths


def _folder_images(folder: Path) -> list[Path]:
    try:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    except OSError as err:
        raise NoImagesError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    if not images:
        raise NoImagesError(f"{folder}: the folder holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def image_id_for(path: Path) -> int | str:
    """The COCO-results ``image_id`` of an image file: the number for COCO file names
    (``000000391895.jpg``, ``COCO_val2014_000000391895.jpg``), else the file name stem (Flickr ids)."""
    match = re.fullmatch(r"(?:COCO_[A-Za-z]+\d*_)?(\d+)", path.stem)
    return int(match.group(1)) if match else path.stem


@dataclass(frozen=True)
class DecodeSettings:
    """Beam search settings (see ``sca_caption.decoding``).

    ``max_length``: decoding steps, the end token included; None: the checkpoint's caption length
    plus one. ``attention``: keep every word's attention weights.
    """

    beam_size: int = 5
    n_best: int = 1
    max_length: int | None = None
    length_penalty: str = "none"
    alpha: float = 0.0
    attention: bool = False


@dataclass(frozen=True)
class Caption:
    """One decoded caption, its attention on the CPU when asked for.

    ``spatial[t][l]``: α of attended layer l, shape (h_l, w_l), when ``words[t]`` was emitted;
    ``channel[t][l]``: β of layer l, (C_l,). Either is None without that attention.
    """

    words: list[str]
    score: float
    log_prob: float
    finished: bool
    spatial: list[list[Tensor]] | None = None
    channel: list[list[Tensor]] | None = None

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class CaptionedImage:
    """An image's captions, best first; ``image`` (3, S, S) in [0, 1] as the model saw it, if kept."""

    path: Path
    captions: list[Caption]
    image: Tensor | None = None


@dataclass(frozen=True)
class FailedImage:
    """An image that could not be decoded; ``problem`` is one line that names the file."""

    path: Path
    problem: str


class ImageCaptioner:
    """A trained captioner with its backbone prefix: image files or features -> captions."""

    suppressed = (Vocab.pad, Vocab.start, Vocab.unk)  # never emitted

    def __init__(
        self,
        model: SCACaptioner,
        prefix: BackbonePrefix,
        vocab: Vocab,
        *,
        caption_words: int = DEFAULT_CAPTION_WORDS,
        device: str | torch.device = "cpu",
    ) -> None:
        """``caption_words``: the longest training caption in words (the default decoding length
        is one more step, for the end token)."""
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.prefix = prefix.eval().to(self.device)
        self.vocab = vocab
        self.caption_words = caption_words
        self.layers = model.config.layers
        self.input_size = prefix.backbone.input_size
        self.grids = _layer_grids(prefix.backbone, self.layers, self.device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device = "cpu", backbone_weights: str | None = None
    ) -> ImageCaptioner:
        """Rebuild the model of a training checkpoint. ``backbone_weights`` (as the feature cache's
        ``--weights``) overrides the checkpoint's ``data.backbone_weights`` (default "imagenet").
        Every problem is a one-line ``CheckpointError`` naming the file."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        data_config = checkpoint.config.get("data", {})
        if backbone_weights is None:
            backbone_weights = str(data_config.get("backbone_weights", DEFAULT_BACKBONE_WEIGHTS))
        try:
            config = ModelConfig.from_dict(checkpoint.config.get("model", {}))
            vocab = Vocab(checkpoint.vocab)
        except (ModelConfigError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from None
        if checkpoint.backbone != config.backbone or list(checkpoint.layers) != list(config.layers):
            raise CheckpointError(
                f"{path}: backbone/layers {checkpoint.backbone} {checkpoint.layers} disagree with its model config "
                f"{config.backbone} {list(config.layers)}"
            )
        try:
            backbone = freeze(build_cache_backbone(config.backbone, backbone_weights))
            model = SCACaptioner(config, len(vocab), backbone)
        except (ModelConfigError, ValueError) as err:  # an unknown backbone or layer, unusable weights (DataError)
            raise CheckpointError(f"{path}: {err}") from None
        _check_frozen_stages(path, model, checkpoint.model, backbone_weights)
        _load_model_state(path, model, checkpoint.model)
        prefix, _ = backbone.split(config.layers)
        words = data_config.get("max_length", DEFAULT_CAPTION_WORDS)
        return cls(model, prefix, vocab, caption_words=int(words), device=device)

    @property
    def has_spatial_attention(self) -> bool:
        return self.model.config.order in ("cs", "sc", "s")

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> the prefix outputs {tap: float32 (B, C, h, w)}, rounded
        through float16 like the feature cache's rows."""
        with torch.inference_mode():
            taps = self.prefix(images.to(self.device))
            return {name: x.to(torch.float16).to(torch.float32) for name, x in taps.items()}

    def caption_features(self, features: dict[str, Tensor], settings: DecodeSettings) -> list[list[Caption]]:
        """Prefix outputs {tap: (B, C, h, w)} (e.g. feature cache rows) -> per image its
        ``settings.n_best`` captions, best first."""
        features = {name: x.to(self.device) for name, x in features.items()}
        hypotheses = beam_search(
            self.model,
            features,
            start=self.vocab.start,
            end=self.vocab.end,
            beam_size=settings.beam_size,
            max_length=settings.max_length or self.caption_words + 1,
            length_penalty=settings.length_penalty,
            alpha=settings.alpha,
            n_best=settings.n_best,
            suppress=self.suppressed,
            return_attention=settings.attention,
        )
        return [[self._caption(h) for h in per_image] for per_image in hypotheses]

    def caption_files(
        self,
        paths: Sequence[Path],
        settings: DecodeSettings,
        *,
        batch_size: int = 16,
        workers: int = 2,
        keep_images: bool = False,
    ) -> Iterator[CaptionedImage | FailedImage]:
        """Caption ``paths`` in batches, yielding one result per path in order. Decoding runs in
        ``workers`` processes (0: in this one); ``keep_images`` keeps each model input image."""
        loader = DataLoader(
            ImageFiles(paths, self.input_size),
            batch_size=batch_size,
            num_workers=min(workers, math.ceil(len(paths) / batch_size)),
            collate_fn=collate_decoded,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            results: dict[int, CaptionedImage | FailedImage] = {i: FailedImage(paths[i], p) for i, p in batch.failed}
            if batch.images is not None:
                captions = self.caption_features(self.features(batch.images), settings)
                for i, image, per_image in zip(batch.indices, batch.images, captions):
                    results[i] = CaptionedImage(paths[i], per_image, image if keep_images else None)
            yield from (results[i] for i in sorted(results))

    def _caption(self, hypothesis: Hypothesis) -> Caption:
        spatial = None
        if hypothesis.spatial is not None:
            spatial = [[a.cpu().view(self.grids[l]) for l, a in enumerate(step)] for step in hypothesis.spatial]
        channel = None
        if hypothesis.channel is not None:
            channel = [[b.cpu() for b in step] for step in hypothesis.channel]
        return Caption(
            words=[self.vocab.words[t] for t in hypothesis.tokens],
            score=hypothesis.score,
            log_prob=hypothesis.log_prob,
            finished=hypothesis.finished,
            spatial=spatial,
            channel=channel,
        )


def _layer_grids(backbone: TappedBackbone, layers: Sequence[str], device: torch.device) -> list[tuple[int, int]]:
    """(h, w) of each attended layer at the backbone's input size."""
    size = backbone.input_size
    with torch.inference_mode():
        taps = backbone(torch.zeros(1, 3, size, size, device=device), until=layers[-1])
    return [tuple(taps[name].shape[2:]) for name in layers]  # type: ignore[misc]


def _check_frozen_stages(path: str | Path, model: SCACaptioner, state: dict[str, Tensor], weights: str) -> None:
    """The frozen backbone stages in the checkpoint must equal the rebuilt backbone's: otherwise its
    features came from other backbone weights and the prefix here would not match them."""
    if model.config.finetune_upper:
        return
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("encoder.upper.") and key in own and not torch.equal(own[key], value):
            raise CheckpointError(
                f"{path}: its frozen backbone stages ({key}) differ from {model.config.backbone} with weights "
                f"{weights!r}; pass the weights its feature cache was built with"
            )


def _load_model_state(path: str | Path, model: SCACaptioner, state: dict[str, Tensor]) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{path}: model weights do not fit its config ({first})") from None
    if missing or unexpected:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{path}: model weights do not fit its config ({'; '.join(parts)})")


def attention_summary(caption: Caption, layers: Sequence[str], top_channels: int = 5) -> list[dict[str, Any]]:
    """Per word and attended layer: the spatial map's argmax cell [row, col] of its [h, w] grid,
    its weight and entropy (nats; log(h·w) is uniform), and the ``top_channels`` largest channel
    weights as [channel, weight]. Keys of an attention the model lacks are left out."""
    summary = []
    for t, word in enumerate(caption.words):
        per_layer = []
        for l, name in enumerate(layers):
            entry: dict[str, Any] = {"layer": name}
            if caption.spatial is not None:
                alpha = caption.spatial[t][l]
                flat = alpha.flatten().double()
                cell = int(flat.argmax())
                entry["grid"] = list(alpha.shape)
                entry["argmax"] = [cell // alpha.shape[1], cell % alpha.shape[1]]
                entry["weight"] = round(float(flat[cell]), 6)
                entry["entropy"] = round(float(-torch.special.xlogy(flat, flat).sum()), 6)
            if caption.channel is not None:
                beta = caption.channel[t][l]
                weights, channels = beta.topk(min(top_channels, beta.numel()))
                entry["top_channels"] = [[int(c), round(float(w), 6)] for c, w in zip(channels, weights)]
            per_layer.append(entry)
        summary.append({"word": word, "layers": per_layer})
    return summary


def result_entry(
    result: CaptionedImage, layers: Sequence[str], *, n_best: bool, attention: bool, top_channels: int = 5
) -> dict[str, Any]:
    """A COCO-results entry ``{"image_id", "caption"}`` for the best caption, plus ``file``,
    ``score``, ``log_prob``, ``finished``, the ``n_best`` list when asked for, and per-word
    ``attention`` (see ``attention_summary``) when the captions carry it."""
    best = result.captions[0]
    entry: dict[str, Any] = {
        "image_id": image_id_for(result.path),
        "caption": best.text,
        "file": str(result.path),
        "score": best.score,
        "log_prob": best.log_prob,
        "finished": best.finished,
    }
    if n_best:
        entry["n_best"] = [
            {"caption": c.text, "score": c.score, "log_prob": c.log_prob, "finished": c.finished} for c in result.captions
        ]
    if attention:
        entry["attention"] = attention_summary(best, layers, top_channels)
    return entry
