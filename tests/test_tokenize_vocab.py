"""Tokenisation against the Karpathy tokens, and the vocabulary's ids, encoding and file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sca_caption.data.corpus import ImageRecord
from sca_caption.data.errors import DataError
from sca_caption.data.tokenize import tokenize
from sca_caption.data.vocab import SPECIALS, Vocab, build_vocab


def test_tokenize_lowercases_and_splits_on_punctuation():
    assert tokenize("A tri-colored dog's ball , near 2 ATVs !") == (
        "a", "tri", "colored", "dog", "s", "ball", "near", "2", "atvs",
    )
    assert tokenize("  ... ") == ()
    assert tokenize("snake_case") == ("snake", "case")


def test_tokenize_reproduces_every_karpathy_flickr8k_token_list(shared_data: Path):
    images = json.loads((shared_data / "flickr8k" / "dataset_flickr8k.json").read_text())["images"]
    sentences = [s for image in images for s in image["sentences"]]
    agreeing = sum(tokenize(s["raw"]) == tuple(s["tokens"]) for s in sentences)
    assert len(sentences) == 40000
    assert agreeing / len(sentences) == 1.0, f"{len(sentences) - agreeing} token lists differ"


CAPTIONS = [
    ("a", "dog", "runs"),
    ("a", "cat", "runs"),
    ("a", "dog", "sits"),
    ("the", "dog", "barks"),
]


def test_build_orders_by_count_then_word_and_applies_min_count():
    vocab = Vocab.build(CAPTIONS, min_count=2)
    # counts: a 3, dog 3, runs 2; cat, sits, the, barks once.
    assert vocab.words == (*SPECIALS, "a", "dog", "runs")
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert len(vocab) == 7
    assert Vocab.build(CAPTIONS, min_count=1).words[4:] == ("a", "dog", "runs", "barks", "cat", "sits", "the")


def test_encode_adds_start_end_truncates_and_maps_unknown_words():
    vocab = Vocab.build(CAPTIONS, min_count=2)
    assert vocab.encode(["a", "dog", "runs"], max_length=10) == [1, 4, 5, 6, 2]
    assert vocab.encode(["a", "zebra", "runs"], max_length=10) == [1, 4, 3, 6, 2]
    assert vocab.encode(["a", "dog", "runs"], max_length=2) == [1, 4, 5, 2]
    assert vocab.encode([], max_length=5) == [1, 2]


def test_decode_stops_at_end_and_drops_specials():
    vocab = Vocab.build(CAPTIONS, min_count=2)
    assert vocab.decode([1, 4, 3, 5, 2, 6, 0]) == ["a", "dog"]
    assert vocab.decode([4, 6, 0, 0]) == ["a", "runs"]
    assert vocab.decode(vocab.encode(["dog", "runs", "a"], max_length=16)) == ["dog", "runs", "a"]


def test_save_load_round_trip_is_atomic(tmp_path: Path):
    vocab = Vocab.build(CAPTIONS, min_count=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded.words == vocab.words
    assert loaded.encode(["the", "cat", "barks"], 8) == vocab.encode(["the", "cat", "barks"], 8)
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]


@pytest.mark.parametrize(
    "content",
    [
        '{"format": "sca-caption-vocab/1", "words": [',
        '["<pad>", "<start>", "<end>", "<unk>"]',
        '{"format": "sca-caption-vocab/1", "words": ["<pad>", "<end>", "<start>", "<unk>"]}',
        '{"format": "sca-caption-vocab/1", "words": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}',
        '{"format": "sca-caption-vocab/1", "words": ["<pad>", "<start>", "<end>", "<unk>", 7]}',
    ],
)
def test_loading_a_malformed_vocab_names_the_file(tmp_path: Path, content: str):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(DataError, match="bad_vocab.json") as info:
        Vocab.load(path)
    assert "\n" not in str(info.value)


def test_build_vocab_counts_only_the_train_split():
    def record(image_id: str, split: str, words: str) -> ImageRecord:
        return ImageRecord(image_id, Path(f"{image_id}.jpg"), split, (words,), (tuple(words.split()),))

    records = [record("1", "train", "a dog"), record("2", "train", "a dog"), record("3", "val", "a cat a cat a cat")]
    assert build_vocab(records, min_count=2).words == (*SPECIALS, "a", "dog")
    with pytest.raises(DataError):
        build_vocab([records[2]], min_count=1)


def test_build_vocab_refuses_words_that_are_less_than_half_of_what_the_captions_say():
    def record(image_id: str, words: str) -> ImageRecord:
        return ImageRecord(image_id, Path(f"{image_id}.jpg"), "train", (words,), (tuple(words.split()),))

    records = [record("1", "a b"), record("2", "a c")]  # a 2, b 1, c 1: "a" alone is half
    assert build_vocab(records, min_count=2).words == (*SPECIALS, "a")
    with pytest.raises(DataError) as caught:
        build_vocab(records, min_count=3, setting="data.min_count")
    assert str(caught.value) == (
        "data.min_count 3 keeps 0 of the train split's 3 words, 0% of what its captions say "
        "(the rest would be <unk>, which no caption says): lower data.min_count (at most 2 keeps 50%)"
    )
    rare = [record("1", "a b c d e"), record("2", "a f g h i")]  # "a" alone is 2 of 10
    with pytest.raises(DataError, match=r"^min_count 2 keeps 1 of the train split's 9 words, 20% .*\(at most 1 keeps 50%\)$"):
        build_vocab(rare, min_count=2)
