"""Captioning image files with a trained checkpoint: the library behind ``python -m sca_caption.caption``.

One batch at a time: image files are decoded in DataLoader workers by ``load_image`` (the feature
cache's decoder), run through the ``BackbonePrefix`` of ``TappedBackbone.split`` (the feature
cache's module), rounded to float16 and back, and captioned by ``decoding.decode`` (beam search)
over the ``SCACaptioner``.

Cached and uncached images give the same captions: the cache stores the prefix outputs as float16,
which the trainer reads back as float32, so the prefix outputs here take the same round trip. The
model therefore sees exactly what it was trained on, and on the CPU an image's features equal its
cache row bit for bit (the prefix gives the same values whatever batch an image is in), and its
captions, scores and attention are identical when decoded in the same batches (for another batch
size the decoder's float32 matrix products may round differently in the last bits). On a GPU the
convolutions round differently from a CPU-built cache, so features can differ in the last float16 bit.

The backbone's weights are not in a checkpoint (only the stages above the lowest attended layer
are, as part of the model): the prefix is rebuilt by name with the weights its config names
(``data.backbone_weights``, the feature cache's ``--weights``: "imagenet", "none" = random init
seeded with 0, or a state dict path) and checked against the fingerprint the model keeps of the
prefix it was trained on.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sca_caption.checkpoint import CheckpointError, check_backbone_matches, load_captioner
from sca_caption.data.errors import DataError
from sca_caption.data.feature_extraction import ImageFiles, collate_decoded
from sca_caption.data.vocab import Vocab
from sca_caption.decoding import DecodeSettings, Hypothesis, changed, decode
from sca_caption.errors import first_line, main_process_takes_interrupts
from sca_caption.models.backbones import BackbonePrefix, TappedBackbone, build_cache_backbone
from sca_caption.models.backbones.base import freeze
from sca_caption.models.captioner import SCACaptioner
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import AttentionWeights

CHECKPOINTS = Path("checkpoints")
SHIPPED_CHECKPOINT = "flickr8k_cs_lite0.pt"
TRAIN_COMMAND = "python -m sca_caption.train"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GLOB_CHARACTERS = re.compile(r"[*?\[]")


class NoImagesError(DataError):
    """A PATH argument that names no image: a pattern matching nothing or a folder holding no image."""


def shipped_checkpoint() -> Path | None:
    """The shipped Flickr8k model installed with this package, wherever it is run from: the package
    data ``sca_caption/shipped/flickr8k_cs_lite0.pt`` of a built wheel (setup.py puts it there),
    else ``checkpoints/flickr8k_cs_lite0.pt`` beside the package (a checkout, an editable install);
    None if neither exists."""
    package = Path(__file__).resolve().parent
    for path in (package / "shipped" / SHIPPED_CHECKPOINT, package.parent / CHECKPOINTS / SHIPPED_CHECKPOINT):
        if path.is_file():
            return path
    return None


def default_checkpoint(folder: Path = CHECKPOINTS) -> tuple[Path, str]:
    """The checkpoint to caption with when none is named (the caption CLI and the service), and a
    few words saying which it is: the shipped Flickr8k model ``folder/flickr8k_cs_lite0.pt`` if
    present, else the newest ``folder/*/best.pt`` by modification time, else the shipped model
    installed with the package (``shipped_checkpoint``). None: a one-line ``CheckpointError``
    saying how to make one."""
    shipped = folder / SHIPPED_CHECKPOINT
    if shipped.is_file():
        return shipped, "the shipped Flickr8k model"
    trained = [p for p in folder.glob("*/best.pt") if p.is_file()]
    if trained:
        return max(trained, key=lambda p: (p.stat().st_mtime, str(p))), "the newest trained checkpoint"
    installed = shipped_checkpoint()
    if installed is not None:
        return installed, "the shipped Flickr8k model, installed with the package"
    raise CheckpointError(
        f"no checkpoint: neither {shipped} nor any {folder / '*' / 'best.pt'} exists; "
        f"train one with `{TRAIN_COMMAND}` or pass --checkpoint FILE"
    )


