"""Typed experiment configuration, merged from defaults, YAML files and ``key=value`` overrides.

An experiment is four sections, each a dataclass: ``data`` (``DataConfig``), ``train``
(``TrainConfig``), ``model`` (``ModelConfig``, defined with the captioner) and ``decode``
(``DecodeSettings``, defined with beam search). ``load_config``
merges, later winning over earlier:

1. the dataclass defaults,
2. ``configs/<preset>.yaml`` (``preset`` is a file name such as ``shapes`` or ``flickr8k_gpu``),
3. an explicit YAML file,
4. overrides such as ``train.lr=1e-3`` or ``model.layers=[stage6,stage7]`` (values are YAML).

Every key and value is checked against the dataclass field it sets: an unknown key, a wrong type,
a value out of range (``min``, ``max``, ``below``, ``choices`` in the field's metadata), a backbone
the registry lacks, malformed YAML, or a section or key given twice (in one file, or by two
overrides) is a one-line ``ConfigError`` naming the file and line (or the override) and the key. Float fields also take numeric text, because YAML 1.1 (PyYAML) reads
``1e-3`` as a string. These checks run when loading (``load_config``, ``from_dict``), not when a
dataclass is built directly. Settings that cannot work together break a rule of ``config_rules``:
a ``ConfigError`` naming the file line or override that broke it (the dataclasses apply the same
rules when built). ``to_dict``/``from_dict`` convert to and from plain nested dicts
(lists, not tuples) for checkpoints.

The feature cache a run reads is built for ``model.backbone`` and ``model.layers``; ``data``
names only its path (``prepare.feature_cache_path``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, get_type_hints

import yaml

from sca_caption.data.corpus import SPLITS
from sca_caption.data.datasets import CORPORA
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import read_text
from sca_caption import config_rules
from sca_caption.config_rules import Rule, first_problem, section_values
from sca_caption.decoding import DecodeSettings
from sca_caption.errors import SCACaptionError
from sca_caption.field_ranges import Mismatch, coerce, out_of_range
from sca_caption.self_critical import BASELINES, LOG_PROBS
from sca_caption.io_utils import atomic_write_text
from sca_caption.models.backbones import check_backbone_name
from sca_caption.models.captioner import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EARLY_STOP_METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "loss", "shapes_accuracy")  # what validation computes
SCHEDULES = ("constant", "cosine", "step")
# the largest train.seed: numpy's and torch's generators take seeds of 0 to 2**32 - 1 and 2**64 - 1,
# and the dropout seed of a step (trainer.step_seed) stays below 2**64 from any 32-bit seed
SEED_MAX = 2**32 - 1


class ConfigError(SCACaptionError):
    """A configuration that cannot be used; the message is one line naming its source and key."""


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, how captions become token ids, and how batches are loaded."""

    dataset: str = field(default="shapes", metadata={"choices": CORPORA})
    data_root: str | None = None  # None: data/<dataset>
    train_split: str = field(default="train", metadata={"choices": SPLITS})
    val_split: str = field(default="val", metadata={"choices": SPLITS})
    test_split: str = field(default="test", metadata={"choices": SPLITS})
    min_count: int = field(default=5, metadata={"min": 1})  # a word's train-split count to get an id
    max_length: int = field(default=20, metadata={"min": 1})  # words kept per caption
    feature_cache: str | None = None  # HDF5 feature cache; None: see prepare.feature_cache_path
    backbone_weights: str = "imagenet"  # the feature cache's backbone weights: imagenet, none (seed-0 random) or a file
    batch_size: int = field(default=32, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, early stopping, logging and validation decoding."""

    epochs: int = field(default=20, metadata={"min": 1})
    lr: float = field(default=4e-4, metadata={"min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    schedule: str = field(default="cosine", metadata={"choices": SCHEDULES})
    warmup_steps: int = field(default=0, metadata={"min": 0})  # linear warm-up, any schedule
    decay_every: int = field(default=3, metadata={"min": 1})  # epochs between "step" decays
    decay_factor: float = field(default=0.8, metadata={"min": 0.0})  # lr multiplier of a "step" decay
    grad_clip: float | None = field(default=5.0, metadata={"min": 0.0})  # max gradient norm; None: off
    # ε of the cross-entropy epochs' word loss, (1 − ε)·(−log p_target) + ε·mean_k(−log p_k): their
    # logged train_loss; val_loss stays the plain cross-entropy
    label_smoothing: float = field(default=0.0, metadata={"min": 0.0, "below": 1.0})
    # learning rate of the fine-tuned backbone stages (model.finetune_upper) as a multiple of the rest's
    upper_lr_scale: float = field(default=1.0, metadata={"min": 0.0})
    patience: int | None = field(default=5, metadata={"min": 1})  # evaluations without gain; None: off
    early_stop_metric: str = field(default="CIDEr", metadata={"choices": EARLY_STOP_METRICS})
    bf16: bool = False  # bfloat16 autocast for the forward pass
    seed: int = field(default=0, metadata={"min": 0, "max": SEED_MAX})
    log_every: int = field(default=50, metadata={"min": 1})  # optimizer steps between log lines
    eval_every: int = field(default=1, metadata={"min": 1})  # epochs between validations
    meteor: bool = True  # METEOR in validation and test scores (each costs a ~6 s Java start)
    checkpoint_every: int | None = field(default=200, metadata={"min": 1})  # steps between mid-epoch last.pt saves; None: epoch ends only
    # self-critical training (sca_caption.self_critical) from epoch ``scst_after`` (0-based) on; None: off
    scst_after: int | None = field(default=None, metadata={"min": 0})
    scst_samples: int = field(default=5, metadata={"min": 1})  # sampled captions per image
    scst_baseline: str = field(default="greedy", metadata={"choices": BASELINES})
    scst_lr: float = field(default=5e-5, metadata={"min": 0.0})  # constant learning rate of the self-critical epochs
    # dropout of the self-critical epochs (0: sampling and the loss pass see one distribution); None: model.dropout
    scst_dropout: float | None = field(default=0.0, metadata={"min": 0.0, "below": 1.0})
    scst_reward_end: bool = False  # <end> a word of every candidate and reference in the CIDEr-D reward (sca_caption.rewards)
    # training images (the first, in corpus order) whose greedy captions' mean reward is logged at each
    # validation of a self-critical run (log.csv probe_reward); 0: none
    scst_probe_images: int = field(default=500, metadata={"min": 0})
    scst_images: int | None = field(default=None, metadata={"min": 1})  # images per self-critical step; None: data.batch_size
    # where the policy loss's log-probabilities come from: "teacher" (a teacher-forced pass over the
    # samples) or "sample" (the sampling pass itself, with gradient; one process only)
    scst_log_probs: str = field(default="teacher", metadata={"choices": LOG_PROBS})
    # weight of the reference captions' cross-entropy (per token) added to the self-critical loss; 0: none
    scst_xe_weight: float = field(default=0.0, metadata={"min": 0.0})
    # optimizer steps between validations (patience counts validations); None: at epoch ends (eval_every)
    val_every: int | None = field(default=None, metadata={"min": 1})


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "model": ModelConfig, "decode": DecodeSettings}

# Checks of a value beyond its field's type and range: each raises a one-line ValueError.
VALUE_CHECKS: dict[str, Callable[[Any], object]] = {"model.backbone": check_backbone_name}


# Keys added since the first checkpoints were written whose default is not what a run from before
# them did: the value that describes such a run (``recorded``).
EARLIER_VALUES: dict[str, Any] = {"train.scst_dropout": None}  # the self-critical epochs used model.dropout


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: ``data``, ``train``, ``model`` and ``decode`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeSettings = field(default_factory=DecodeSettings)

    def __post_init__(self) -> None:
        """The rules of ``config_rules`` between sections, and of the data and train sections."""
        values = {key: value for name in SECTIONS for key, value in section_values(name, getattr(self, name)).items()}
        problem = first_problem([r for r in config_rules.RULES if not (r.sections <= {"model"} or r.sections <= {"decode"})], values)
        if problem:
            raise ConfigError(f"experiment config: {problem}")

    @property
    def decoding_limit(self) -> int:
        """The decoding steps of settings that leave them unset (``decode.max_length`` null), and of
        self-critical sampling: the longest training caption's words plus ``<end>``."""
        return self.data.max_length + 1

    def decoding(self) -> DecodeSettings:
        """The ``decode`` settings as validation, ``evaluate``, ``caption`` and the service use
        them: a ``max_length`` of None is ``decoding_limit``."""
        return self.decode.with_max_length(self.decoding_limit)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists): safe for JSON, YAML and weights-only checkpoints."""
        return {name: {f.name: _plain(getattr(getattr(self, name), f.name)) for f in fields(cls)} for name, cls in SECTIONS.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config dict") -> ExperimentConfig:
        """Inverse of ``to_dict``, checked like a YAML file; missing keys take their defaults."""
        merged = _Merged()
        merged.add(values, source)
        return merged.build()


def recorded(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict a checkpoint recorded, as this version reads it: each key it lacks (added
    later) set to what the run did, its default or ``EARLIER_VALUES`` (the default for a
    self-critical key of a run without self-critical epochs); and the settings that did nothing
    then and are refused now dropped: an ``alpha`` without the wu penalty, the wu penalty at
    alpha 0 (read as none, the same ranking), ``finetune_upper`` with one attended layer; and
    the retired ``kernels: auto`` (the CPU kernels on a CPU) read as the default "plain", which
    computes the same numbers. Unknown sections and keys stay for ``from_dict`` to refuse."""
    out = {name: dict(section) if isinstance(section, Mapping) else section for name, section in values.items()}
    for name, cls in SECTIONS.items():
        section = out.setdefault(name, {})
        if not isinstance(section, Mapping):
            continue
        for spec in fields(cls):
            if spec.name not in section:
                default = _default(spec)
                earlier = EARLIER_VALUES.get(f"{name}.{spec.name}", default)
                if name == "train" and spec.name.startswith("scst_") and section.get("scst_after") is None:
                    earlier = default  # no self-critical epoch ran: the key changed nothing
                section[spec.name] = _plain(earlier)
    decode, model = out["decode"], out["model"]
    if isinstance(decode, dict) and _is_number(decode.get("alpha")):  # anything else is left to be refused
        if decode.get("length_penalty") == "wu" and decode["alpha"] == 0:
            decode["length_penalty"] = "none"  # the same ranking
        if decode.get("length_penalty") != "wu":
            decode["alpha"] = 0.0
    if isinstance(model, dict) and isinstance(model.get("layers"), (list, tuple)) and len(model["layers"]) < 2:
        if model.get("finetune_upper") is True:
            model["finetune_upper"] = False
    if isinstance(model, dict) and model.get("kernels") == "auto":
        model["kernels"] = "plain"
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_config(
    dataset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    config_dir: Path = CONFIG_DIR,
) -> ExperimentConfig:
    """Defaults < ``config_dir/<dataset>.yaml`` < ``config_file`` < ``overrides`` ("section.key=value",
    each key at most once)."""
    overrides = list(overrides)
    _refuse_repeated_overrides(overrides)
    merged = _Merged()
    if dataset is not None:
        preset = Path(config_dir) / f"{dataset}.yaml"
        if not preset.is_file():
            available = ", ".join(sorted(p.stem for p in Path(config_dir).glob("*.yaml"))) or "none"
            raise ConfigError(f"no config preset {dataset!r} in {config_dir} (presets: {available})")
        _add_yaml(merged, preset)
    if config_file is not None:
        _add_yaml(merged, Path(config_file))
    for item in overrides:
        merged.add(*_parse_override(item))
    return merged.build()


