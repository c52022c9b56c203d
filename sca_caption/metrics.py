"""Caption metrics computed the way the COCO caption evaluation (pycocoevalcap) computes them.

``score_captions`` runs pycocoevalcap's Stanford PTB tokenizer over candidates and references,
then its ``Bleu(4)``, ``Meteor()``, ``Rouge()`` and ``Cider()`` scorers, exactly as
``COCOEvalCap.evaluate`` does, and ``Spice()`` only where it can run. It does not call
``COCOEvalCap.evaluate`` itself: that always builds SPICE, which downloads Stanford CoreNLP 3.6.0
(hundreds of MB) on first use and so fails offline.

Scale: every score is reported as pycocoevalcap returns it, on the 0-1 scale (CIDEr is CIDEr-D,
which is not capped at 1: its per-image maximum is 10). Nothing in this module multiplies by 100;
papers, SCA-CNN's included, print BLEU/METEOR/ROUGE-L/CIDEr x100, so convert only when printing
a table next to them.

Everything here needs Java 8 or later on PATH (the tokenizer and METEOR are Java programs bundled
with pycocoevalcap, METEOR's paraphrase table included; nothing is downloaded). METEOR starts one
JVM per call, which takes several seconds: score a whole split in one call, never per image.
"""

from __future__ import annotations

import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence, TypeVar, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as stanford
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from sca_caption.data.errors import DataError
from sca_caption.io_utils import atomic_write_json

ImageId = Union[int, str]
T = TypeVar("T")

BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
# SPICE 1.0's cache serialises JDK internals by reflection, which Java 16+ forbids (JEP 396).
SPICE_NEWEST_JAVA = 15


class MetricsError(DataError):
    """Captions that cannot be scored, or a Java scorer that failed; the message is one line."""


class CaptionScores(dict[str, float]):
    """Corpus scores by COCO metric name (``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
    ``CIDEr``, ``SPICE``), plus ``skipped``: metric name -> why it was not computed."""

    def __init__(self, scores: Mapping[str, float], skipped: Mapping[str, str]) -> None:
        super().__init__(scores)
        self.skipped = dict(skipped)


def score_captions(
    results: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool | Literal["auto"] = "auto",
) -> CaptionScores:
    """Score one candidate caption per image against that image's references.

    ``results`` and ``references`` must cover the same image ids. ``meteor=False`` leaves METEOR
    out (it costs a JVM start). ``spice="auto"`` computes SPICE where it can run and otherwise
    records why not in ``skipped``; ``True`` raises instead; ``False`` leaves it out silently.
    As in coco-caption, CIDEr's document frequencies come from the references of the images
    scored, so compare CIDEr only between runs over the same images.
    """
    _check_inputs(results, references)
    spice_problem = spice_unavailable_reason() if spice else None
    if spice is True and spice_problem:
        raise MetricsError(f"SPICE cannot run: {spice_problem}")
    gts, res = _tokenize(results, references)
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({name: float(value) for name, value in zip(BLEU_NAMES, bleu)})
    if meteor:
        with _meteor_scorer() as scorer:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice and spice_problem is None:
        scores["SPICE"] = float(_run_java("SPICE", lambda: Spice().compute_score(gts, res))[0])
    skipped = {"SPICE": spice_problem} if spice_problem else {}
    return CaptionScores(scores, skipped)


def coco_results(captions: Mapping[ImageId, str]) -> list[dict[str, ImageId | str]]:
    """Captions in the COCO results format ``[{"image_id": id, "caption": text}, ...]``.

    Image ids are kept as given (ints for COCO, file-name stems for Flickr), in the mapping's order.
    """
    return [{"image_id": image_id, "caption": caption} for image_id, caption in captions.items()]