def collect_images(arguments: Sequence[str]) -> list[Path]:
    """The image files named by ``arguments``, in argument order, each file once (links to a file
    already listed, and repeated arguments, are dropped).

    - a folder: its files with an image extension (``IMAGE_EXTENSIONS``, any case), sorted by name,
      not recursive, hidden names (``.*``, e.g. macOS's ``._photo.jpg``) left out;
    - a glob pattern (``*``, ``?`` or ``[`` in a path that does not exist as written; ``**``
      recurses without following links to folders, so link loops end): its matches, sorted, hidden
      names left out as a shell does, a matched folder expanded as above;
    - anything else: an image file, taken as it is, existing or not (a missing, unreadable, special
      or non-image file is reported when it is decoded, and the other images are still captioned).

    A pattern that matches nothing or a folder that holds no image is a ``NoImagesError``.
    """
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)  # os.path's tests: a name too long for a file is not one, not an OSError
        if os.path.isdir(path):
            paths += _folder_images(path)
        elif GLOB_CHARACTERS.search(argument) and not os.path.exists(path):
            matches = _glob(argument)
            if not matches:
                raise NoImagesError(f"{argument}: the pattern matches no file")
            for match in matches:
                paths += _folder_images(match) if match.is_dir() else [match]
        else:
            paths.append(path)
    seen: set[str] = set()
    unique = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def _glob(pattern: str) -> list[Path]:
    """The sorted matches of a glob ``pattern``: ``pathlib`` globbing from the pattern's longest
    literal prefix (it never follows a link to a folder under ``**``, unlike ``glob.glob``, which
    a folder linking to itself twice keeps busy for ever)."""
    parts = Path(pattern).parts
    literal = next(i for i, part in enumerate(parts) if GLOB_CHARACTERS.search(part))
    base = Path(*parts[:literal]) if literal else Path(".")
    rest = "/".join(parts[literal:])
    hidden_asked = any(part.startswith(".") for part in parts[literal:])  # e.g. ".*.jpg"
    try:
        matches = [
            m for m in base.glob(rest) if hidden_asked or not any(p.startswith(".") for p in m.relative_to(base).parts)
        ]
    except OSError as err:
        raise NoImagesError(f"{pattern}: cannot search ({first_line(err)})") from None
    except ValueError as err:  # a pattern pathlib refuses, e.g. "**a"
        raise NoImagesError(f"{pattern}: not a usable pattern ({err})") from None
    return sorted(matches, key=str)


def _folder_images(folder: Path) -> list[Path]:
    try:
        images = sorted(
            p for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()
        )
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


def path_text(path: str | os.PathLike[str]) -> str:
    """``path`` as text any UTF-8 writer takes: the bytes of a name that are not UTF-8 (a file
    named in another system's encoding, which Python holds as lone surrogates) written as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Caption:
    """A decoded caption in words: ``hypothesis`` as beam search returned it (its attention on the
    CPU, per layer α (T, m_l) and β (T, C_l)); ``grids``: (h_l, w_l) of each attended layer."""

    words: list[str]
    hypothesis: Hypothesis
    grids: tuple[tuple[int, int], ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def spatial_map(self, t: int, layer: int) -> Tensor:
        """α of attended layer ``layer`` when ``words[t]`` was emitted, as its (h, w) grid."""
        attention = self.hypothesis.attention
        if attention is None or attention.spatial is None:
            raise ValueError("the caption carries no spatial attention (decode with attention=True and a spatial order)")
        return attention.spatial[layer][t].view(self.grids[layer])


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

    def __init__(
        self,
        model: SCACaptioner,
        prefix: BackbonePrefix,
        vocab: Vocab,
        *,
        max_length: int,
        decode: DecodeSettings = DecodeSettings(),
        device: str | torch.device = "cpu",
    ) -> None:
        """``max_length``: the decoding steps of settings that leave them unset (the checkpoint's
        caption length + 1); ``decode``: the checkpoint's decoding settings, the defaults of ``settings``."""
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.prefix = prefix.eval().to(self.device)
        self.vocab = vocab
        self.max_length = max_length
        self.decode = decode.with_max_length(max_length)
        self.layers = model.config.layers
        self.input_size = prefix.backbone.input_size
        self.grids = _layer_grids(prefix.backbone, self.layers, self.device)
        self.prefix_chunk: int | None = None  # images per prefix pass (None: the whole batch)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device = "cpu", backbone_weights: str | None = None
    ) -> ImageCaptioner:
        """The model of a training checkpoint (``checkpoint.load_captioner``) with its backbone
        prefix, built with ``backbone_weights`` (as the feature cache's ``--weights``; default the
        checkpoint's ``data.backbone_weights``) and checked against the model's fingerprint.
        Every problem is a one-line ``CheckpointError`` naming the file."""
        model, vocab, config = load_captioner(path)
        weights = config.data.backbone_weights if backbone_weights is None else backbone_weights
        try:
            backbone = freeze(build_cache_backbone(config.model.backbone, weights))
        except (ModelConfigError, ValueError) as err:  # unusable weights (DataError)
            raise CheckpointError(f"{path}: {err}") from None
        prefix, _ = backbone.split(config.model.layers)
        check_backbone_matches(path, model, prefix, weights)
        return cls(model, prefix, vocab, max_length=config.decoding_limit, decode=config.decode, device=device)

    def settings(self, **changes: Any) -> DecodeSettings:
        """The checkpoint's decoding settings with ``changes`` (``decoding.changed``: None values
        leave a setting as it is); a one-line ``DecodingError`` for settings that do not fit."""
        return changed(self.decode, changes)

    @property
    def has_spatial_attention(self) -> bool:
        return self.model.config.order in ("cs", "sc", "s")

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> the prefix outputs {tap: float32 (B, C, h, w)}, rounded
        through float16 like the feature cache's rows. The prefix runs ``prefix_chunk`` images at a
        time (on some CPUs a large batch is slower per image); an image's outputs do not depend on it."""
        with torch.inference_mode():
            chunks = [self.prefix(c.to(self.device)) for c in images.split(self.prefix_chunk or max(len(images), 1))]
            return {name: torch.cat([c[name] for c in chunks]).to(torch.float16).to(torch.float32) for name in chunks[0]}

    def caption_features(self, features: dict[str, Tensor], settings: DecodeSettings) -> list[list[Caption]]:
        """Prefix outputs {tap: (B, C, h, w)} (e.g. feature cache rows) -> per image its
        ``settings.n_best`` captions, best first (``settings.max_length`` None: ``self.max_length``)."""
        features = {name: x.to(self.device) for name, x in features.items()}
        hypotheses = decode(self.model, features, settings.with_max_length(self.max_length))
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
            worker_init_fn=main_process_takes_interrupts,
        )
        for batch in loader:
            results: dict[int, CaptionedImage | FailedImage] = {i: FailedImage(paths[i], p) for i, p in batch.failed}
            if batch.images is not None:
                captions = self.caption_features(self.features(batch.images), settings)
                for i, image, per_image in zip(batch.indices, batch.images, captions):
                    results[i] = CaptionedImage(paths[i], per_image, image if keep_images else None)
            yield from (results[i] for i in sorted(results))

    def _caption(self, hypothesis: Hypothesis) -> Caption:
        attention = hypothesis.attention
        if attention is not None:
            attention = AttentionWeights(*(None if maps is None else tuple(a.cpu() for a in maps) for maps in
                                    (attention.spatial, attention.channel)))
        words = [self.vocab.words[t] for t in hypothesis.tokens]  # one per attention row
        return Caption(words, replace(hypothesis, attention=attention), self.grids)


