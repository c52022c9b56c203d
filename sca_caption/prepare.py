"""Make sure a run's inputs exist: the caption corpus, its vocabulary and the feature cache.

``prepare(config)`` does only what is missing, printing a line for each thing it makes:

- the corpus: ``load_corpus`` (for ``shapes`` this generates the dataset the first time);
- the vocabulary of the train split, ``<dataset>_vocab_min<k>_<key>.json`` beside the feature
  cache, ``key`` a hash of the corpus (ids, files, splits, captions): another corpus gets another file;
- the HDF5 feature cache (``feature_cache_path``) for the model's backbone, attended layers and
  ``data.backbone_weights``, extracted with a progress bar when absent or unfinished (it resumes).
  By default its file name carries a hash of what it is made from (``CacheSpec.file_name``), so
  other images, layers or weights get another file; a file at ``data.feature_cache`` that was made
  from something else is refused, never replaced.

Derived files are never replaced in place: a run reading one never sees it change.

The same can be done step by step with ``preprocess/build_vocab.py`` and
``preprocess/extract_features.py``. Under torchrun every process calls ``prepare`` with its
``Processes``: rank 0 loads the corpus and writes the vocabulary before the others read them, and
all of them extract the feature cache together, each a share of the images (rank 0 prints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sca_caption.config import ExperimentConfig
from sca_caption.data.caption_dataset import CaptionSamples, ImageSamples
from sca_caption.data.corpus import ImageRecord, corpus_hash, images_hash, records_in_split
from sca_caption.data.datasets import default_data_root, load_corpus
from sca_caption.data.errors import DataError
from sca_caption.data.feature_extraction import extract_features
from sca_caption.data.features import CacheSpec, FeatureCache, is_complete
from sca_caption.data.shapes import DATASET_FILE, Scene, load_scenes
from sca_caption.data.vocab import Vocab, build_vocab
from sca_caption.distributed import ONE_PROCESS, Processes
from sca_caption.io_utils import check_path_name
from sca_caption.models.tag_head import tag_targets, tag_vocabulary


@dataclass
class PreparedData:
    """What a run reads: the corpus ``records``, ``vocab`` and the feature cache's path and spec."""

    records: list[ImageRecord]
    vocab: Vocab
    vocab_path: Path
    cache_path: Path
    cache_spec: CacheSpec

    def open_cache(self) -> FeatureCache:
        """The feature cache, checked against ``cache_spec``."""
        return FeatureCache(self.cache_path, expect=self.cache_spec)

    def split(self, name: str) -> list[ImageRecord]:
        """The records of split ``name``."""
        return records_in_split(self.records, name)

    def tags(self, split: str, count: int) -> list[str]:
        """The ``count`` most frequent content words of ``split``'s captions (a tag head's classes)."""
        return tag_vocabulary(self.split(split), count)

    def caption_samples(
        self, split: str, cache: FeatureCache, max_length: int, tags: Sequence[str] = ()
    ) -> CaptionSamples:
        """Every cached (image, caption) pair of ``split``, with per-image targets of ``tags``."""
        records = self.split(split)
        return CaptionSamples(records, self.vocab, cache, max_length, tag_targets(records, tags) if tags else None)

    def image_samples(self, split: str, cache: FeatureCache, max_length: int) -> ImageSamples:
        """Every cached image of ``split`` with its reference captions (self-critical training
        samples images, not captions)."""
        return ImageSamples(self.split(split), self.vocab, cache, max_length)


def data_root(config: ExperimentConfig) -> Path:
    """``data.data_root``, else ``data/<dataset>``."""
    return Path(config.data.data_root) if config.data.data_root is not None else default_data_root(config.data.dataset)


def split_scenes(dataset: str, root: Path, split: str) -> dict[str, Scene] | None:
    """The ground-truth scenes of a shapes split at ``root``; None for other datasets."""
    return load_scenes(root / DATASET_FILE, split) if dataset == "shapes" else None


FEATURES_FOLDER = Path("data") / "features"  # under the working folder: the data root may be read-only


def feature_cache_path(config: ExperimentConfig, spec: CacheSpec) -> Path:
    """``data.feature_cache``, else ``FEATURES_FOLDER/<CacheSpec.file_name>``."""
    named = _named_cache(config)
    return named if named is not None else FEATURES_FOLDER / spec.file_name()


def vocab_path(config: ExperimentConfig, records: Sequence[ImageRecord]) -> Path:
    """``<dataset>_vocab_min<k>_<corpus hash>.json`` in the default feature cache folder, or beside
    ``data.feature_cache``."""
    named = _named_cache(config)
    folder = named.parent if named is not None else FEATURES_FOLDER
    return folder / f"{config.data.dataset}_vocab_min{config.data.min_count}_{corpus_hash(records)[:8]}.json"


