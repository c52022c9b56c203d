"""Never destroy what the command did not make (issue #16, RELIABILITY.md): derived files are
keyed by what they are made from, and a file at a named path made from something else is refused,
never replaced."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from train_support import TinyShapes, tiny_shapes  # noqa: F401

from sca_caption.config import load_config
from sca_caption.data.errors import DataError
from sca_caption.prepare import cache_spec, ensure_features, feature_cache_path, load_records, prepare, vocab_path


def _config(data: TinyShapes, **extra: object):
    return load_config("shapes", overrides=data.overrides(**extra))


def test_the_default_cache_file_is_keyed_by_images_layers_and_weights_not_captions(tiny_shapes):
    config = _config(tiny_shapes, data__feature_cache=None)
    records = load_records(config)
    spec = cache_spec(config, records)
    path = feature_cache_path(config, spec)
    assert re.fullmatch(r"data/features/shapes_efficientnet_lite0_stage7_[0-9a-f]{8}\.h5", path.as_posix())
    others = [
        cache_spec(replace(config, data=replace(config.data, backbone_weights="none")), records),
        cache_spec(replace(config, model=replace(config.model, layers=("stage6", "stage7"))), records),
        cache_spec(config, records[:-1]),  # a subset
    ]
    assert len({path, *(feature_cache_path(config, s) for s in others)}) == 4
    recaptioned = [replace(r, raw=("a new caption",) * len(r.raw), tokens=(("a", "new"),) * len(r.tokens)) for r in records]
    assert cache_spec(config, recaptioned) == spec  # captions are not what features are made from
    assert vocab_path(config, recaptioned) != vocab_path(config, records)
    named = _config(tiny_shapes, data__feature_cache="/scratch/f.h5")
    assert feature_cache_path(named, spec) == Path("/scratch/f.h5")


def test_a_named_cache_path_holding_something_else_is_refused_and_left_alone(tiny_shapes, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    config = _config(tiny_shapes, data__feature_cache=str(mine))
    with pytest.raises(DataError, match=r"notes.txt: not a feature cache of this sca-caption version; not overwritten"):
        ensure_features(config, load_records(config), progress=False, log=lambda _: None)
    assert mine.read_text() == "my notes\n"
    other_weights = _config(tiny_shapes, data__backbone_weights="none")  # the tiny cache was built with imagenet
    before = tiny_shapes.cache.read_bytes()
    with pytest.raises(DataError, match=r"shapes_stage7.h5: a feature cache built with weights imagenet, expected none; not overwritten"):
        ensure_features(other_weights, load_records(other_weights), progress=False, log=lambda _: None)
    assert tiny_shapes.cache.read_bytes() == before


def test_a_vocabulary_file_with_other_words_is_refused_not_rewritten(tiny_shapes, tmp_path):
    config = _config(tiny_shapes, data__feature_cache=str(tmp_path / "f.h5"))
    path = vocab_path(config, load_records(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": "sca-caption-vocab/1", "words": ["<pad>", "<start>", "<end>", "<unk>", "zebra"]}\n')
    before = path.read_text()
    with pytest.raises(DataError, match="holds another vocabulary than this corpus gives; not overwritten"):
        prepare(config, progress=False, log=lambda _: None)
    assert path.read_text() == before
