"""The built-in "shapes" dataset: generated scenes of coloured shapes, captioned from a small grammar.

Each 224x224 image holds one to three shapes (circle, square, triangle in six colours, small or
large), each in its own cell of a 3x3 grid, so "left of" (smaller column) and "above" (smaller
row) are never in doubt. Captions name the shapes in reading order (row, then column) and chain
them: each shape is related to the next, vertically ("above") when they are in different rows,
horizontally ("to the left of") when they share one. Five captions per image vary the wording and
sizes, e.g. "A small red circle to the left of a large blue square." or "There is a green triangle
above an orange circle and the orange circle is left of a small blue square." Colour is what
channel attention should pick and position what spatial attention should find. Everything is a
function of the seed.

The grammar (on tokens) is the one ``parse_caption`` reads back:

    caption  := [an image of | a picture of] clause ((and | with) clause)*
    clause   := [there is] mention [[is] relation mention]
    mention  := (a | an | the) [size] colour kind      ("the" names an earlier mention)
    relation := [to the] left of | [to the] right of | above | over | below | under | beneath
"""

from __future__ import annotations

import itertools
import random
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw

from sca_caption.data.corpus import SPLITS
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import read_json
from sca_caption.data.tokenize import tokenize
from sca_caption.errors import first_line
from sca_caption.io_utils import OutputError, atomic_write_json

DATASET_FILE = "dataset_shapes.json"
GRAMMAR = 4  # version of the generator (captions and drawing), kept in the dataset file; a file of another is stale
IMAGE_FOLDER = "images"
IMAGE_NAME = re.compile(r"(train|val|test)_\d{5,}\.jpg|\..*\.tmp")  # the generator's files and temporaries
DEFAULT_COUNTS = {"train": 4000, "val": 200, "test": 500}
CAPTIONS_PER_IMAGE = 5

IMAGE_SIZE = 224
GRID = 3
CELL = IMAGE_SIZE / GRID
BACKGROUND = (30, 30, 30)
KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
}
SIZES = {"small": 18, "large": 28}  # half the shape's width, in pixels: a small shape spans more than one stride-32 feature cell
MARGIN = 3  # pixels kept free between a shape and its cell's border

RELATION_PHRASES = {
    "left_of": (("to", "the", "left", "of"), ("left", "of")),
    "right_of": (("to", "the", "right", "of"), ("right", "of")),
    "above": (("above",), ("over",)),
    "below": (("below",), ("under",), ("beneath",)),
}
PREFIXES = (("an", "image", "of"), ("a", "picture", "of"))


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour, size, grid cell (row 0 = top, col 0 = left) and pixel offset in the cell."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    dx: int
    dy: int

    def centre(self) -> tuple[float, float]:
        """(x, y) of the shape's centre in pixels."""
        return (self.col + 0.5) * CELL + self.dx, (self.row + 0.5) * CELL + self.dy


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: its shapes, at most one per grid cell and per (colour, kind)."""

    shapes: tuple[Shape, ...]

    def to_json(self) -> dict[str, Any]:
        return {"shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, obj: Any) -> Scene:
        """The inverse of ``to_json``; raises ``ValueError`` on anything else."""
        try:
            shapes = tuple(Shape(**s) for s in obj["shapes"])
        except (TypeError, KeyError) as err:
            raise ValueError(f"not a shapes scene ({err})") from None
        return cls(shapes)


def relation_holds(a: Shape, relation: str, b: Shape) -> bool:
    """Whether ``a`` is ``relation`` (left_of, right_of, above, below) ``b``."""
    return {
        "left_of": a.col < b.col,
        "right_of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def random_scene(rng: random.Random) -> Scene:
    """One to three shapes in distinct cells with distinct (colour, kind) pairs."""
    count = rng.randint(1, 3)
    cells = rng.sample(range(GRID * GRID), count)
    looks = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    shapes = []
    for cell, (colour, kind) in zip(cells, looks):
        size = rng.choice(tuple(SIZES))
        slack = int(CELL / 2 - SIZES[size] - MARGIN)
        row, col = divmod(cell, GRID)
        shapes.append(Shape(kind, colour, size, row, col, rng.randint(-slack, slack), rng.randint(-slack, slack)))
    return Scene(tuple(shapes))


def render_scene(scene: Scene) -> Image.Image:
    """The scene drawn as a 224x224 RGB image."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y = shape.centre()
        h = SIZES[shape.size]
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon(((x, y - h), (x + h, y + h), (x - h, y + h)), fill=fill)
    return image


