"""Caption metrics: equal to pycocoevalcap's own scorers, exact on perfect candidates, strict on input.

METEOR starts a JVM (several seconds), so it runs once in this file, in a module-scoped fixture
that records what our code hands pycocoevalcap's ``Meteor`` and what it answers; every other test
passes ``meteor=False``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from sca_caption.metrics import (
    MetricsError,
    coco_results,
    parse_java_version,
    score_captions,
    spice_unavailable_reason,
    write_coco_results,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO tokenizer and METEOR need java on PATH")

REFERENCES: dict[int | str, list[str]] = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    "1000268201_693b08cb0e": [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
        "A little girl climbing into a wooden playhouse .",
        "A little girl climbing the stairs to her playhouse .",
        "A little girl in a pink dress going into a wooden cabin .",
    ],
    "1001773457_577c3a7d70": [
        "A black dog and a spotted dog are fighting",
        "A black dog and a tri-colored dog playing with each other on the road .",
        "A black dog and a white dog with brown spots are staring at each other in the street .",
        "Two dogs of different breeds looking at each other on the road .",
        "Two dogs on pavement moving toward each other .",
    ],
}
CANDIDATES: dict[int | str, str] = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman is cutting a large white cake with a knife.",
    184613: "A boy holding an umbrella next to a cow.",
    "1000268201_693b08cb0e": "A little girl in a pink dress climbs the stairs.",
    "1001773457_577c3a7d70": "Two dogs are playing on the street.",
}


def coco_tokenized() -> tuple[dict, dict]:
    """(gts, res) as COCOEvalCap.evaluate builds them: one PTBTokenizer run per side."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": CANDIDATES[i]}] for i in REFERENCES})
    return gts, res


def pycocoevalcap_scores() -> dict[str, float]:
    """BLEU, ROUGE-L and CIDEr as COCOEvalCap.evaluate computes them, step by step on the fixture."""
    gts, res = coco_tokenized()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": value for n, value in enumerate(bleu)}
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


class RecordingMeteor(Meteor):
    """pycocoevalcap's Meteor, remembering the arguments and answer of each compute_score."""

    calls: list = []

    def compute_score(self, gts, res):
        answer = super().compute_score(gts, res)
        RecordingMeteor.calls.append((gts, res, answer))
        return answer


@pytest.fixture(scope="module")
def with_meteor():
    """Our scores with METEOR (the file's one JVM for it) and the recorded Meteor calls."""
    RecordingMeteor.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sca_caption.metrics.Meteor", RecordingMeteor)
        scores = score_captions(CANDIDATES, REFERENCES, meteor=True, spice=False)
    return scores, RecordingMeteor.calls


@needs_java
@pytest.mark.slow
def test_meteor_is_pycocoevalcap_meteor_on_coco_tokens(with_meteor):
    ours, calls = with_meteor
    assert len(calls) == 1
    gts, res, (meteor_score, _) = calls[0]
    assert (gts, res) == coco_tokenized()
    assert ours["METEOR"] == meteor_score and type(ours["METEOR"]) is float


@needs_java
@pytest.mark.slow
def test_other_metrics_with_meteor_on_equal_pycocoevalcap(with_meteor):
    ours, _ = with_meteor
    theirs = pycocoevalcap_scores()
    assert set(ours) == set(theirs) | {"METEOR"}
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        assert type(ours[name]) is float


@needs_java
@pytest.mark.slow
def test_scores_are_plausible_on_the_zero_one_scale(with_meteor):
    ours, _ = with_meteor
    # Good but imperfect candidates: every score strictly inside (0, 1), BLEU falling with n.
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"):
        assert 0.0 < ours[name] < 1.0, name
    assert ours["Bleu_1"] > ours["Bleu_2"] > ours["Bleu_3"] > ours["Bleu_4"]
    assert 0.0 < ours["CIDEr"] < 10.0


@needs_java
def test_without_meteor_equals_pycocoevalcap_and_omits_meteor():
    ours = score_captions(CANDIDATES, REFERENCES, meteor=False, spice=False)
    theirs = pycocoevalcap_scores()
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert ours.skipped == {}


@needs_java
def test_candidate_equal_to_a_reference_scores_one():
    # Each candidate matches one reference up to case and punctuation, which the PTB tokenizer
    # removes on both sides: clipped n-gram precision 1, and the closest reference length is the
    # candidate's own, so the brevity penalty is 1. BLEU's smoothing constants leave ~1e-9.
    perfect = {i: refs[k % 5].upper().rstrip(" .") + " !" for k, (i, refs) in enumerate(REFERENCES.items())}
    scores = score_captions(perfect, REFERENCES, meteor=False, spice=False)
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_later_images():
    # The tokenizer reads one caption per line; an embedded \r or \n used to move every later
    # caption onto the wrong image. With it, the scores must equal those of the plain caption.
    broken = dict(CANDIDATES)
    broken[391895] = "A man riding a motorcycle\ron a dirt\nroad."
    assert score_captions(broken, REFERENCES, meteor=False, spice=False) == score_captions(
        CANDIDATES, REFERENCES, meteor=False, spice=False
    )


