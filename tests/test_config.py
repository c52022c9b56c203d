"""Experiment config: merge order, override parsing, one-line errors, plain round trip, presets."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest

from sca_caption.config import (
    CONFIG_DIR,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
    load_config,
    recorded,
    write_config,
)
from sca_caption import config_rules
from sca_caption.models.backbones import build_backbone
from sca_caption.decoding import DecodeSettings, DecodingError, changed
from sca_caption.models.captioner import ModelConfig

PRESET = """\
# toy preset
train:
  lr: 0.1
  epochs: 7
model:
  hidden_dim: 64
"""
EXPLICIT = """\
train:
  lr: 0.2
data:
  batch_size: 8
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "toy.yaml").write_text(PRESET)
    (tmp_path / "explicit.yaml").write_text(EXPLICIT)
    return folder


def test_defaults_are_the_dataclass_defaults():
    assert load_config() == ExperimentConfig(DataConfig(), TrainConfig(), ModelConfig())


def test_precedence_defaults_preset_file_overrides(config_dir):
    explicit = config_dir.parent / "explicit.yaml"
    preset_only = load_config("toy", config_dir=config_dir)
    assert (preset_only.train.lr, preset_only.train.epochs, preset_only.model.hidden_dim) == (0.1, 7, 64)
    assert preset_only.data.batch_size == DataConfig().batch_size

    with_file = load_config("toy", explicit, config_dir=config_dir)
    assert (with_file.train.lr, with_file.train.epochs, with_file.data.batch_size) == (0.2, 7, 8)

    everything = load_config("toy", explicit, ["train.lr=0.3", "train.epochs=2"], config_dir=config_dir)
    assert (everything.train.lr, everything.train.epochs, everything.data.batch_size) == (0.3, 2, 8)
    assert everything.model.hidden_dim == 64
    # Keys nobody set keep their defaults.
    assert everything.decode.beam_size == DecodeSettings().beam_size
    assert everything.model.order == ModelConfig().order
    # Two overrides of one key are refused (issue #26.7: which one was meant?), not the last taken.
    with pytest.raises(ConfigError, match="train.seed is already set by override 'train.seed=1'"):
        load_config(overrides=["train.seed=1", "train.seed=2"])