def cache_spec(config: ExperimentConfig, records: list[ImageRecord]) -> CacheSpec:
    """The feature cache ``config`` needs for the corpus ``records``."""
    return CacheSpec(
        dataset=config.data.dataset,
        data_root=str(data_root(config)),
        backbone=config.model.backbone,
        layers=tuple(config.model.layers),
        images_hash=images_hash(records),
        weights=config.data.backbone_weights,
    )


def prepare(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    processes: Processes = ONE_PROCESS,
) -> PreparedData:
    """Load (or generate) the corpus, write the vocabulary if it changed, extract missing features."""
    if not processes.is_main:
        log, progress = _silent, False

    def corpus() -> tuple[list[ImageRecord], Vocab, Path]:
        records = load_records(config, log)
        check_splits(config, records)
        return (records, *ensure_vocab(config, records, log))

    records, vocab, words_path = processes.main_first(corpus)
    cache, spec = ensure_features(config, records, progress=progress, log=log, processes=processes)
    return PreparedData(records, vocab, words_path, cache, spec)


def check_splits(config: ExperimentConfig, records: Sequence[ImageRecord]) -> None:
    """Refuse (``DataError``) a run whose train, validation or test split has no images."""
    for role in ("train_split", "val_split", "test_split"):
        require_split(config, records, getattr(config.data, role), f"data.{role}")


def require_split(config: ExperimentConfig, records: Sequence[ImageRecord], split: str, source: str) -> None:
    """Refuse (``DataError``, naming the data root and ``source``, the setting that asked for it)
    a ``split`` without images in the corpus ``records``."""
    if not any(r.split == split for r in records):
        raise DataError(f"{data_root(config)}: the {config.data.dataset} split {split!r} ({source}) has no images")


def load_records(config: ExperimentConfig, log: Callable[[str], None] = print) -> list[ImageRecord]:
    """The corpus of ``config`` (the shapes dataset is generated the first time)."""
    return load_corpus(config.data.dataset, data_root(config), log=log)


def ensure_vocab(
    config: ExperimentConfig, records: list[ImageRecord], log: Callable[[str], None] = print
) -> tuple[Vocab, Path]:
    """The train split's vocabulary, and its file (written when absent; a file there with other
    words is refused, never replaced)."""
    vocab = build_vocab(records, config.data.min_count, "data.min_count")
    path = vocab_path(config, records)
    if not path.exists():
        vocab.save(path)
        log(f"{path}: vocabulary of {len(vocab)} entries")
    elif not _holds_vocab(path, vocab):
        raise DataError(f"{path}: holds another vocabulary than this corpus gives; not overwritten: remove it")
    return vocab, path


def ensure_features(
    config: ExperimentConfig,
    records: list[ImageRecord],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    processes: Processes = ONE_PROCESS,
) -> tuple[Path, CacheSpec]:
    """The feature cache's path and spec, after extracting it if it is not complete for them
    (with ``processes``, by all of them together)."""
    spec = cache_spec(config, records)
    path = feature_cache_path(config, spec)
    if not processes.main_says(is_complete(path, spec)):
        log(f"extracting {spec.backbone} features of {len(records)} images, as `{spec.command(path)}` does")
        extract_features(
            records, spec, path, workers=config.data.num_workers, progress=progress, processes=processes
        )
    return path, spec


def corpus_and_features(
    config: ExperimentConfig, split: str, *, progress: bool = True
) -> tuple[list[ImageRecord], FeatureCache]:
    """The corpus of ``config``'s dataset and its feature cache (extracted first where missing):
    what scoring ``split`` of it with a trained model reads. A split without images is refused
    before any extraction."""
    records = load_records(config)
    require_split(config, records, split, "--split")
    path, spec = ensure_features(config, records, progress=progress)
    return records, FeatureCache(path, expect=spec)


def _named_cache(config: ExperimentConfig) -> Path | None:
    """``data.feature_cache``, refused (``OutputError``) where no file can be named so; None when unset."""
    if config.data.feature_cache is None:
        return None
    return check_path_name(config.data.feature_cache, "feature cache (data.feature_cache)")


def _silent(_: str) -> None:
    """A log that says nothing (the processes other than rank 0)."""


def _holds_vocab(path: Path, vocab: Vocab) -> bool:
    """Whether ``path`` is a vocabulary file with exactly ``vocab``'s words."""
    try:
        return Vocab.load(path).words == vocab.words
    except DataError:  # unreadable or not a vocabulary
        return False
