"""The CIDEr-D reward: a hand-computed example, pycocoevalcap's Cider, a naive implementation, the cache."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from sca_caption import rewards
from sca_caption.data.vocab import SPECIALS, Vocab
from sca_caption.rewards import (
    CiderCacheError,
    CiderD,
    DocumentFrequency,
    build_or_load_cider,
    cider_cache_path,
    load_document_frequency,
)

WORDS = [*SPECIALS, *(f"w{i}" for i in range(len(SPECIALS), 40))]
VOCAB = Vocab(WORDS)


def ids(sentence: str) -> list[int]:
    return [WORDS.index(w) for w in sentence.split()]


def cider_of(corpus: list[list[str]]) -> CiderD:
    """The reward with every image of ``corpus`` (its references as sentences) for document frequencies."""
    references = [[ids(r) for r in refs] for refs in corpus]
    return CiderD(references, DocumentFrequency.build(references, len(VOCAB)))


def scores(cider: CiderD, candidates: list[str], images: list[int]) -> list[float]:
    """The reward of sentences, padded into one (N, T) batch: ``<end>`` then ``<pad>``."""
    rows = [ids(c) + [Vocab.end] for c in candidates]
    width = max(map(len, rows))
    batch = torch.tensor([r + [Vocab.pad] * (width - len(r)) for r in rows])
    return cider.score(batch, torch.tensor(images)).tolist()


def naive_cider_d(
    candidate: list, refs: list[list], corpus: list[list[list]], clip: bool = True, penalty: bool = True
) -> float:
    """CIDEr-D straight from the formula, with dicts: df over the images of ``corpus``."""

    def ngrams(s: list, n: int) -> Counter:
        return Counter(tuple(s[i : i + n]) for i in range(len(s) - n + 1))

    images = len(corpus)
    df: Counter = Counter()
    for image_refs in corpus:  # each image counts once per n-gram
        df.update({g for r in image_refs for n in range(1, 5) for g in ngrams(r, n)})

    def tfidf(s: list, n: int) -> dict:
        return {g: c * (math.log(images) - math.log(max(1, df[g]))) for g, c in ngrams(s, n).items()}

    total = 0.0
    for ref in refs:
        sims = []
        for n in range(1, 5):
            gc, gr = tfidf(candidate, n), tfidf(ref, n)
            dot = sum((min(v, gr.get(g, 0.0)) if clip else v) * gr.get(g, 0.0) for g, v in gc.items())
            norms = math.sqrt(sum(v * v for v in gc.values())) * math.sqrt(sum(v * v for v in gr.values()))
            sims.append(dot / norms if norms > 0 else 0.0)
        factor = math.exp(-((len(candidate) - len(ref)) ** 2) / (2 * 6.0**2)) if penalty else 1.0
        total += factor * sum(sims) / 4
    return 10.0 * total / len(refs)


def test_a_hand_computed_example() -> None:
    # Three images, M = 3: "w4 w5 w6" and "w4 w5" | "w4 w7" | "w8". w4 is in two images' references:
    # idf(w4) = log 3 − log 2 = log 1.5; every other n-gram is in one image: idf = log 3.
    cider = cider_of([["w4 w5 w6", "w4 w5"], ["w4 w7"], ["w8"]])
    a, b = math.log(1.5), math.log(3)
    # "w4 w5" against "w4 w5 w6": unigrams (a, b) · (a, b, b) / (|(a, b)| |(a, b, b)|) = √(a²+b²) / √(a²+2b²);
    # bigrams (b) · (b, b) / (b · √2 b) = 1/√2; no 3- or 4-grams: 0. δ = 2 − 3: factor exp(−1/72).
    # Against "w4 w5": 1, 1, 0, 0 and δ = 0. Mean over n, over the two references, times 10:
    long_ref, short_ref = math.sqrt(a * a + 2 * b * b), math.sqrt(a * a + b * b)
    first = 10 * ((short_ref / long_ref + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) + 2 / 4) / 2
    # "w4 w4": unigram (2a), clipped to the reference's count: min(2a, a) · a / (2a · |ref|) = a / (2 |ref|);
    # its bigram "w4 w4" is in no reference: 0. |ref| = √(a²+2b²), δ = −1 | |ref| = √(a²+b²), δ = 0.
    second = 10 * (a / (2 * long_ref) / 4 * math.exp(-1 / 72) + a / (2 * short_ref) / 4) / 2
    # "w8" for the third image: unigram similarity 1, nothing else: 10 · 1/4.
    got = scores(cider, ["w4 w5", "w4 w4", "w8"], [0, 0, 2])
    assert got == pytest.approx([first, second, 2.5], rel=1e-6)
    assert first == pytest.approx(4.270746, abs=1e-6) and second == pytest.approx(0.372046, abs=1e-6)


def test_end_as_a_word_by_hand() -> None:
    # Two images, M = 2: "w4 w5" | "w6". With <end> a word: references "w4 w5 <end>" and "w6 <end>";
    # <end> is in both images (idf 0), every other n-gram of them in one (idf L = log 2), and the
    # candidate's "w4 <end>" in none (the full weight L).
    references = [[ids("w4 w5")], [ids("w6")]]
    plain = CiderD(references, DocumentFrequency.build(references, len(VOCAB)))
    ended = CiderD(references, DocumentFrequency.build(references, len(VOCAB), end_word=True))
    near = math.exp(-1 / 72)  # the length penalty of ℓ_c − ℓ_r = −1
    # "w4 w5 <end>": without <end> words it matches n = 1, 2 of "w4 w5" (sim 1, 1, 0, 0); with them
    # n = 1, 2, 3 of "w4 w5 <end>" (and no 4-gram): 10 · 2/4 against 10 · 3/4.
    # "w4 <end>" (stops early): unigrams (L, 0) · (L, L, 0) / (L · L√2) = 1/√2, no shared bigram,
    # ℓ 1 against 2, or 2 against 3: 10 · e^(−1/72) · (1/√2) / 4 either way.
    batch = torch.tensor([[4, 5, Vocab.end, Vocab.pad], [4, Vocab.end, Vocab.pad, Vocab.pad]])
    dangling = 10 * near / math.sqrt(2) / 4
    assert plain.score(batch, torch.tensor([0, 0])).tolist() == pytest.approx([5.0, dangling])
    assert ended.score(batch, torch.tensor([0, 0])).tolist() == pytest.approx([7.5, dangling])
    # cut at the maximum length (no <end>): no <end> word, "w4 w5" against "w4 w5 <end>": n = 1:
    # (L, L)·(L, L, 0) / (L√2 · L√2) = 1; n = 2: (L)·(L, L) / (L · L√2) = 1/√2; n = 3: 0; ℓ 2 against 3.
    expected = 10 * near * (1 + 1 / math.sqrt(2)) / 4
    assert ended.score(torch.tensor([[4, 5]]), torch.tensor([0])).tolist() == pytest.approx([expected])
    # <end> is counted once: what follows it is not read
    assert ended.score(torch.tensor([[4, 5, Vocab.end, 6]]), torch.tensor([0])).tolist() == pytest.approx([7.5])


def test_end_as_a_word_equals_naive_with_an_end_token() -> None:
    rng = random.Random(5)
    corpus = [[[rng.randint(4, 9) for _ in range(rng.randint(1, 6))] for _ in range(2)] for _ in range(4)]
    cider = CiderD(corpus, DocumentFrequency.build(corpus, len(VOCAB), end_word=True))
    ended = [[[*r, Vocab.end] for r in refs] for refs in corpus]
    for _ in range(20):
        image = rng.randrange(4)
        words = [rng.randint(4, 9) for _ in range(rng.randint(0, 6))]
        expected = naive_cider_d([*words, Vocab.end], ended[image], ended)
        got = cider.score(torch.tensor([[*words, Vocab.end, Vocab.pad]]), torch.tensor([image])).item()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_references_of_other_images_score_with_the_training_weights() -> None:
    rng = random.Random(6)
    corpus = [[[rng.randint(4, 9) for _ in range(rng.randint(1, 6))] for _ in range(2)] for _ in range(4)]
    other = [[[rng.randint(4, 12) for _ in range(rng.randint(1, 6))] for _ in range(3)] for _ in range(3)]
    df = DocumentFrequency.build(corpus, len(VOCAB))
    cider = CiderD(other, df.extended(other))
    assert df.extended(other).images == 4 and set(df.keys.tolist()) < set(df.extended(other).keys.tolist())
    for _ in range(20):
        image = rng.randrange(3)
        words = [rng.randint(4, 12) for _ in range(rng.randint(0, 6))]
        expected = naive_cider_d(words, other[image], corpus)  # df of the 4 corpus images, n-grams of none: log 4
        got = cider.score(torch.tensor([[*words, Vocab.end]]), torch.tensor([image])).item()
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_pycocoevalcap_cider_where_the_definitions_agree() -> None:
    # No clipping (no repeated n-gram in a candidate) and no length penalty (every reference as long
    # as the candidate); pycocoevalcap takes document frequencies from the images it scores, so
    # both score every image of the corpus. Words "w<id>" for pycocoevalcap, the same ids for us.
    rng = random.Random(0)
    corpus, candidates = [], []
    for _ in range(8):
        length = rng.randint(1, 6)
        corpus.append([" ".join(f"w{rng.randint(4, 12)}" for _ in range(length)) for _ in range(rng.randint(1, 5))])
        candidates.append(" ".join(f"w{i}" for i in rng.sample(range(4, 13), length)))
    _, theirs = Cider().compute_score(dict(enumerate(corpus)), {i: [c] for i, c in enumerate(candidates)})
    assert scores(cider_of(corpus), candidates, list(range(8))) == pytest.approx(list(theirs), rel=1e-6, abs=1e-6)
    assert max(theirs) > 1.0  # the test is not comparing zeros


def test_pycocoevalcap_cider_is_cider_d_too() -> None:
    # coco-caption's Cider clips and penalises length as well: the two agree on any candidates.
    rng = random.Random(1)

    def sentence(longest: int) -> str:
        return " ".join(f"w{rng.randint(4, 9)}" for _ in range(rng.randint(1, longest)))

    corpus = [[sentence(9) for _ in range(5)] for _ in range(10)]
    candidates = [sentence(12) for _ in range(10)]
    _, theirs = Cider().compute_score(dict(enumerate(corpus)), {i: [c] for i, c in enumerate(candidates)})
    assert scores(cider_of(corpus), candidates, list(range(10))) == pytest.approx(list(theirs), rel=1e-6, abs=1e-6)


def test_clipping_and_the_length_penalty_each_lower_the_score() -> None:
    corpus = [["w4 w5"], ["w6 w7"]]
    cider, references = cider_of(corpus), [[ids(r) for r in refs] for refs in corpus]
    # "w4 w4" against "w4 w5" (every idf log 2 = l): min(2l, l) · l / (2l · √2 l) = 1/(2√2) over 4 orders,
    # unclipped 2l · l / (2l · √2 l) = 1/√2: half the score.
    repeated = scores(cider, ["w4 w4"], [0])[0]
    assert repeated == pytest.approx(10 / (4 * 2 * math.sqrt(2)), rel=1e-6)
    assert repeated == pytest.approx(naive_cider_d(ids("w4 w4"), references[0], references, clip=False) / 2, rel=1e-6)
    # "w4 w5 w6" against "w4 w5": δ = 1, so exactly exp(−1/72) times the unpenalised score.
    longer = scores(cider, ["w4 w5 w6"], [0])[0]
    unpenalised = naive_cider_d(ids("w4 w5 w6"), references[0], references, penalty=False)
    assert longer == pytest.approx(unpenalised * math.exp(-1 / 72), rel=1e-6) and longer < unpenalised


def test_vectorised_equals_naive_on_random_batches() -> None:
    rng = random.Random(2)
    words = list(range(4, 16))  # a small vocabulary, so that n-grams repeat and match
    references = [
        [[rng.choice(words) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 6))] for _ in range(12)
    ]
    references[0][0] = [Vocab.unk, 4, Vocab.unk]  # <unk> is an ordinary word
    cider = CiderD(references, DocumentFrequency.build(references, len(VOCAB)))
    images, rows = [], []
    for image in range(12):
        for _ in range(4):  # samples per image; after <end>, anything
            words_here = [rng.choice(words + [Vocab.unk]) for _ in range(rng.randint(0, 14))]
            tail = [Vocab.end] + [rng.choice(words + [Vocab.pad, Vocab.end]) for _ in range(16)]
            rows.append((words_here + tail)[:16])
            images.append(image)
    rows[1] = [rng.choice(words) for _ in range(16)]  # filling the row: no <end>
    rows[2] = [rng.choice(words) for _ in range(5)] + [Vocab.pad] * 11  # <pad> ends a row too
    got = cider.score(torch.tensor(rows), torch.tensor(images))
    expected = []
    for row, image in zip(rows, images):
        cut = next((i for i, t in enumerate(row) if t in (Vocab.end, Vocab.pad)), len(row))
        expected.append(naive_cider_d(row[:cut], references[image], references))
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert sum(e > 0 for e in expected) > 20


def test_references_read_in_chunks_give_the_same_tables(monkeypatch) -> None:
    rng = random.Random(3)
    references = [[[rng.randint(4, 9) for _ in range(rng.randint(0, 7))] for _ in range(3)] for _ in range(5)]
    whole = CiderD(references, DocumentFrequency.build(references, len(VOCAB)))
    monkeypatch.setattr(rewards, "_CHUNK", 4)  # 15 references: four chunks, one across images
    chunked = CiderD(references, DocumentFrequency.build(references, len(VOCAB)))
    assert torch.equal(chunked.df.keys, whole.df.keys) and torch.equal(chunked.df.counts, whole.df.counts)
    assert torch.equal(chunked.ref_keys, whole.ref_keys) and torch.equal(chunked.ref_norms, whole.ref_norms)


def test_cache_round_trip_and_mismatches(tmp_path, monkeypatch) -> None:
    references = [[ids("w4 w5 w6"), ids("w4 w5")], [ids("w4 w7")], [ids("w8 w8 w9")]]
    path = cider_cache_path(tmp_path / "toy_vocab_min1.json")
    assert path.name == "toy_vocab_min1.cider.pt"
    built = build_or_load_cider(path, VOCAB, references)
    assert set(torch.load(path, weights_only=True)) >= {"vocab_sha256", "references_sha256", "keys", "counts"}

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(DocumentFrequency, "build", no_rebuild)
    loaded = build_or_load_cider(path, VOCAB, references)
    assert torch.equal(loaded.df.keys, built.df.keys) and torch.equal(loaded.df.counts, built.df.counts)
    batch, images = torch.tensor([[4, 5, 2], [8, 9, 8]]), torch.tensor([0, 2])
    assert torch.equal(loaded.score(batch, images), built.score(batch, images))

    other_vocab = Vocab([*WORDS[:5], "renamed", *WORDS[6:]])
    for vocab, refs, problem in [
        (other_vocab, references, "CIDEr-D cache of another vocabulary (40 entries, sha256 "),
        (VOCAB, references[:2], "CIDEr-D cache of other references (3 images, sha256 "),
    ]:
        with pytest.raises(CiderCacheError) as err:
            build_or_load_cider(path, vocab, refs)
        message = str(err.value)
        assert message.startswith(f"{path}: {problem}") and "delete it to rebuild" in message and "\n" not in message
    ended = cider_cache_path(tmp_path / "toy_vocab_min1.json", end_word=True)
    assert ended.name == "toy_vocab_min1.cider-end.pt"
    monkeypatch.undo()
    assert build_or_load_cider(ended, VOCAB, references, end_word=True).df.end_word
    assert load_document_frequency(ended, VOCAB, references, end_word=True).end_word
    for file, end_word, has in [(ended, False, "counts <end> as a word"), (path, True, "does not count <end> as a word")]:
        with pytest.raises(CiderCacheError) as err:
            build_or_load_cider(file, VOCAB, references, end_word)
        assert str(err.value).startswith(f"{file}: this CIDEr-D cache {has}, this run's reward does")
    path.write_bytes(b"not a torch file")
    with pytest.raises(CiderCacheError, match="not a readable CIDEr-D cache") as err:
        load_document_frequency(path, VOCAB, references)
    assert "\n" not in str(err.value)


def test_bad_input_is_a_value_error() -> None:
    cider = cider_of([["w4 w5"], ["w6"]])
    with pytest.raises(ValueError, match="candidates hold 1, not a word id"):  # <start> left in
        cider.score(torch.tensor([[Vocab.start, 4, 5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="candidates hold 40"):
        cider.score(torch.tensor([[4, 40]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="indices below 2"):
        cider.score(torch.tensor([[4, 5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="references hold 2"):  # the ids of Vocab.encode, <end> kept
        DocumentFrequency.build([[VOCAB.encode(["w4"], 5)[1:]]], len(VOCAB))
    with pytest.raises(ValueError, match="too large for int64 n-gram keys"):
        DocumentFrequency.build([[[4]]], 60_000)