def write_coco_results(path: str | Path, captions: Mapping[ImageId, str]) -> None:
    """Write ``coco_results(captions)`` as a JSON file, atomically."""
    atomic_write_json(path, coco_results(captions))


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None if it can. Cheap: looks for the CoreNLP jars that
    pycocoevalcap would otherwise download, and only then asks Java for its version."""
    lib = Path(stanford.SPICEDIR) / stanford.SPICELIB
    jars = [lib / f"{stanford.JAR}.jar", lib / f"{stanford.JAR}-models.jar"]
    if not all(jar.is_file() for jar in jars):
        return f"{stanford.JAR} jars are not in {lib} (pycocoevalcap would download them)"
    major = java_major_version()
    if major > SPICE_NEWEST_JAVA:
        return f"SPICE 1.0 fails on Java {major}; it needs Java 8 to {SPICE_NEWEST_JAVA}"
    return None


def java_major_version() -> int:
    """The major version of the ``java`` on PATH (8 for "1.8.0_392", 17 for "17.0.15")."""
    try:
        banner = subprocess.run(["java", "-version"], capture_output=True, text=True, check=True).stderr
    except (OSError, subprocess.CalledProcessError) as error:
        raise MetricsError(f"cannot run java -version: {error}") from None
    return parse_java_version(banner)


def parse_java_version(banner: str) -> int:
    """Major version from ``java -version`` output: 'version "1.8.0_392"' -> 8, '"17.0.15"' -> 17."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', banner)
    if match is None:
        raise MetricsError(f"cannot read a Java version from: {banner.strip().splitlines()[:1]}")
    first, second = int(match.group(1)), match.group(2)
    return int(second) if first == 1 and second is not None else first


def _check_inputs(results: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]) -> None:
    if not results:
        raise MetricsError("no captions to score")
    missing = [i for i in references if i not in results]
    extra = [i for i in results if i not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} referenced image(s) have no caption (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} captioned image(s) have no references (e.g. {extra[0]!r})")
        raise MetricsError("results and references differ: " + "; ".join(parts))
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise MetricsError(f"caption of image {image_id!r} is {type(caption).__name__}, not str")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise MetricsError(f"references of image {image_id!r} must be a non-empty list of str")


def _tokenize(
    results: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]
) -> tuple[dict[ImageId, list[str]], dict[ImageId, list[str]]]:
    """PTB-tokenise references and candidates in one JVM run -> (gts, res) as the scorers take them.

    Each caption's whitespace is collapsed to single spaces first: the tokenizer reads one caption
    per line, and a carriage return or other line separator inside a caption would shift every
    later caption onto the wrong image. The tokens are otherwise what the tokenizer makes.
    """
    batch: dict[tuple[str, ImageId], list[dict[str, str]]] = {}
    for image_id, refs in references.items():
        batch["ref", image_id] = [{"caption": " ".join(r.split())} for r in refs]
    for image_id, caption in results.items():
        batch["res", image_id] = [{"caption": " ".join(caption.split())}]
    tokens = _run_java("PTBTokenizer", lambda: PTBTokenizer().tokenize(batch))
    if any(len(tokens.get(key, ())) != len(captions) for key, captions in batch.items()):
        raise MetricsError("the PTB tokenizer (Java) returned fewer lines than it was given captions")
    gts = {image_id: tokens["ref", image_id] for image_id in references}
    res = {image_id: tokens["res", image_id] for image_id in references}
    return gts, res


@contextmanager
def _meteor_scorer() -> Iterator[Meteor]:
    """A Meteor scorer (one JVM) that is shut down on leaving, also after a failure.

    pycocoevalcap's ``Meteor.__del__`` takes a lock that a failed ``compute_score`` leaves held,
    so without the release below a failure would hang the interpreter at garbage collection.
    """
    scorer = _run_java("METEOR", Meteor)
    try:
        yield scorer
    except (OSError, ValueError) as error:
        raise MetricsError(f"METEOR (Java) failed: {type(error).__name__}: {error}") from None
    finally:
        if scorer.lock.locked():
            scorer.lock.release()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def _run_java(name: str, call: Callable[[], T]) -> T:
    """Run a pycocoevalcap call that starts Java; a missing or failing JVM becomes a MetricsError."""
    try:
        return call()
    except FileNotFoundError:
        raise MetricsError(f"{name} needs Java 8 or later on PATH, and there is no java") from None
    except (OSError, subprocess.CalledProcessError) as error:
        raise MetricsError(f"{name} (Java) failed: {error}") from None