def describe(scene: Scene, rng: random.Random, count: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` captions of the scene, distinct where the grammar allows that many."""
    captions: list[str] = []
    for _ in range(50 * count):
        caption = _caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            return captions
    return [captions[i % len(captions)] for i in range(count)]


def _caption(scene: Scene, rng: random.Random) -> str:
    """One random caption from the grammar: every shape mentioned, relations linking them all.

    The words are a function of the scene up to wording and sizes: shapes come in reading order
    (row, then column), each related to the next by ``chain_relation``, the third clause opening
    on the shape just named ("... a blue square and the blue square is above ..."). So which shape
    the next word describes, and which relation holds, follow from the image and the words before
    it. (With a free mention order or a random choice among true relations they do not, and
    attention driven by h_{t-1}, as in SCA-CNN, learns to hedge instead of where to look.)
    """
    order = sorted(scene.shapes, key=lambda shape: (shape.row, shape.col))
    prefix = rng.choice(((), ("there", "is"), *PREFIXES))
    verb = () if prefix else rng.choice(((), ("is",)))
    if len(order) == 1:
        words = [*prefix, *_mention(order[0], rng, definite=False)]
    else:
        words = [*prefix, *_relation_clause(order[0], order[1], rng, verb, new=(True, True))]
    if len(order) == 3:
        words += ["and", *_relation_clause(order[1], order[2], rng, ("is",), new=(False, True))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def chain_relation(a: Shape, b: Shape) -> str:
    """The relation a caption states between consecutive shapes ``a``, ``b``: the vertical one
    when their rows differ, else the horizontal one."""
    if a.row != b.row:
        return "above" if a.row < b.row else "below"
    return "left_of" if a.col < b.col else "right_of"


def _relation_clause(
    a: Shape, b: Shape, rng: random.Random, verb: tuple[str, ...], new: tuple[bool, bool]
) -> list[str]:
    """"a <relation> b" in one of the phrasings of ``chain_relation(a, b)``. ``new``: whether a, b
    are first mentioned here ("a ...") or named again ("the ...")."""
    phrase = rng.choice(RELATION_PHRASES[chain_relation(a, b)])
    return [*_mention(a, rng, not new[0]), *verb, *phrase, *_mention(b, rng, not new[1])]


def _mention(shape: Shape, rng: random.Random, definite: bool) -> list[str]:
    """"a small red circle", "an orange square", "the blue triangle", ..."""
    words = [shape.size] if rng.random() < (0.3 if definite else 0.6) else []
    words += [shape.colour, shape.kind]
    article = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    return [article, *words]


@dataclass(frozen=True)
class Mention:
    """A shape named in a caption (size None where the caption leaves it out)."""

    colour: str
    kind: str
    size: str | None


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says: the shapes it names and ``(i, relation, j)`` between mention indices."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]


def parse_caption(tokens: Sequence[str]) -> ParsedCaption | None:
    """The caption read with the grammar in the module docstring, or None if it does not parse."""
    return _Parser(tokens).caption()


class _Parser:
    """Recursive descent over the token list; each rule returns None (or False) on no match."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = tuple(tokens)
        self.at = 0
        self.mentions: list[Mention] = []
        self.relations: list[tuple[int, str, int]] = []

    def accept(self, words: Sequence[str]) -> bool:
        if self.tokens[self.at : self.at + len(words)] == tuple(words):
            self.at += len(words)
            return True
        return False

    def caption(self) -> ParsedCaption | None:
        for prefix in PREFIXES:
            if self.accept(prefix):
                break
        if not self.clause():
            return None
        while self.at < len(self.tokens):
            if not (self.accept(("and",)) or self.accept(("with",))) or not self.clause():
                return None
        return ParsedCaption(tuple(self.mentions), tuple(self.relations))

    def clause(self) -> bool:
        self.accept(("there", "is"))
        subject = self.mention()
        if subject is None:
            return False
        verb = self.accept(("is",))
        relation = self.relation()
        if relation is None:
            return not verb
        target = self.mention()
        if target is None:
            return False
        self.relations.append((subject, relation, target))
        return True

    def relation(self) -> str | None:
        for name, phrases in RELATION_PHRASES.items():
            if any(self.accept(phrase) for phrase in phrases):
                return name
        return None

    def mention(self) -> int | None:
        """Index of the mention just read: a new one for a/an, the one earlier mention it names for "the"."""
        words = self.tokens[self.at : self.at + 4]
        if not words or words[0] not in ("a", "an", "the"):
            return None
        size = words[1] if len(words) > 1 and words[1] in SIZES else None
        colour_kind = words[2:4] if size else words[1:3]
        if len(colour_kind) < 2 or colour_kind[0] not in COLOURS or colour_kind[1] not in KINDS:
            return None
        self.at += 4 if size else 3
        mention = Mention(colour_kind[0], colour_kind[1], size)
        if words[0] != "the":
            self.mentions.append(mention)
            return len(self.mentions) - 1
        earlier = [i for i, m in enumerate(self.mentions) if _may_name_same_shape(m, mention)]
        return earlier[0] if len(earlier) == 1 else None


def _may_name_same_shape(a: Mention, b: Mention) -> bool:
    """Same colour and kind, and no size conflict (a missing size matches any)."""
    return (a.colour, a.kind) == (b.colour, b.kind) and (a.size is None or b.size is None or a.size == b.size)


def caption_matches_scene(caption: ParsedCaption | None, scene: Scene) -> bool:
    """Whether the caption names exactly the scene's shapes by colour and kind (as a multiset) and,
    for two or more shapes, states relations that link them all and all hold. Sizes are not scored."""
    if caption is None:
        return False
    shapes = scene.shapes
    looks = sorted((m.colour, m.kind) for m in caption.mentions)
    if looks != sorted((s.colour, s.kind) for s in shapes):
        return False
    if len(shapes) > 1 and not _links_all(len(shapes), caption.relations):
        return False
    for assignment in itertools.permutations(shapes):
        same_looks = all((m.colour, m.kind) == (s.colour, s.kind) for m, s in zip(caption.mentions, assignment))
        if same_looks and all(relation_holds(assignment[i], rel, assignment[j]) for i, rel, j in caption.relations):
            return True
    return False


def _links_all(count: int, relations: Sequence[tuple[int, str, int]]) -> bool:
    """Whether the relations, as undirected edges, connect all ``count`` mentions."""
    reached = {0}
    frontier = [0]
    while frontier:
        node = frontier.pop()
        for i, _, j in relations:
            for a, b in ((i, j), (j, i)):
                if a == node and b not in reached:
                    reached.add(b)
                    frontier.append(b)
    return len(reached) == count


def shapes_accuracy(captions: Mapping[str, str], scenes: Mapping[str, Scene]) -> float:
    """Share of the scenes' images whose caption (raw text) matches the scene; a missing caption is wrong."""
    if not scenes:
        raise ValueError("shapes_accuracy needs at least one scene")
    correct = sum(
        image_id in captions and caption_matches_scene(parse_caption(tokenize(captions[image_id])), scene)
        for image_id, scene in scenes.items()
    )
    return correct / len(scenes)


def load_scenes(json_path: Path, split: str | None = None) -> dict[str, Scene]:
    """Image id -> ground-truth scene, from a ``dataset_shapes.json`` (one split, or all)."""
    data = read_json(json_path)
    scenes = {}
    try:
        for index, entry in enumerate(data["images"]):
            if split is None or entry["split"] == split:
                scenes[Path(entry["filename"]).stem] = Scene.from_json(entry["scene"])
    except (TypeError, KeyError, ValueError) as err:
        raise DataError(f"{json_path}: not a shapes dataset file ({type(err).__name__}: {err})") from None
    return scenes


def generate_shapes(out_dir: Path, seed: int = 0, counts: Mapping[str, int] = DEFAULT_COUNTS) -> Path:
    """Write the images and ``dataset_shapes.json`` (Karpathy format plus a ``scene`` per image) into
    ``out_dir``; returns the JSON's path. Image i of a split depends only on (seed, split, i).
    The JSON is written last, atomically, so its presence means the dataset is complete. Only an
    empty or absent folder, or one holding a (possibly unfinished) shapes dataset, is written into."""
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected some of {SPLITS}")
    check_shapes_folder(Path(out_dir))
    image_dir = Path(out_dir) / IMAGE_FOLDER
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for split in SPLITS:
        for i in range(counts.get(split, 0)):
            rng = random.Random(f"shapes/{seed}/{split}/{i}")
            scene = random_scene(rng)
            filename = f"{split}_{i:05d}.jpg"
            _save_image(render_scene(scene), image_dir / filename)
            imgid = len(entries)
            sentences = [
                {"raw": raw, "tokens": list(tokenize(raw)), "imgid": imgid, "sentid": imgid * CAPTIONS_PER_IMAGE + k}
                for k, raw in enumerate(describe(scene, rng))
            ]
            entries.append(
                {
                    "filename": filename,
                    "filepath": IMAGE_FOLDER,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "sentids": [s["sentid"] for s in sentences],
                    "scene": scene.to_json(),
                }
            )
    json_path = Path(out_dir) / DATASET_FILE
    dataset = {"dataset": "shapes", "grammar": GRAMMAR, "seed": seed, "counts": dict(counts), "images": entries}
    atomic_write_json(json_path, dataset, indent=None)
    return json_path


def _save_image(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a JPEG; a failed write (a full disk) is one ``OutputError`` line and
    leaves no partial file."""
    try:
        image.save(path, format="JPEG", quality=95, subsampling=0)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise OutputError(f"{path}: not written ({first_line(err)})") from None


def how_to_make(data_root: Path, default_root: Path) -> str:
    """The end of a "no shapes dataset in ``data_root``" error: the ``make_shapes`` command for
    ``data_root`` where the generator may write, else for ``default_root`` (``data_root`` holds
    other files: another dataset's folder, perhaps shared and read-only, is never advised)."""
    command = "`python preprocess/make_shapes.py --out {}`"
    try:
        check_shapes_folder(data_root)
    except DataError:
        return (
            f"{data_root} holds other files (another dataset?), so the shapes dataset does not go there: make it "
            f"in a folder of its own with {command.format(shlex.quote(str(default_root)))} and use that data root"
        )
    return f"make it with {command.format(shlex.quote(str(data_root)))}"


def check_shapes_folder(folder: Path) -> None:
    """Refuse (``DataError``) a ``folder`` that holds anything but a shapes dataset, finished or not."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, not a folder for the shapes dataset")
    try:
        entries = sorted(folder.iterdir())
        images = sorted((folder / IMAGE_FOLDER).iterdir()) if (folder / IMAGE_FOLDER).is_dir() else []
    except OSError as err:
        raise DataError(f"{folder}: cannot list the folder ({first_line(err)})") from None
    for entry in entries:
        if entry.name == DATASET_FILE or IMAGE_NAME.fullmatch(entry.name):
            continue
        if entry.name == IMAGE_FOLDER and entry.is_dir() and all(IMAGE_NAME.fullmatch(p.name) for p in images):
            continue
        raise DataError(
            f"{folder}: holds {entry.name!r}, so it is not a shapes dataset; the shapes generator writes only "
            "into an empty folder or a shapes dataset"
        )


def stale_dataset(json_path: Path) -> dict[str, Any] | None:
    """The ``seed`` and ``counts`` of a dataset file written by another version of this generator
    (``GRAMMAR``; to generate it again with), None when the file is current or absent."""
    if not Path(json_path).exists():
        return None
    data = read_json(json_path)
    if isinstance(data, dict) and data.get("grammar") == GRAMMAR:
        return None
    try:
        return {"seed": int(data["seed"]), "counts": {k: int(v) for k, v in data["counts"].items()}}
    except (TypeError, KeyError, ValueError, AttributeError):
        raise DataError(f"{json_path}: not a shapes dataset file (no seed and counts); delete it to generate one") from None
