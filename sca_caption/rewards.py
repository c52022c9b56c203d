"""The CIDEr-D reward of self-critical sequence training (Rennie et al., CVPR 2017), on token ids.

Definition: CIDEr-D exactly as ``CiderScorer`` in ruotianluo's ``cider`` (``pyciderevalcap/ciderD/
ciderD_scorer.py``, the scorer of ``self-critical.pytorch``), which is also what coco-caption's
(pycocoevalcap's) ``Cider`` computes, but for where the document frequencies come from (there: the
images being scored; here: the training split). For a candidate c of image m with references r_1..r_R:

    g_n(s)[w]    = tf_s(w) · (log M − log max(1, df(w)))     tf-idf of each n-gram w of s (n = 1..4)
    sim_n(c, r)  = Σ_w min(g_n(c)[w], g_n(r)[w]) · g_n(r)[w] / (‖g_n(c)‖ ‖g_n(r)‖)   (0 if a norm is 0)
    CIDEr-D(c)   = 10 · (1/R) Σ_j exp(−(ℓ_c − ℓ_rj)² / (2σ²)) · (1/4) Σ_n sim_n(c, r_j),   σ = 6

- df(w): the number of training images whose references (all of them together, so each image at
  most once) contain w; M: the number of training images (ruotianluo's ``ref_len`` = log M). An
  n-gram of no training reference gets df 0, i.e. the full weight log M in the candidate's norm.
- The candidate's tf-idf is clipped at the reference's (the ``min``) and the Gaussian length penalty
  uses ℓ = the number of words: what the "-D" version adds to CIDEr against gaming. (ruotianluo counts bigrams, ℓ − 1, for
  a non-empty sentence: the same δ; an empty sentence has a zero vector and scores 0 either way.)
- Sentences are token ids with ``<start>``, ``<end>`` and ``<pad>`` left out; ``<unk>`` is an
  ordinary word, as ``UNK`` is in self-critical.pytorch. That code also counts ``<eos>`` as the
  last word of every reference and of every candidate that has one (not one cut at the maximum
  length), in the document frequencies too, which adds n-grams ending in it (a caption that
  stops after "a" has "a <eos>", which no reference holds): ``end_word=True`` here
  (``DocumentFrequency.build``; ``train.scst_reward_end``); by default the end token is not a word.

Vectorised: an n-gram of ids below V is the base-(V+1) number of its ids + 1, an exact int64 key
for V + 1 ≤ 55108 (so (V+1)^4 < 2^63); counting is a per-row sort, and the document frequencies
and each training reference's tf-idf vector are sorted tables searched with ``searchsorted``. The
reference vectors (12 bytes per distinct n-gram of a reference) and norms are built once.

The document frequencies are cached beside the vocabulary (``cider_cache_path``, one file with
and one without ``<end>`` as a word) with fingerprints of the vocabulary and the references; a
cache of another vocabulary, other references or the other ``<end>`` choice is a one-line
``DataError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from sca_caption.data.corpus import ImageRecord, records_in_split
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import open_regular
from sca_caption.data.vocab import Vocab
from sca_caption.errors import first_line
from sca_caption.io_utils import atomic_write

NGRAMS = 4
SIGMA = 6.0
FILE_FORMAT = "sca-caption-cider-df/1"
References = Sequence[Sequence[Sequence[int]]]  # image -> its reference captions -> word ids

_NONE = torch.iinfo(torch.int64).max  # the key of "no n-gram here"; above every real key
_CHUNK = 1 << 15  # references turned into n-gram keys at once (bounds the (rows, 4L) key matrix)


class CiderCacheError(DataError):
    """A CIDEr-D cache that is unreadable or built from another vocabulary or references."""


@dataclass(frozen=True)
class DocumentFrequency:
    """keys: (D,) int64 sorted n-gram keys; counts: (D,) int64 df of each; images: M; vocab_size: V;
    end_word: whether ``<end>`` ends every sentence as a word (module docstring)."""

    keys: Tensor
    counts: Tensor
    images: int
    vocab_size: int
    end_word: bool = False

    @classmethod
    def build(cls, references: References, vocab_size: int, end_word: bool = False) -> DocumentFrequency:
        """df(w) = the number of images among ``references`` whose captions contain w (n = 1..4)."""
        image, _, key, _ = _reference_ngrams(references, vocab_size, end_word)
        keys, gid = torch.unique(key, return_inverse=True)
        image_ngram = torch.unique(image * len(keys) + gid)  # each (image, n-gram) once
        counts = torch.bincount(image_ngram % len(keys), minlength=len(keys))
        return cls(keys, counts, len(references), vocab_size, end_word)

    def extended(self, references: References) -> DocumentFrequency:
        """These document frequencies with the n-grams of ``references`` of other images (e.g. the
        validation split's) that they lack added at df 0 (weight log M, as in a candidate), so a
        ``CiderD`` of those references scores with these (the training split's) weights."""
        key = torch.unique(_reference_ngrams(references, self.vocab_size, self.end_word)[2])
        new = key[~torch.isin(key, self.keys)]
        keys, order = torch.cat([self.keys, new]).sort()
        counts = torch.cat([self.counts, torch.zeros_like(new)])[order]
        return DocumentFrequency(keys, counts, self.images, self.vocab_size, self.end_word)


class CiderD:
    """The CIDEr-D reward of candidates of the images of ``references`` (the training split).

    references[m]: image m's reference captions as word ids (see the module docstring);
    document_frequency: ``DocumentFrequency.build(references, V)``, or that loaded from a cache
    (or, for the references of other images, that ``extended`` with them).
    """

    def __init__(self, references: References, document_frequency: DocumentFrequency) -> None:
        df = document_frequency
        _, ref, key, count = _reference_ngrams(references, df.vocab_size, df.end_word)
        gid = torch.searchsorted(df.keys, key).clamp_(max=len(df.keys) - 1)
        if not bool((df.keys[gid] == key).all()):
            raise ValueError("the references hold n-grams the document frequencies lack: they were built from others")
        self.df = df
        self.log_images = math.log(df.images)  # log M
        self.idf = self.log_images - df.counts.clamp(min=1).double().log()  # (D,) log M − log max(1, df(w))
        value = count * self.idf[gid]  # g(r)[w]
        self.ref_count = torch.tensor([len(refs) for refs in references])  # (M,) R of each image
        self.first_ref = torch.cumsum(self.ref_count, 0) - self.ref_count  # (M,)
        self.ref_lengths = torch.tensor([len(r) + int(df.end_word) for refs in references for r in refs])  # (refs,) ℓ_r
        self.ref_norms = _norms(ref, _order(key, df.vocab_size), value, len(self.ref_lengths))  # (refs, 4)
        self.ref_keys = ref * len(df.keys) + gid  # (E,) ascending: by reference, then n-gram
        self.ref_values = value.float()  # (E,) g(r)[w]

    def score(self, candidates: Tensor, images: Tensor) -> Tensor:
        """CIDEr-D of each candidate: (N,) float32 on ``candidates``' device.

        candidates: (N, T) word ids without ``<start>``, each row read up to its first ``<end>`` or
        ``<pad>`` (that ``<end>`` included where ``end_word``); images: (N,) the index m in
        ``references`` of each row's image.
        """
        if candidates.dim() != 2:
            raise ValueError(f"candidates must be (N, T) word ids, got shape {tuple(candidates.shape)}")
        candidates_cpu = candidates.detach().cpu().long()
        keep = ((candidates_cpu != Vocab.end) & (candidates_cpu != Vocab.pad)).cumprod(1).bool()
        if self.df.end_word:  # and the first <end>, right after the words
            reached = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1)
            keep |= reached & (candidates_cpu == Vocab.end)
        words = candidates_cpu.masked_fill(~keep, Vocab.pad)
        _check_words(words[keep], self.df.vocab_size, "candidates", self.df.end_word)
        lengths = keep.sum(1)  # (N,) ℓ_c
        images = images.detach().cpu().long()
        if images.shape != lengths.shape or not bool(((images >= 0) & (images < len(self.ref_count))).all()):
            raise ValueError(f"images must be {tuple(lengths.shape)} indices below {len(self.ref_count)}")
        rows = len(words)
        row, key, count = _row_counts(_ngram_keys(words, lengths, self.df.vocab_size + 1))
        order = _order(key, self.df.vocab_size)
        gid = torch.searchsorted(self.df.keys, key).clamp_(max=len(self.df.keys) - 1)
        seen = self.df.keys[gid] == key
        value = count * torch.where(seen, self.idf[gid], self.log_images)  # g(c)[w]
        norms = _norms(row, order, value, rows)  # (N, 4) ‖g_n(c)‖
        # Pairs (row i, reference j of its image), row-major: pair pair_start[i] + j.
        ref_count = self.ref_count[images]
        pair_start = torch.cumsum(ref_count, 0) - ref_count
        pair_row = torch.repeat_interleave(torch.arange(rows), ref_count)
        pair_ref = self.first_ref[images][pair_row] + _ranks(ref_count)
        # Each candidate n-gram that some reference holds, looked up in each reference of its image.
        entry = seen.nonzero().squeeze(1)
        repeats = ref_count[row[entry]]
        pair = torch.repeat_interleave(pair_start[row[entry]], repeats) + _ranks(repeats)
        entry = torch.repeat_interleave(entry, repeats)
        query = pair_ref[pair] * len(self.df.keys) + gid[entry]
        at = torch.searchsorted(self.ref_keys, query).clamp_(max=len(self.ref_keys) - 1)
        hit = self.ref_keys[at] == query
        ref_value = self.ref_values[at[hit]].double()
        clipped = torch.minimum(value[entry[hit]], ref_value) * ref_value  # min(g(c), g(r)) · g(r)
        dot = torch.zeros(len(pair_row) * NGRAMS, dtype=torch.float64)
        dot.index_add_(0, pair[hit] * NGRAMS + order[entry[hit]], clipped)
        denominator = norms[pair_row] * self.ref_norms[pair_ref]
        sim = torch.where(denominator > 0, dot.view(-1, NGRAMS) / denominator, 0.0)  # (pairs, 4) sim_n
        delta = (lengths[pair_row] - self.ref_lengths[pair_ref]).double()  # ℓ_c − ℓ_r
        per_pair = sim.mean(1) * torch.exp(-delta.square() / (2 * SIGMA**2))
        total = torch.zeros(rows, dtype=torch.float64).index_add_(0, pair_row, per_pair)
        return (10.0 * total / ref_count).float().to(candidates.device)


def train_references(records: Sequence[ImageRecord], vocab: Vocab, split: str = "train") -> list[list[list[int]]]:
    """The ``split``'s captions as word ids, whole (not cut to a maximum length), unknown words as
    ``<unk>``: reference m is the m-th image of ``records_in_split(records, split)``."""
    return [[vocab.encode(t, len(t))[1:-1] for t in r.tokens] for r in records_in_split(records, split)]


def cider_cache_path(vocab_path: Path, end_word: bool = False) -> Path:
    """The document-frequency cache beside a vocabulary: ``<name>_vocab_min<k>_<key>.cider.pt``,
    or ``….cider-end.pt`` where ``<end>`` is a word."""
    return Path(vocab_path).with_suffix(".cider-end.pt" if end_word else ".cider.pt")


def build_or_load_cider(path: Path, vocab: Vocab, references: References, end_word: bool = False) -> CiderD:
    """The reward of ``references`` (``end_word``: ``<end>`` a word): document frequencies from
    the cache ``path``, or computed and saved there when it is absent; a cache of another
    vocabulary, references or ``end_word`` is a ``CiderCacheError``."""
    if Path(path).exists():
        df = load_document_frequency(path, vocab, references, end_word)
    else:
        df = DocumentFrequency.build(references, len(vocab), end_word)
        save_document_frequency(path, df, vocab, references)
    return CiderD(references, df)


def save_document_frequency(path: Path, df: DocumentFrequency, vocab: Vocab, references: References) -> None:
    """Write ``df`` and the fingerprints of ``vocab`` and ``references`` (a torch file, atomically)."""
    if df.vocab_size != len(vocab) or df.images != len(references):
        raise ValueError("the document frequencies are not of this vocabulary and these references")
    state = {"format": FILE_FORMAT, "ngrams": NGRAMS, "end_word": df.end_word, **_fingerprints(vocab, references)}
    state.update(keys=df.keys, counts=df.counts)
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def load_document_frequency(path: Path, vocab: Vocab, references: References, end_word: bool = False) -> DocumentFrequency:
    """Read a file of ``save_document_frequency`` made from ``vocab``, ``references`` and ``end_word``."""
    try:
        with open_regular(path, "CIDEr-D cache") as handle:  # a FIFO would block torch.load forever
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except DataError as err:
        raise CiderCacheError(str(err)) from None
    except Exception as err:  # unreadable, or not a torch file of plain data
        raise CiderCacheError(f"{path}: not a readable CIDEr-D cache ({first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FILE_FORMAT or state.get("ngrams") != NGRAMS:
        raise CiderCacheError(f"{path}: not a CIDEr-D cache (expected format {FILE_FORMAT!r}, n = 1..{NGRAMS})")
    if bool(state.get("end_word", False)) != end_word:  # caches from before the choice have no <end> word
        has = "counts <end> as a word" if state.get("end_word") else "does not count <end> as a word"
        raise CiderCacheError(f"{path}: this CIDEr-D cache {has}, this run's reward {'does' if end_word else 'does not'}")
    expected = _fingerprints(vocab, references)
    for what, this, size, unit, digest in [
        ("another vocabulary", "this one", "vocab_size", "entries", "vocab_sha256"),
        ("other references", "these", "images", "images", "references_sha256"),
    ]:
        if state.get(digest) != expected[digest]:
            raise CiderCacheError(
                f"{path}: CIDEr-D cache of {what} ({state.get(size)} {unit}, sha256 {str(state.get(digest))[:12]}; "
                f"{this}: {expected[size]} {unit}, sha256 {expected[digest][:12]}); delete it to rebuild"
            )
    keys, counts = state.get("keys"), state.get("counts")
    if not (isinstance(keys, Tensor) and isinstance(counts, Tensor) and keys.dtype == counts.dtype == torch.int64
            and keys.dim() == 1 and keys.shape == counts.shape):
        raise CiderCacheError(f"{path}: 'keys' and 'counts' are not int64 vectors of one length")
    return DocumentFrequency(keys, counts, len(references), len(vocab), end_word)


def _fingerprints(vocab: Vocab, references: References) -> dict[str, Any]:
    """sha256 of the vocabulary's words in id order and of the references, with their sizes."""
    refs = json.dumps([[list(map(int, r)) for r in refs] for refs in references], separators=(",", ":"))
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab.words).encode()).hexdigest(),
        "images": len(references),
        "references_sha256": hashlib.sha256(refs.encode()).hexdigest(),
    }