def write_config(path: str | Path, config: ExperimentConfig) -> None:
    """Write ``config`` as a YAML file ``load_config(config_file=path)`` reads back, atomically."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


class _Merged:
    """Checked values set so far, layer by layer, and where each one came from."""

    def __init__(self) -> None:
        # each add's checked values and their origins: {"train.lr": (1e-3, "configs/x.yaml:7")}
        self.layers: list[dict[str, tuple[Any, str]]] = []

    def add(self, layer: Any, source: str, lines: Mapping[str, int] | None = None) -> None:
        """Check ``layer`` ({section: {key: value}}) and let it win over what is there."""
        lines = lines or {}

        def at(key: str) -> str:
            return f"{source}:{lines[key]}" if key in lines else source

        added: dict[str, tuple[Any, str]] = {}
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}, got {_kind(layer)}")
        for section, entries in layer.items():
            if section not in SECTIONS:
                raise ConfigError(f"{at(str(section))}: unknown section {section!r}{_suggest(section, SECTIONS)} (sections: {', '.join(SECTIONS)})")
            if entries is None:
                continue
            if not isinstance(entries, Mapping):
                raise ConfigError(f"{at(section)}: section {section} must be a mapping of keys, got {_kind(entries)}")
            for key, value in entries.items():
                name = f"{section}.{key}"
                added[name] = (_checked(section, key, value, at(name)), at(name))
        self.layers.append(added)

    def values(self, layers: int | None = None) -> dict[str, Any]:
        """{"section.key": value}: the defaults with the first ``layers`` adds (None: all) over them."""
        values = {f"{name}.{spec.name}": _default(spec) for name, cls in SECTIONS.items() for spec in fields(cls)}
        for layer in self.layers[:layers]:
            values.update((name, value) for name, (value, _) in layer.items())
        return values

    def build(self) -> ExperimentConfig:
        """The experiment, or a ``ConfigError`` naming the first rule of ``config_rules`` it breaks
        and where the keys that broke it were set."""
        values = self.values()
        for rule in config_rules.RULES:
            problem = rule.problem(values)
            if problem:
                raise ConfigError(f"{self._blame(rule)}: {problem}")
        sections = {name: cls(**{f.name: values[f"{name}.{f.name}"] for f in fields(cls)}) for name, cls in SECTIONS.items()}
        return ExperimentConfig(**sections)

    def _blame(self, rule: Rule) -> str:
        """Where the add from which on ``rule`` stays broken set its keys: the first key that
        breaks it alone over the values before, else every key of the rule the add set."""
        breaking = len(self.layers)
        while breaking > 0 and rule.problem(self.values(breaking - 1)):
            breaking -= 1
        if breaking == 0:
            return "defaults"
        layer, before = self.layers[breaking - 1], self.values(breaking - 1)
        keys = [key for key in rule.keys if key in layer]
        alone = [key for key in keys if rule.problem({**before, key: layer[key][0]})]
        return ", ".join(dict.fromkeys(layer[key][1] for key in alone[:1] or keys))


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def _checked(section: str, key: Any, value: Any, where: str) -> Any:
    """``value`` fitted to the field ``section.key`` (see ``field_ranges.coerce``) and checked against its range."""
    specs = {f.name: f for f in fields(SECTIONS[section])}
    name = f"{section}.{key}"
    if key not in specs:
        raise ConfigError(f"{where}: unknown key {name}{_suggest(key, specs, section + '.')} ({section} keys: {', '.join(specs)})")
    try:
        checked = coerce(value, get_type_hints(SECTIONS[section])[key])
    except Mismatch as mismatch:
        raise ConfigError(f"{where}: {name} must be {mismatch}, got {value!r}") from None
    problem = out_of_range(checked, specs[key].metadata)
    if problem:
        raise ConfigError(f"{where}: {name} {problem}, got {checked!r}")
    if name in VALUE_CHECKS:
        try:
            VALUE_CHECKS[name](checked)
        except ValueError as error:
            raise ConfigError(f"{where}: {name}: {error}") from None
    return checked


def _add_yaml(merged: _Merged, path: Path) -> None:
    """Read one YAML file into ``merged``, with line numbers for its keys."""
    try:
        text = read_text(path, "config file")
    except DataError as error:
        raise ConfigError(f"{path}: cannot read the config file: {str(error).removeprefix(f'{path}: ')}") from None
    try:
        layer = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    merged.add({} if layer is None else layer, str(path), lines)


def _key_lines(root: yaml.Node | None, path: Path) -> dict[str, int]:
    """1-based line of each section ("train") and key ("train.lr") in a composed YAML document;
    a section or key given twice is a ``ConfigError`` naming both lines (YAML loaders keep the
    last one silently)."""
    lines: dict[str, int] = {}

    def add(name: str, node: yaml.Node, kind: str) -> None:
        line = node.start_mark.line + 1
        if name in lines:
            raise ConfigError(f"{path}:{line}: {kind} {name} given twice (first on line {lines[name]}); give it once")
        lines[name] = line

    if not isinstance(root, yaml.MappingNode):
        return lines
    for section_key, section_value in root.value:
        section = str(section_key.value)
        add(section, section_key, "section")
        if isinstance(section_value, yaml.MappingNode):
            for key, _ in section_value.value:
                add(f"{section}.{key.value}", key, "key")
    return lines


def _refuse_repeated_overrides(overrides: Iterable[str]) -> None:
    """A ``ConfigError`` naming both overrides where two set one key (which one was meant?)."""
    first: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in first:
            raise ConfigError(f"override {item!r}: {key} is already set by override {first[key]!r}; give it once")
        first[key] = item


def _parse_override(item: str) -> tuple[dict[str, dict[str, Any]], str]:
    """"train.lr=1e-3" -> ({"train": {"lr": "1e-3"}}, "override 'train.lr=1e-3'")."""
    source = f"override {item!r}"
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"{source}: expected section.key=value (sections: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: malformed value: {getattr(error, 'problem', None) or error}") from None
    return {parts[0]: {parts[1]: value}}, source


def _suggest(word: Any, choices: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else repr(value)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
