"""A user's mistake is caught while the command line and config files are read (issue #26,
RELIABILITY.md): a seed numpy refuses, an unknown backbone, a key given by two overrides (a
file giving one twice: test_config.py), a ``--min-count`` of 0, a vocabulary of (almost) no words, and a Ctrl-C while an entry
point still imports torch are each one line and status 2, never a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sca_caption import prepare, train
from sca_caption.config import SEED_MAX, load_config
from sca_caption.data.shapes import generate_shapes
from sca_caption.errors import INTERRUPTED
from train_support import subprocess_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "preprocess"))
import build_vocab  # noqa: E402
import extract_features  # noqa: E402

ENTRY_POINTS = [
    ["-m", "sca_caption.train"], ["-m", "sca_caption.evaluate"], ["-m", "sca_caption.caption"],
    ["-m", "sca_caption.export"], ["-m", "sca_caption.serve"], ["preprocess/build_vocab.py"],
    ["preprocess/download.py"], ["preprocess/extract_features.py"], ["preprocess/make_shapes.py"],
]


@pytest.fixture
def no_extraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that gets as far as extracting features fails the test at once."""

    def extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run went on to extract features")

    monkeypatch.setattr(prepare, "ensure_features", extraction)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a command printed on stderr."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("override, problem", [
    ("train.seed=-1", "train.seed must be at least 0, got -1"),
    (f"train.seed={SEED_MAX + 1}", f"train.seed must be at most {SEED_MAX}, got {SEED_MAX + 1}"),
    ("model.backbone=nope", "model.backbone: unknown backbone 'nope'; known: "),
    ("model.backbone=timm:not_a_model", "model.backbone: timm:not_a_model: timm "),
])
def test_a_seed_or_backbone_no_run_can_use_is_refused_while_parsing(override, problem, tmp_path, capsys, monkeypatch, no_extraction):
    monkeypatch.chdir(tmp_path)  # nothing may be written: not even data/ or checkpoints/
    assert train.main(["--out", str(tmp_path / "run"), override]) == 2
    assert _error(capsys).startswith(f"error: override {override!r}: {problem}")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_and_a_timm_model_name_with_a_tag_are_taken():
    config = load_config(overrides=[f"train.seed={SEED_MAX}", "model.backbone=timm:resnet50.a1_in1k"])
    assert (config.train.seed, config.model.backbone) == (SEED_MAX, "timm:resnet50.a1_in1k")


@pytest.mark.parametrize("backbone, problem", [
    ("nope", "unknown backbone 'nope'"),
    ("timm:not_a_model", "timm:not_a_model: timm "),
])
def test_extract_features_refuses_an_unknown_backbone_as_a_usage_error(backbone, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        extract_features.main(["--dataset", "shapes", "--backbone", backbone, "--layers", "stage7", "--out", str(tmp_path / "f.h5")])
    assert stop.value.code == 2
    assert problem in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_key_given_by_two_overrides_is_refused_naming_both(tmp_path, capsys, monkeypatch, no_extraction):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", str(tmp_path / "run"), "train.epochs=2", "train.lr=0.1", "train.epochs=3"]) == 2
    assert _error(capsys) == "error: override 'train.epochs=3': train.epochs is already set by override 'train.epochs=2'; give it once"
    assert list(tmp_path.iterdir()) == []


def test_build_vocab_refuses_a_min_count_below_1_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        build_vocab.main(["--dataset", "shapes", "--min-count", "0", "--out", str(tmp_path / "vocab.json")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --min-count must be at least 1, got 0")


@pytest.fixture
def shapes_root(tmp_path: Path) -> Path:
    root = tmp_path / "shapes"
    generate_shapes(root, 0, {"train": 20, "val": 2, "test": 2})
    return root


def test_a_min_count_leaving_no_word_is_refused_before_any_extraction_or_training(shapes_root, tmp_path, capsys, monkeypatch, no_extraction):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert train.main(["--out", "run", "--data-root", str(shapes_root), "data.min_count=1000000"]) == 2
    line = _error(capsys)
    assert line.startswith("error: data.min_count 1000000 keeps 0 of the train split's ") and "lower data.min_count (at most " in line
    assert list(work.iterdir()) == []  # no vocabulary, no feature cache, no run folder


def test_build_vocab_refuses_a_min_count_leaving_no_word_and_writes_nothing(shapes_root, tmp_path, capsys):
    out = tmp_path / "vocab.json"
    assert build_vocab.main(["--dataset", "shapes", "--data-root", str(shapes_root), "--min-count", "1000000", "--out", str(out)]) == 2
    assert _error(capsys).startswith("error: --min-count 1000000 keeps 0 of the train split's ")
    assert not out.exists()


def _default_ctrl_c() -> None:
    """The child's Ctrl-C as a terminal gives it, even where the tests run in a background shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda entry: entry[-1])
def test_ctrl_c_while_an_entry_point_imports_is_one_line_and_status_2(entry):
    """SIGINT once the first module after ``sca_caption.errors`` is imported (``-X importtime``
    reports each import as it ends): the entry point is then in the middle of its imports, for the
    torch ones seconds before ``errors.command`` runs."""
    child = subprocess.Popen(
        [sys.executable, "-X", "importtime", *entry, "--help"], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_default_ctrl_c,
    )
    seen_errors, sent = False, False
    for line in child.stderr:
        module = line.rsplit("|", 1)[-1].strip() if line.startswith("import time:") else ""
        if seen_errors and module and module != "imported package":  # not the header line
            child.send_signal(signal.SIGINT)
            sent = True
            break
        seen_errors = seen_errors or module == "sca_caption.errors"
    rest = child.stderr.read()
    child.wait(timeout=60)
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert sent, "the entry point finished its imports before sca_caption.errors"
    assert (child.returncode, said) == (2, [INTERRUPTED]), rest[-3000:]


def test_a_ctrl_c_after_the_imports_is_the_command_s_again():
    """``errors.command`` takes Ctrl-C back from the import-time handler: a KeyboardInterrupt
    inside the command (which a command may catch to keep its work) again."""
    code = (
        "import os, signal, time\n"
        "from sca_caption.errors import command, exit_on_ctrl_c_until_command\n"
        "exit_on_ctrl_c_until_command()\n"
        "@command\n"
        "def main(argv):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT); time.sleep(10)\n"
        "    except KeyboardInterrupt:\n"
        "        print('kept', flush=True)\n"
        "        raise\n"
        "raise SystemExit(main([]))\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60, preexec_fn=_default_ctrl_c)
    assert (done.returncode, done.stdout, done.stderr) == (2, "kept\n", INTERRUPTED + "\n")
    assert time.monotonic() - started < 10
