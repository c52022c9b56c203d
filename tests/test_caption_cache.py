"""Cached and uncached images give the same captions: the caption path runs the feature cache's
backbone prefix and rounds its outputs through float16 as the cache does, so on the CPU an image
file's features equal its cache row bit for bit, and the captions and scores are identical."""

from __future__ import annotations

import pytest
import torch

from caption_support import LAYERS, save_tiny_checkpoint, shape_image
from sca_caption.captioning import CaptionedImage, DecodeSettings, ImageCaptioner
from sca_caption.data.corpus import ImageRecord, images_hash
from sca_caption.data.feature_extraction import extract_features
from sca_caption.data.features import CacheSpec, FeatureCache
from sca_caption.data.images import load_image

SETTINGS = DecodeSettings(beam_size=3, n_best=3, attention=True)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Five shape images and their feature cache, built by the feature-cache code (batches of 2)."""
    folder = tmp_path_factory.mktemp("images")
    colours = [(220, 30, 30), (40, 80, 230), (30, 170, 50), (240, 220, 30), (150, 50, 200)]
    paths = [shape_image(folder / f"img{i}.png", c, (8 * i, 10, 8 * i + 40, 60)) for i, c in enumerate(colours)]
    records = [ImageRecord(p.stem, p, "test", ("x",), (("x",),)) for p in paths]
    spec = CacheSpec(
        dataset="shapes", data_root=str(folder), backbone="efficientnet_lite0", layers=LAYERS,
        images_hash=images_hash(records), weights="imagenet",
    )
    out = folder / "features.h5"
    extract_features(records, spec, out, batch_size=2, workers=0, progress=False)
    return paths, FeatureCache(out, expect=spec)


def test_file_features_equal_cache_rows_bit_for_bit(captioner, cached):
    paths, cache = cached
    images = torch.stack([load_image(p, captioner.input_size) for p in paths])
    rows = cache.read_batch(range(len(paths)))
    features = captioner.features(images)
    assert set(features) == set(rows) == set(captioner.model.feature_names)
    for tap in rows:
        assert features[tap].dtype == rows[tap].dtype == torch.float32
        assert torch.equal(features[tap], rows[tap]), tap
    with torch.inference_mode():  # the float16 round trip is what makes them equal
        raw = captioner.prefix(images)
    assert not all(torch.equal(raw[tap], rows[tap]) for tap in rows)


def test_captions_from_files_equal_captions_from_the_cache(captioner, cached):
    paths, cache = cached
    from_cache = [  # decoded in the same batches as the files: the decoder's matmuls round per batch shape
        captions for rows in ([0, 1, 2], [3, 4]) for captions in captioner.caption_features(cache.read_batch(rows), SETTINGS)
    ]
    from_files = list(captioner.caption_files(paths, SETTINGS, batch_size=3, workers=0))
    assert all(isinstance(r, CaptionedImage) for r in from_files)
    for cached_captions, result in zip(from_cache, from_files):
        def fields(c):
            return c.words, c.hypothesis.score, c.hypothesis.log_prob, c.hypothesis.finished

        assert [fields(c) for c in result.captions] == [fields(c) for c in cached_captions]
        for ours, theirs in zip(result.captions, cached_captions):
            spatial_ours, spatial_theirs = ours.hypothesis.attention.spatial, theirs.hypothesis.attention.spatial
            assert len(spatial_ours) == len(spatial_theirs) == 2
            assert all(torch.equal(a, b) for a, b in zip(spatial_ours, spatial_theirs))
