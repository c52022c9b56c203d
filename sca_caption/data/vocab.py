"""The word vocabulary: ids for the train split's frequent words plus four special tokens.

Ids 0..3 are ``<pad>``, ``<start>``, ``<end>``, ``<unk>``; words follow by count (descending),
ties by the word itself, so the same corpus always gives the same ids. A vocabulary whose words
cover less than ``MIN_COVERAGE`` of the train captions' words is refused: the rest are ``<unk>``,
which no caption says, so a model trained on it learns to say (almost) nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from sca_caption.data.corpus import ImageRecord, records_in_split
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import read_json
from sca_caption.io_utils import atomic_write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
FILE_FORMAT = "sca-caption-vocab/1"
MIN_COVERAGE = 0.5  # the least share of the train captions' words (occurrences) the vocabulary must hold


class Vocab:
    """Word <-> id mapping. ``pad``, ``start``, ``end``, ``unk`` hold the special ids (0, 1, 2, 3)."""

    pad = 0
    start = 1
    end = 2
    unk = 3
    never_emitted = (pad, start, unk)  # the ids decoding suppresses

    def __init__(self, words: Sequence[str]) -> None:
        """words: every entry in id order, the four specials first."""
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(words[:len(SPECIALS)])}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not list a word twice")
        self.words: tuple[str, ...] = tuple(words)
        self._ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_count: int = 5) -> Vocab:
        """Every word seen at least ``min_count`` times in the token lists ``captions``."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def encode(self, tokens: Sequence[str], max_length: int) -> list[int]:
        """``<start>``, the ids of the first ``max_length`` words (unknown ones as ``<unk>``), ``<end>``."""
        return [self.start, *(self._ids.get(w, self.unk) for w in tokens[:max_length]), self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The words up to the first ``<end>``, with ``<pad>``, ``<start>`` and ``<unk>`` dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.pad, self.start, self.unk):
                words.append(self.words[i])
        return words

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON, atomically."""
        atomic_write_json(path, {"format": FILE_FORMAT, "words": list(self.words)})

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Read a file written by ``save``; anything else is a ``DataError`` naming it."""
        data = read_json(Path(path))
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise DataError(f"{path}: not a vocabulary file (expected format {FILE_FORMAT!r})")
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}: 'words' is not a list of strings")
        try:
            return cls(words)
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None


def build_vocab(records: Sequence[ImageRecord], min_count: int = 5, setting: str = "min_count") -> Vocab:
    """The vocabulary of the train split's captions; a ``DataError`` naming ``setting`` (where
    ``min_count`` comes from) when its words are less than ``MIN_COVERAGE`` of what the captions say."""
    train = records_in_split(records, "train")
    if not train:
        raise DataError("no train split images to build a vocabulary from")
    captions = [tokens for r in train for tokens in r.tokens]
    vocab = Vocab.build(captions, min_count)
    counts = Counter(word for caption in captions for word in caption)
    said, held = sum(counts.values()), sum(counts[word] for word in vocab.words[len(SPECIALS):])
    if not said or held < MIN_COVERAGE * said:
        enough = _largest_min_count(counts, MIN_COVERAGE)
        raise DataError(
            f"{setting} {min_count} keeps {len(vocab) - len(SPECIALS)} of the train split's {len(counts)} words, "
            f"{held / max(said, 1):.0%} of what its captions say (the rest would be <unk>, which no caption says): "
            f"lower {setting}" + (f" (at most {enough} keeps {MIN_COVERAGE:.0%})" if enough else "")
        )
    return vocab


def _largest_min_count(counts: Counter[str], share: float) -> int | None:
    """The largest min count whose words are at least ``share`` of all in ``counts``; None if none."""
    needed, total = share * sum(counts.values()), 0
    for count in sorted(counts.values(), reverse=True):
        total += count
        if total and total >= needed:
            return count
    return None