def _reference_ngrams(references: References, vocab_size: int, end_word: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The distinct n-grams of each reference (followed by ``<end>`` where ``end_word``):
    (image, reference, key, count), each (E,), by reference (numbered across images in order) then key."""
    if (vocab_size + 1) ** NGRAMS >= 2**63:
        raise ValueError(f"a vocabulary of {vocab_size} ids is too large for int64 n-gram keys (at most 55107)")
    if not references or any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    flat = [[*r, Vocab.end] if end_word else r for refs in references for r in refs]
    image_of = torch.repeat_interleave(torch.arange(len(references)), torch.tensor([len(refs) for refs in references]))
    parts = []
    for first in range(0, len(flat), _CHUNK):
        chunk = flat[first : first + _CHUNK]
        width = max(1, max(len(r) for r in chunk))
        words = torch.tensor([[*r, *[Vocab.pad] * (width - len(r))] for r in chunk], dtype=torch.long)
        lengths = torch.tensor([len(r) for r in chunk])
        _check_words(words[torch.arange(width) < lengths[:, None] - int(end_word)], vocab_size, "references")  # not the <end> added
        row, key, count = _row_counts(_ngram_keys(words, lengths, vocab_size + 1))
        parts.append((row + first, key, count))
    ref, key, count = (torch.cat(p) for p in zip(*parts))
    if not len(key):
        raise ValueError("the references hold no words")
    return image_of[ref], ref, key, count


def _check_words(ids: Tensor, vocab_size: int, what: str, end_word: bool = False) -> None:
    """Words are ids in [0, V) other than ``<pad>``, ``<start>`` and (unless ``end_word``) ``<end>``."""
    bad = (ids < 0) | (ids >= vocab_size) | (ids == Vocab.pad) | (ids == Vocab.start) | (ids == Vocab.end) & (not end_word)
    if bool(bad.any()):
        raise ValueError(f"{what} hold {int(ids[bad][0])}, not a word id (below {vocab_size}, not <pad>/<start>/<end>)")


def _ngram_keys(words: Tensor, lengths: Tensor, base: int) -> Tensor:
    """(R, P) the key Σ_i (id_i + 1)·base^(n−1−i) of each n-gram (n = 1..4) among each row's first
    ``lengths`` words (``words`` (R, L), 0 past them), ``_NONE`` where there is none; P = Σ_n (L − n + 1)."""
    digits, width = words + 1, words.shape[1]
    key, columns = torch.zeros_like(digits), []
    for n in range(1, min(NGRAMS, width) + 1):
        key = key[:, : width - n + 1] * base + digits[:, n - 1 :]  # key[:, j]: the n-gram starting at j
        absent = torch.arange(n, width + 1) > lengths[:, None]  # it ends past the sentence
        columns.append(key.masked_fill(absent, _NONE))
    return torch.cat(columns, 1) if columns else torch.empty(len(words), 0, dtype=torch.long)


def _row_counts(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's distinct keys of ``keys`` (R, P) but ``_NONE``: (row, key, count), by row then key."""
    rows, width = keys.shape
    keys = keys.sort(dim=1).values
    first = torch.ones_like(keys, dtype=torch.bool)
    first[:, 1:] = keys[:, 1:] != keys[:, :-1]
    starts = first.flatten().nonzero().squeeze(1)
    count = torch.diff(starts, append=torch.tensor([rows * width]))
    key = keys.flatten()[starts]
    real = key != _NONE
    return (starts // max(width, 1))[real], key[real], count[real]


def _order(key: Tensor, vocab_size: int) -> Tensor:
    """n − 1 for each n-gram key: the number of base-(V+1) digits past the first."""
    return sum((key >= (vocab_size + 1) ** k).long() for k in range(1, NGRAMS))


def _norms(row: Tensor, order: Tensor, value: Tensor, rows: int) -> Tensor:
    """(rows, 4) ‖g_n‖ = sqrt(Σ_w g_n[w]²) of the entries (row, order, value)."""
    squares = torch.zeros(rows * NGRAMS, dtype=torch.float64).index_add_(0, row * NGRAMS + order, value.square())
    return squares.sqrt().view(rows, NGRAMS)


def _ranks(counts: Tensor) -> Tensor:
    """0, 1, .., counts[k] − 1 for each k in turn: (Σ counts,)."""
    total = int(counts.sum())
    return torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