@pytest.mark.parametrize(
    "override, section, key, value",
    [
        ("train.lr=1e-3", "train", "lr", 0.001),  # PyYAML reads 1e-3 as text
        ("train.lr=2", "train", "lr", 2.0),
        ("model.layers=[stage6,stage7]", "model", "layers", ("stage6", "stage7")),
        ("model.layers=[stage7]", "model", "layers", ("stage7",)),
        ("train.bf16=true", "train", "bf16", True),
        ("train.patience=null", "train", "patience", None),
        ("train.patience=", "train", "patience", None),
        ("train.grad_clip=0.5", "train", "grad_clip", 0.5),
        ("data.data_root=../shared/data/flickr8k", "data", "data_root", "../shared/data/flickr8k"),
        ("data.feature_cache=runs/a=b.h5", "data", "feature_cache", "runs/a=b.h5"),
        (" train.epochs = 3", "train", "epochs", 3),
        ("model.order=sc", "model", "order", "sc"),
    ],
)
def test_override_values_are_parsed_as_yaml(override, section, key, value):
    got = getattr(getattr(load_config(overrides=[override]), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=3", "override 'lr=3': expected section.key=value (sections: data, train, model, decode)"),
        ("train.lr", "override 'train.lr': expected section.key=value (sections: data, train, model, decode)"),
        ("train.lr.x=1", "override 'train.lr.x=1': expected section.key=value (sections: data, train, model, decode)"),
        ("trian.lr=1", "override 'trian.lr=1': unknown section 'trian' (did you mean train?) (sections: data, train, model, decode)"),
        ("train.lrr=1", "override 'train.lrr=1': unknown key train.lrr (did you mean train.lr?) (train keys: epochs, lr, "),
        ("train.lr=fast", "override 'train.lr=fast': train.lr must be a number, got 'fast'"),
        ("train.epochs=2.5", "override 'train.epochs=2.5': train.epochs must be an integer, got 2.5"),
        ("train.bf16=1", "override 'train.bf16=1': train.bf16 must be true or false, got 1"),
        ("train.epochs=0", "override 'train.epochs=0': train.epochs must be at least 1, got 0"),
        ("train.patience=0", "override 'train.patience=0': train.patience must be at least 1, got 0"),
        ("train.epochs=null", "override 'train.epochs=null': train.epochs must be an integer, got None"),
        ("train.schedule=linear", "override 'train.schedule=linear': train.schedule must be one of constant, cosine, step, got 'linear'"),
        ("data.dataset=flickr", "override 'data.dataset=flickr': data.dataset must be one of shapes, flickr8k, flickr30k, coco, got 'flickr'"),
        ("model.layers=stage7", "override 'model.layers=stage7': model.layers must be a list of strings, got 'stage7'"),
        ("model.layers=[stage7, 3]", "override 'model.layers=[stage7, 3]': model.layers must be a list of strings, got ['stage7', 3]"),
        ("train.lr=[1", "override 'train.lr=[1': malformed value: expected ',' or ']', but got '<stream end>'"),
        ("model.order=xy", "override 'model.order=xy': model config: order must be one of "),
        ("model.finetune_upper=true", "override 'model.finetune_upper=true': model config: finetune_upper needs at least two layers"),
        ("decode.alpha=1", "override 'decode.alpha=1': decoding settings: alpha 1.0 needs length_penalty wu"),
        ("decode.length_penalty=wu", "override 'decode.length_penalty=wu': decoding settings: length_penalty wu needs a finite alpha above 0"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_override_and_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(message), text


@pytest.mark.parametrize(
    "content, message",
    [
        ("train:\n  lr: 0.1\n  lrr: 0.2\n", "{file}:3: unknown key train.lrr (did you mean train.lr?)"),
        ("train:\n  epochs: many\n", "{file}:2: train.epochs must be an integer, got 'many'"),
        ("# header\n\nmodel:\n  order: s\n  layers: [a, b, c, d]\n  dropout: 1.5\n", "{file}:5: model config: layers must name 1 to 3 taps"),
        ("train:\n  lr: 0.1\n   epochs: 3\n", "{file}:3: malformed YAML: mapping values are not allowed here"),
        ("train: [1, 2\n", "{file}:2: malformed YAML: expected ',' or ']'"),
        ("optim:\n  lr: 0.1\n", "{file}:1: unknown section 'optim' (sections: data, train, model, decode)"),
        ("train: 3\n", "{file}:1: section train must be a mapping of keys, got 3"),
        ("- train\n- model\n", "{file}: expected a mapping with sections data, train, model, decode, got a list"),
        # YAML keeps the last of a repeated key silently (issue #26.7)
        ("train:\n  epochs: 2\nmodel:\n  dropout: 0.1\ntrain:\n  lr: 0.1\n", "{file}:5: section train given twice (first on line 1)"),
        ("train:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n", "{file}:4: key train.epochs given twice (first on line 2)"),
    ],
)
def test_bad_files_give_one_line_naming_file_line_and_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(message.format(file=path)), text


def test_model_error_names_the_source_of_the_offending_key(config_dir):
    with pytest.raises(ConfigError) as caught:
        load_config("toy", overrides=["model.order=s", "model.dropout=1.0"], config_dir=config_dir)
    assert str(caught.value) == "override 'model.dropout=1.0': model config: dropout must be in [0, 1); got 1.0"


def tag_head_is_wide_enough(model_num_tags: int, model_hidden_dim: int) -> str | None:
    """A rule on a combination of keys."""
    return "model config: a tag head needs hidden_dim >= 128" if model_num_tags > 0 and model_hidden_dim < 128 else None


def test_error_of_a_key_combination_names_the_keys_that_brought_it_in(config_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(config_rules, "RULES", list(config_rules.RULES))
    config_rules.rule(tag_head_is_wide_enough)
    with pytest.raises(ConfigError) as caught:  # the preset's hidden_dim 64 was fine until the override
        load_config("toy", overrides=["model.num_tags=5"], config_dir=config_dir)
    assert str(caught.value) == "override 'model.num_tags=5': model config: a tag head needs hidden_dim >= 128"
    one_file = tmp_path / "tags.yaml"  # neither key is wrong alone; the dropout line takes no part
    one_file.write_text("model:\n  dropout: 0.1\n  num_tags: 5\n  hidden_dim: 64\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=one_file)
    assert str(caught.value) == f"{one_file}:3, {one_file}:4: model config: a tag head needs hidden_dim >= 128"


def test_alpha_belongs_to_the_wu_penalty_and_a_change_of_penalty_drops_it():
    assert load_config(overrides=["decode.length_penalty=wu", "decode.alpha=1.5"]).decode.alpha == 1.5
    wu = DecodeSettings(length_penalty="wu", alpha=1.5)
    assert changed(wu, {"length_penalty": "average", "beam_size": None}) == DecodeSettings(length_penalty="average")
    assert changed(wu, {"beam_size": 5}) == DecodeSettings(beam_size=5, length_penalty="wu", alpha=1.5)
    assert changed(DecodeSettings(), {"length_penalty": "wu", "alpha": 0.5}).alpha == 0.5
    with pytest.raises(DecodingError, match="alpha 2.0 needs length_penalty wu"):
        changed(wu, {"length_penalty": "none", "alpha": 2.0})


def test_a_combination_check_does_not_take_the_blame_for_another_key():
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["model.layers=[stage6,stage7]", "model.finetune_upper=true", "model.kernels=xyz"])
    assert str(caught.value).startswith("override 'model.kernels=xyz': model config: kernels must be one of")


def test_a_combination_broken_by_a_later_override_names_that_override(tmp_path):
    settings = tmp_path / "wu.yaml"
    settings.write_text("decode:\n  length_penalty: wu\n  alpha: 0.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=settings, overrides=["decode.alpha=0"])
    assert str(caught.value).startswith("override 'decode.alpha=0': decoding settings: ")  # the file alone is valid
    with pytest.raises(ConfigError) as caught:  # a later override repeats the file's penalty: still the alpha's fault
        load_config(config_file=settings, overrides=["decode.alpha=0", "decode.length_penalty=wu"])
    assert str(caught.value).startswith("override 'decode.alpha=0': decoding settings: ")
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["decode.beam_size=5", "decode.length_penalty=wu"])  # alpha stays 0
    assert str(caught.value).startswith("override 'decode.length_penalty=wu': decoding settings: ")


def test_non_finite_numbers_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"override 'train.label_smoothing=.nan': train.label_smoothing must be a finite number"):
        load_config(overrides=["train.label_smoothing=.nan"])
    with pytest.raises(ConfigError, match=r"decode.alpha must be a finite number, got inf"):
        load_config(overrides=["decode.length_penalty=wu", "decode.alpha=.inf"])
    with pytest.raises(DecodingError, match="needs a finite alpha above 0"):
        DecodeSettings(length_penalty="wu", alpha=math.nan)


def test_a_recorded_config_reads_as_the_run_had_it():
    old = ExperimentConfig().to_dict()
    del old["train"]["upper_lr_scale"], old["train"]["scst_dropout"], old["model"]["kernels"]
    old["decode"].update(length_penalty="average", alpha=1.5)  # allowed then, changing nothing
    old["model"]["finetune_upper"] = True  # with one layer: nothing to fine-tune
    assert ExperimentConfig.from_dict(recorded(old)).train.scst_dropout == TrainConfig().scst_dropout  # no self-critical epoch
    old["train"]["scst_after"] = 1
    read = ExperimentConfig.from_dict(recorded(old))
    assert read.train.upper_lr_scale == 1.0 and read.model.kernels == ModelConfig().kernels
    assert read.train.scst_dropout is None  # the self-critical epochs used model.dropout before the key
    assert read.decode.alpha == 0.0 and read.model.finetune_upper is False
    assert recorded(ExperimentConfig().to_dict()) == ExperimentConfig().to_dict()
    old["decode"].update(length_penalty="wu", alpha=0.0)
    assert ExperimentConfig.from_dict(recorded(old)).decode == DecodeSettings()
    old["decode"].update(length_penalty="none", alpha="abc")  # malformed, not old: refused, not repaired
    with pytest.raises(ConfigError, match="decode.alpha must be a number, got 'abc'"):
        ExperimentConfig.from_dict(recorded(old))


def test_empty_file_and_empty_section_change_nothing(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    sections = tmp_path / "sections.yaml"
    sections.write_text("train:\nmodel:\n")
    assert load_config(config_file=empty) == load_config(config_file=sections) == ExperimentConfig()


def test_missing_preset_and_file(config_dir):
    with pytest.raises(ConfigError, match=r"^no config preset 'toys' in .* \(presets: toy\)$"):
        load_config("toys", config_dir=config_dir)
    missing = config_dir / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read the config file: "):
        load_config(config_file=missing)


def test_to_dict_is_plain_and_round_trips(tmp_path):
    config = load_config(overrides=["model.layers=[stage6,stage7]", "train.patience=null", "train.lr=3e-4"])
    plain = config.to_dict()
    assert plain["model"]["layers"] == ["stage6", "stage7"]
    assert json.loads(json.dumps(plain)) == plain  # nothing but JSON types, lists not tuples
    assert ExperimentConfig.from_dict(plain) == config
    path = tmp_path / "run" / "config.yaml"
    write_config(path, config)
    assert load_config(config_file=path) == config


def test_from_dict_checks_like_a_file():
    plain = ExperimentConfig().to_dict()
    plain["train"]["warmup"] = 10
    with pytest.raises(ConfigError, match=r"^runs/x/last.pt: unknown key train.warmup \(did you mean train.warmup_steps\?\)"):
        ExperimentConfig.from_dict(plain, source="runs/x/last.pt")
    # Keys absent from an older checkpoint take their defaults.
    assert ExperimentConfig.from_dict({"train": {"lr": 0.5}}).train == TrainConfig(lr=0.5)


@lru_cache(maxsize=None)
def backbone_taps(name: str):
    return build_backbone(name, weights=None)


PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_every_dataset_has_a_preset():
    assert {"shapes", "flickr8k", "flickr8k_gpu", "flickr30k", "coco"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_attend_real_taps(preset):
    path = CONFIG_DIR / f"{preset}.yaml"
    assert path.read_text().startswith(f"# {preset} ("), "header comment: '# <name> (<size>): what it is for'"
    config = load_config(preset)
    assert preset.split("_")[0] == config.data.dataset
    backbone = backbone_taps(config.model.backbone)
    backbone.cached_taps(config.model.layers)  # raises unless the layers are taps in forward order


def test_a_min_length_the_caption_length_leaves_no_room_for_is_refused_while_parsing(tmp_path):
    """Issue #26.9: refused by the config, naming the key's file and line, not after an epoch."""
    run = tmp_path / "train.yaml"
    run.write_text("data:\n  max_length: 29\ndecode:\n  min_length: 40\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=run)
    assert str(caught.value) == (
        f"{run}:4: decoding settings: min_length (40) must be below max_length (30), the decoding steps with <end> "
        "(decode.max_length null: data.max_length + 1)"
    )
    with pytest.raises(ConfigError, match=r"^override 'data.max_length=5': decoding settings: min_length \(6\)"):
        load_config(overrides=["decode.min_length=6", "data.max_length=5"])
    with pytest.raises(ConfigError, match=r"^override 'decode.min_length=9': decoding settings: min_length \(9\) must be below max_length \(9\)"):
        load_config(overrides=["decode.max_length=9", "decode.min_length=9"])
    with pytest.raises(ConfigError, match=r"decode.max_length must be at most 100, got 1000"):
        load_config(overrides=["decode.max_length=1000"])
    assert load_config(overrides=["decode.min_length=20"]).decoding().max_length == 21
