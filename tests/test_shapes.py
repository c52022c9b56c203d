"""The built-in shapes dataset: determinism, captions that parse back to their scene, the accuracy
metric, the images against their scenes, and the make_shapes / build_vocab command lines."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sca_caption.data import shapes
from sca_caption.config import load_config
from sca_caption.data.datasets import load_corpus
from sca_caption.data.errors import DataError
from sca_caption.data.shapes import (
    COLOURS,
    Mention,
    ParsedCaption,
    Scene,
    Shape,
    caption_matches_scene,
    chain_relation,
    describe,
    generate_shapes,
    load_scenes,
    parse_caption,
    random_scene,
    relation_holds,
    shapes_accuracy,
)
from sca_caption.data.tokenize import tokenize
from sca_caption.data.vocab import Vocab
from sca_caption.prepare import load_records

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": 6, "val": 2, "test": 2}

RED_CIRCLE = Shape("circle", "red", "small", row=1, col=0, dx=0, dy=0)
BLUE_SQUARE = Shape("square", "blue", "large", row=1, col=2, dx=0, dy=0)
GREEN_TRIANGLE = Shape("triangle", "green", "small", row=0, col=2, dx=0, dy=0)
TWO = Scene((RED_CIRCLE, BLUE_SQUARE))
THREE = Scene((RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_and_each_image_depends_only_on_its_index(tmp_path: Path):
    first = files_of(generate_shapes(tmp_path / "a", seed=3, counts=TINY).parent)
    again = files_of(generate_shapes(tmp_path / "b", seed=3, counts=TINY).parent)
    assert first == again and len(first) == 11
    other_seed = json.loads(generate_shapes(tmp_path / "c", seed=4, counts=TINY).read_text())
    assert other_seed["images"] != json.loads(first["dataset_shapes.json"])["images"]
    fewer = files_of(generate_shapes(tmp_path / "d", seed=3, counts={"train": 2}).parent)
    assert fewer["images/train_00001.jpg"] == first["images/train_00001.jpg"]


def test_every_reference_caption_parses_back_to_its_scene(tmp_path: Path):
    json_path = generate_shapes(tmp_path, seed=0, counts=TINY)
    records = load_corpus("shapes", tmp_path)
    scenes = load_scenes(json_path)
    assert [sum(r.split == s for r in records) for s in ("train", "val", "test")] == [6, 2, 2]
    for k in range(5):
        assert shapes_accuracy({r.image_id: r.raw[k] for r in records}, scenes) == 1.0
    assert set(load_scenes(json_path, "val")) == {"val_00000", "val_00001"}


def test_captions_of_many_scenes_are_five_distinct_and_all_correct():
    rng = random.Random(0)
    first_words = set()
    for _ in range(300):
        scene = random_scene(rng)
        captions = describe(scene, rng)
        assert len(set(captions)) == 5
        for caption in captions:
            assert caption_matches_scene(parse_caption(tokenize(caption)), scene), caption
            first_words.add(tokenize(caption)[0])
    assert first_words == {"a", "an", "there"}


def test_captions_chain_the_shapes_in_reading_order_with_one_relation_each():
    # what a caption says must follow from the image and the words before it (see shapes._caption)
    rng = random.Random(1)
    for _ in range(300):
        scene = random_scene(rng)
        reading = sorted(scene.shapes, key=lambda shape: (shape.row, shape.col))
        for caption in describe(scene, rng):
            parsed = parse_caption(tokenize(caption))
            assert [(m.colour, m.kind) for m in parsed.mentions] == [(s.colour, s.kind) for s in reading], caption
            chain = [(i, chain_relation(reading[i], reading[i + 1]), i + 1) for i in range(len(reading) - 1)]
            assert list(parsed.relations) == chain, caption


def test_chain_relation_is_vertical_across_rows_and_horizontal_within_one():
    def at(row: int, col: int) -> Shape:
        return Shape("circle", "red", "small", row, col, 0, 0)

    assert chain_relation(at(0, 2), at(1, 0)) == "above"  # rows differ: columns do not matter
    assert chain_relation(at(2, 0), at(1, 1)) == "below"
    assert chain_relation(at(1, 0), at(1, 2)) == "left_of"
    assert chain_relation(at(1, 2), at(1, 1)) == "right_of"


def test_scenes_respect_the_grid_and_distinct_looks():
    rng = random.Random(1)
    for _ in range(200):
        scene = random_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        assert len({(s.row, s.col) for s in scene.shapes}) == len(scene.shapes)
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        for s in scene.shapes:  # every shape stays inside its own cell, so columns order x exactly
            x, y = s.centre()
            half = shapes.SIZES[s.size]
            assert s.col * shapes.CELL < x - half and x + half < (s.col + 1) * shapes.CELL
            assert s.row * shapes.CELL < y - half and y + half < (s.row + 1) * shapes.CELL
        assert Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene


def test_rendered_image_shows_each_shape_in_its_colour(tmp_path: Path):
    json_path = generate_shapes(tmp_path, seed=0, counts=TINY)
    for entry in json.loads(json_path.read_text())["images"]:
        image = Image.open(tmp_path / "images" / entry["filename"])
        assert image.size == (224, 224) and image.mode == "RGB"
        scene = Scene.from_json(entry["scene"])
        for s in scene.shapes:
            x, y = s.centre()
            pixel = image.getpixel((int(x), int(y)))
            assert max(abs(p - c) for p, c in zip(pixel, COLOURS[s.colour])) < 12, (s, pixel)
        empty = ({(r, c) for r in range(3) for c in range(3)} - {(s.row, s.col) for s in scene.shapes}).pop()
        centre = (int((empty[1] + 0.5) * shapes.CELL), int((empty[0] + 0.5) * shapes.CELL))
        assert max(abs(p - b) for p, b in zip(image.getpixel(centre), shapes.BACKGROUND)) < 8


def test_parse_caption_reads_mentions_relations_and_references():
    parsed = parse_caption(tokenize("A small red circle to the left of a large blue square."))
    assert parsed == ParsedCaption(
        (Mention("red", "circle", "small"), Mention("blue", "square", "large")), ((0, "left_of", 1),)
    )
    parsed = parse_caption(tokenize("There is a red circle and a green triangle is over the large blue square"))
    assert parsed is None  # "the" names a square never introduced
    start = "A picture of a blue square right of a red circle with a green triangle above "
    assert parse_caption(tokenize(start + "the square blue")) is None  # kind before colour
    parsed = parse_caption(tokenize(start + "the blue square"))
    assert parsed is not None and parsed.relations == ((0, "right_of", 1), (2, "above", 0))
    assert parse_caption(tokenize("a red circle left of a red circle and the red circle above a blue square")) is None


def test_relation_holds_by_grid_position():
    assert relation_holds(RED_CIRCLE, "left_of", BLUE_SQUARE) and relation_holds(BLUE_SQUARE, "right_of", RED_CIRCLE)
    assert not relation_holds(RED_CIRCLE, "above", BLUE_SQUARE) and not relation_holds(RED_CIRCLE, "below", BLUE_SQUARE)
    assert relation_holds(GREEN_TRIANGLE, "above", BLUE_SQUARE)
    assert not relation_holds(GREEN_TRIANGLE, "left_of", BLUE_SQUARE)


@pytest.mark.parametrize(
    "caption, right",
    [
        ("a red circle to the left of a blue square", True),
        ("a large blue square right of a small red circle.", True),
        ("a red circle to the left of a large green square", False),  # wrong colour
        ("a red triangle to the left of a blue square", False),  # wrong kind
        ("a red circle to the right of a blue square", False),  # wrong relation
        ("a red circle above a blue square", False),  # same row: not above
        ("a red circle and a blue square", False),  # no relation linking them
        ("a red circle", False),  # a shape missing
        ("a red circle left of a blue square and a green triangle above the blue square", False),  # one too many
        ("red circle blue square", False),  # does not parse
        ("", False),
    ],
)
def test_accuracy_of_single_captions_on_a_two_shape_scene(caption: str, right: bool):
    assert shapes_accuracy({"x": caption}, {"x": TWO}) == float(right)


def test_accuracy_on_three_shapes_needs_relations_that_link_all_of_them():
    scenes = {"x": THREE}
    linked = "a red circle left of a blue square and a green triangle above the blue square"
    unlinked = "a red circle left of a blue square and a green triangle"
    wrong = "a red circle left of a blue square and a green triangle below the blue square"
    assert shapes_accuracy({"x": linked}, scenes) == 1.0
    assert shapes_accuracy({"x": unlinked}, scenes) == 0.0
    assert shapes_accuracy({"x": wrong}, scenes) == 0.0


def test_accuracy_averages_over_scenes_and_counts_missing_captions_wrong():
    scenes = {"a": TWO, "b": Scene((RED_CIRCLE,)), "c": TWO, "d": TWO}
    captions = {"a": "a red circle left of a blue square", "b": "there is a small red circle", "c": "a blue circle"}
    assert shapes_accuracy(captions, scenes) == 0.5


def test_load_corpus_generates_shapes_only_at_the_default_root(tmp_path: Path, monkeypatch):
    real = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda root: real(root, seed=0, counts=TINY))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no shapes dataset in elsewhere/shapes: .*make it with `python preprocess/make_shapes.py --out elsewhere/shapes`"):
        load_corpus("shapes", Path("elsewhere") / "shapes")  # a mistyped data root: nothing is made
    assert list(tmp_path.iterdir()) == []
    records = load_corpus("shapes")
    assert len(records) == 10 and all(r.path.is_file() and len(r.raw) == 5 for r in records)
    assert records == load_corpus("shapes", Path("data") / "shapes")


def test_the_generator_writes_only_into_an_empty_folder_or_a_shapes_dataset(tmp_path: Path):
    other = tmp_path / "flickr8k"
    (other / "Flicker8k_Dataset").mkdir(parents=True)
    (other / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\n")
    with pytest.raises(DataError, match=r"flickr8k: holds 'Flicker8k_Dataset', so it is not a shapes dataset"):
        generate_shapes(other, seed=0, counts=TINY)
    assert sorted(p.name for p in other.iterdir()) == ["Flicker8k_Dataset", "Flickr8k.token.txt"]
    assert list((other / "Flicker8k_Dataset").iterdir()) == []
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(DataError, match="is a file, not a folder for the shapes dataset"):
        generate_shapes(tmp_path / "a_file", seed=0, counts=TINY)
    root = tmp_path / "shapes"
    generate_shapes(root, seed=0, counts=TINY)
    (root / "dataset_shapes.json").unlink()  # an unfinished dataset is finished
    generate_shapes(root, seed=1, counts=TINY)
    (root / "images" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(DataError, match="holds 'images', so it is not a shapes dataset"):
        generate_shapes(root, seed=0, counts=TINY)


def test_load_corpus_regenerates_a_dataset_of_an_older_generator_with_its_seed_and_counts(tmp_path: Path):
    root = tmp_path / "shapes"
    json_path = generate_shapes(root, seed=3, counts=TINY)
    current = load_corpus("shapes", root)
    old = json.loads(json_path.read_text())
    old["grammar"] = shapes.GRAMMAR - 1
    for image in old["images"]:
        for sentence in image["sentences"]:
            sentence["raw"], sentence["tokens"] = "An old caption.", ["an", "old", "caption"]
    json_path.write_text(json.dumps(old))
    lines: list[str] = []
    config = load_config("shapes", overrides=[f"data.data_root={root}"])
    assert load_records(config, log=lines.append) == current
    assert lines == [f"{json_path}: written by an older shapes generator; generating the dataset again"]
    assert json.loads(json_path.read_text())["grammar"] == shapes.GRAMMAR
    assert load_records(config, log=lines.append) == current and len(lines) == 1


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_make_shapes_and_build_vocab_run_as_scripts(tmp_path: Path):
    out = tmp_path / "shapes"
    made = run_script("preprocess/make_shapes.py", "--out", str(out), "--train", "8", "--val", "1", "--test", "1")
    assert made.returncode == 0, made.stderr
    assert "10 images (train 8, val 1, test 1)" in made.stdout
    vocab_file = tmp_path / "vocab.json"
    vocab_args = ["--out", str(vocab_file), "--min-count", "1"]
    built = run_script("preprocess/build_vocab.py", "--dataset", "shapes", "--data-root", str(out), *vocab_args)
    assert built.returncode == 0, built.stderr
    vocab = Vocab.load(vocab_file)
    train_words = {w for r in load_corpus("shapes", out) if r.split == "train" for t in r.tokens for w in t}
    assert set(vocab.words[4:]) == train_words
    missing = run_script("preprocess/build_vocab.py", "--dataset", "flickr8k", "--data-root", str(tmp_path / "none"), *vocab_args)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no flickr8k dataset in" in missing.stderr


def test_default_size_dataset_is_complete_and_all_references_score(tmp_path: Path):
    json_path = generate_shapes(tmp_path)
    records = load_corpus("shapes", tmp_path)
    assert [sum(r.split == s for r in records) for s in ("train", "val", "test")] == [4000, 200, 500]
    scenes = load_scenes(json_path)
    assert shapes_accuracy({r.image_id: r.raw[4] for r in records}, scenes) == 1.0
