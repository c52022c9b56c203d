"""Captioning a split with beam search (``decoding.decode``) and scoring it: shared by validation and the evaluate CLI.

The references of an image are all its captions in the dataset (as written, ``ImageRecord.raw``);
the candidates are the best beam per image, words joined by spaces. Scores are pycocoevalcap's
(``sca_caption.metrics``) on the 0-1 scale, plus ``dangling_end`` (the share of captions that end
in a word like "a" or "of", or are empty) and ``shapes_accuracy`` for the shapes dataset (the
share of images whose caption parses with the generator's grammar and matches the scene).
Images the feature cache lacks (skipped at extraction) are neither captioned nor scored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from sca_caption.checkpoint import load_captioner
from sca_caption.config import ExperimentConfig
from sca_caption.data.corpus import ImageRecord, records_in_split
from sca_caption.data.features import FeatureCache
from sca_caption.data.shapes import Scene, shapes_accuracy
from sca_caption.data.vocab import Vocab
from sca_caption.decoding import DecodeSettings, changed, decode
from sca_caption.metrics import score_captions
from sca_caption.models.captioner import SCACaptioner
from sca_caption.prepare import data_root as dataset_root
from sca_caption.prepare import corpus_and_features, split_scenes

DECODE_BATCH = 50


@dataclass
class SplitEvaluation:
    """Captions of one split (image id -> text, in corpus order) and their scores."""

    captions: dict[str, str]
    scores: dict[str, float]
    missing: list[str]


def references(records: Sequence[ImageRecord]) -> dict[str, list[str]]:
    """Image id -> every caption of that image, as written in the dataset."""
    return {r.image_id: list(r.raw) for r in records}


def caption_images(
    model: SCACaptioner,
    vocab: Vocab,
    cache: FeatureCache,
    image_ids: Sequence[str],
    *,
    settings: DecodeSettings,
    device: torch.device,
    bf16: bool = False,
    progress: bool = False,
) -> dict[str, str]:
    """The best beam's caption of each image (features from ``cache``), in ``image_ids`` order;
    ``settings`` with their ``max_length`` set."""
    model.eval()
    captions: dict[str, str] = {}
    batches = [image_ids[i : i + DECODE_BATCH] for i in range(0, len(image_ids), DECODE_BATCH)]
    for batch in tqdm(batches, desc="captioning", unit="batch", disable=not progress, leave=False):
        features = cache.read_batch([cache.index_of(i) for i in batch])
        features = {tap: x.to(device) for tap, x in features.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            beams = decode(model, features, settings)
        for image_id, hypotheses in zip(batch, beams):
            captions[image_id] = " ".join(vocab.decode(hypotheses[0].tokens))
    return captions


DANGLING_WORDS = frozenset(
    "a an the of in on at to with and or for from by into onto over under near his her their its is are".split()
)


def dangling_share(captions: Iterable[str]) -> float:
    """The share of captions that are empty or end in a word that cannot end an English caption
    (an article, a preposition, a conjunction, a possessive or a verb like "is": ``DANGLING_WORDS``)."""
    texts = list(captions)
    dangling = sum(1 for text in texts if not text.split() or text.split()[-1] in DANGLING_WORDS)
    return dangling / max(len(texts), 1)


def score_split(
    captions: dict[str, str],
    records: Sequence[ImageRecord],
    *,
    meteor: bool,
    scenes: dict[str, Scene] | None = None,
) -> dict[str, float]:
    """COCO metrics of ``captions`` against all references of ``records`` that were captioned,
    plus ``shapes_accuracy`` over the same images when ``scenes`` are given."""
    refs = {image_id: texts for image_id, texts in references(records).items() if image_id in captions}
    scores = dict(score_captions(captions, refs, meteor=meteor, spice=False))
    scores["dangling_end"] = dangling_share(captions.values())
    if scenes is not None:
        scores["shapes_accuracy"] = shapes_accuracy(captions, {i: scenes[i] for i in refs})
    return scores


def evaluate_split(
    model: SCACaptioner,
    vocab: Vocab,
    cache: FeatureCache,
    records: Sequence[ImageRecord],
    *,
    settings: DecodeSettings,
    device: torch.device,
    meteor: bool,
    scenes: dict[str, Scene] | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> SplitEvaluation:
    """Caption every cached image of ``records`` with beam search and score the captions."""
    cached = set(cache.image_ids)
    present = [r.image_id for r in records if r.image_id in cached]
    missing = [r.image_id for r in records if r.image_id not in cached]
    captions = caption_images(
        model, vocab, cache, present, settings=settings, device=device, bf16=bf16, progress=progress
    )
    return SplitEvaluation(captions, score_split(captions, records, meteor=meteor, scenes=scenes), missing)


def evaluate_checkpoint(
    path: Path,
    split: str,
    *,
    device: torch.device,
    decode_changes: dict[str, object] | None = None,
    data_root: Path | None = None,
    meteor: bool = True,
    progress: bool = False,
) -> tuple[SplitEvaluation, ExperimentConfig]:
    """Caption and score ``split`` with the model of checkpoint ``path``, decoding with its
    recorded settings changed by ``decode_changes`` (None values change nothing), on its dataset
    (or the one at ``data_root``); a missing feature cache is extracted first. Returns the
    scores and the checkpoint's config with the settings used."""
    model, vocab, config = load_captioner(path, device)
    config = replace(config, decode=changed(config.decode, decode_changes or {}))
    if data_root is not None:
        config = replace(config, data=replace(config.data, data_root=str(data_root)))
    records, cache = corpus_and_features(config, split, progress=progress)
    evaluation = evaluate_model(model, vocab, config, records, cache, split, device=device, meteor=meteor, progress=progress)
    return evaluation, config


def evaluate_model(
    model: SCACaptioner,
    vocab: Vocab,
    config: ExperimentConfig,
    records: Sequence[ImageRecord],
    cache: FeatureCache,
    split: str,
    *,
    device: torch.device,
    meteor: bool = True,
    bf16: bool = False,
    progress: bool = False,
) -> SplitEvaluation:
    """``evaluate_split`` of ``split`` of the corpus ``records`` with the decoding settings and
    caption length of ``config`` (the shapes dataset's scenes included): how the trainer's
    validation and test (``bf16`` as ``train.bf16``), ``evaluate`` and ``export`` (float32)
    score a model."""
    return evaluate_split(
        model, vocab, cache, records_in_split(records, split), settings=config.decoding(), device=device, meteor=meteor,
        scenes=split_scenes(config.data.dataset, dataset_root(config), split), bf16=bf16, progress=progress,
    )