@needs_java
def test_empty_candidate_scores_zero_for_its_image():
    scores = score_captions({"a": ""}, {"a": ["a dog runs on the grass"]}, meteor=False, spice=False)
    assert scores["CIDEr"] == 0.0 and scores["ROUGE_L"] == 0.0
    assert scores["Bleu_1"] < 1e-6


class FailingMeteor(Meteor):
    """A Meteor whose process is ``cat`` and whose compute_score fails holding the lock, as the
    real one does when its JVM dies and answers an empty line."""

    instances: list = []

    def __init__(self):
        self.meteor_p = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()
        FailingMeteor.instances.append(self)

    def compute_score(self, gts, res):
        self.lock.acquire()
        return float("")


@needs_java
def test_failed_meteor_is_one_line_and_leaves_no_process_or_held_lock(monkeypatch):
    monkeypatch.setattr("sca_caption.metrics.Meteor", FailingMeteor)
    with pytest.raises(MetricsError, match="^METEOR \\(Java\\) failed: ValueError: could not convert") as caught:
        score_captions(CANDIDATES, REFERENCES, meteor=True, spice=False)
    assert "\n" not in str(caught.value)
    (scorer,) = FailingMeteor.instances
    # Held, the lock would make Meteor.__del__ wait forever at garbage collection.
    assert not scorer.lock.locked()
    assert scorer.meteor_p.poll() is not None


@needs_java
def test_spice_auto_is_skipped_with_a_reason_when_it_cannot_run():
    reason = spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE can run on this machine")
    scores = score_captions(CANDIDATES, REFERENCES, meteor=False, spice="auto")
    assert "SPICE" not in scores
    assert scores.skipped == {"SPICE": reason}
    with pytest.raises(MetricsError, match="^SPICE cannot run: "):
        score_captions(CANDIDATES, REFERENCES, meteor=False, spice=True)


def test_spice_needs_the_corenlp_jars_and_an_old_enough_java(tmp_path, monkeypatch):
    monkeypatch.setattr("sca_caption.metrics.stanford.SPICEDIR", str(tmp_path))
    assert "stanford-corenlp-3.6.0 jars are not in" in spice_unavailable_reason()
    (tmp_path / "lib").mkdir()
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / "lib" / name).write_bytes(b"")
    monkeypatch.setattr("sca_caption.metrics.java_major_version", lambda: 17)
    assert spice_unavailable_reason() == "SPICE 1.0 fails on Java 17; it needs Java 8 to 15"
    monkeypatch.setattr("sca_caption.metrics.java_major_version", lambda: 8)
    assert spice_unavailable_reason() is None


def test_missing_java_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java anywhere on PATH
    with pytest.raises(MetricsError, match="^PTBTokenizer needs Java 8 or later on PATH, and there is no java$"):
        score_captions(CANDIDATES, REFERENCES, meteor=False, spice=False)


@pytest.mark.parametrize(
    "banner, major",
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('java version "1.8.0_392"\nJava(TM) SE Runtime Environment', 8),
        ('openjdk version "11" 2018-09-25', 11),
        ('openjdk version "21.0.2" 2024-01-16 LTS', 21),
    ],
)
def test_parse_java_version(banner, major):
    assert parse_java_version(banner) == major


def test_parse_java_version_rejects_garbage():
    with pytest.raises(MetricsError, match="cannot read a Java version"):
        parse_java_version("bash: java: command not found")


@pytest.mark.parametrize(
    "results, references, message",
    [
        ({}, {}, "no captions to score"),
        ({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]}, r"1 referenced image\(s\) have no caption \(e.g. 2\)"),
        ({1: "a dog", "x": "a cat"}, {1: ["a dog"]}, r"1 captioned image\(s\) have no references \(e.g. 'x'\)"),
        ({1: ["a dog"]}, {1: ["a dog"]}, "caption of image 1 is list, not str"),
        ({1: "a dog"}, {1: []}, "references of image 1 must be a non-empty list of str"),
        ({1: "a dog"}, {1: "a dog"}, "references of image 1 must be a non-empty list of str"),
    ],
)
def test_bad_inputs_give_one_line_errors(results, references, message):
    with pytest.raises(MetricsError, match=message) as caught:
        score_captions(results, references, meteor=False, spice=False)
    assert "\n" not in str(caught.value)


def test_coco_results_keep_ids_and_order(tmp_path):
    captions = {391895: "a man on a motorcycle", "1000268201_693b08cb0e": "a girl on stairs"}
    expected = [
        {"image_id": 391895, "caption": "a man on a motorcycle"},
        {"image_id": "1000268201_693b08cb0e", "caption": "a girl on stairs"},
    ]
    assert coco_results(captions) == expected
    path = tmp_path / "out" / "results.json"
    write_coco_results(path, captions)
    assert json.loads(path.read_text(encoding="utf-8")) == expected
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_dangling_share_counts_empty_captions_and_function_word_endings():
    from sca_caption.evaluation import dangling_share

    captions = ["a dog runs", "a dog runs on the", "", "two men in", "a man and a"]
    assert dangling_share(captions) == pytest.approx(4 / 5)
    assert dangling_share([]) == 0.0