def _layer_grids(backbone: TappedBackbone, layers: Sequence[str], device: torch.device) -> tuple[tuple[int, int], ...]:
    """(h, w) of each attended layer at the backbone's input size."""
    size = backbone.input_size
    with torch.inference_mode():
        taps = backbone(torch.zeros(1, 3, size, size, device=device), until=layers[-1])
    return tuple((taps[name].shape[2], taps[name].shape[3]) for name in layers)


def attention_summary(caption: Caption, layers: Sequence[str], top_channels: int = 5) -> list[dict[str, Any]]:
    """Per word and attended layer: the spatial map's argmax cell [row, col] of its [h, w] grid,
    its weight and entropy (nats; log(h·w) is uniform), and the ``top_channels`` largest channel
    weights as [channel, weight]. Keys of an attention the model lacks are left out."""
    summary = []
    for t, word in enumerate(caption.words):
        per_layer = []
        for l, name in enumerate(layers):
            entry: dict[str, Any] = {"layer": name}
            attention = caption.hypothesis.attention
            if attention is not None and attention.spatial is not None:
                alpha = caption.spatial_map(t, l)
                flat = alpha.flatten().double()
                cell = int(flat.argmax())
                entry["grid"] = list(alpha.shape)
                entry["argmax"] = [cell // alpha.shape[1], cell % alpha.shape[1]]
                entry["weight"] = round(float(flat[cell]), 6)
                entry["entropy"] = round(float(-torch.special.xlogy(flat, flat).sum()), 6)
            if attention is not None and attention.channel is not None:
                beta = attention.channel[l][t]
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
    name = Path(path_text(result.path))
    entry: dict[str, Any] = {"image_id": image_id_for(name), "caption": best.text, "file": str(name)}
    entry.update(_scores(best.hypothesis))
    if n_best:
        entry["n_best"] = [{"caption": c.text, **_scores(c.hypothesis)} for c in result.captions]
    if attention:
        entry["attention"] = attention_summary(best, layers, top_channels)
    return entry


def _scores(hypothesis: Hypothesis) -> dict[str, Any]:
    return {"score": hypothesis.score, "log_prob": hypothesis.log_prob, "finished": hypothesis.finished}
