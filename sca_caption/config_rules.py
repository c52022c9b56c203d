"""The rules between settings: every check a setting's type and range (field metadata, see
``field_ranges``) cannot state, each one small named function, all in ``RULES``.

A rule's parameters name the keys it reads, ``section_key`` for ``section.key`` (``train_scst_after``
reads ``train.scst_after``); it returns what is wrong, one line, or None. The config applies every
rule while parsing and names the file line or override of the keys that broke it; ``ModelConfig``
and ``DecodeSettings`` apply the rules of their own section when built, ``ExperimentConfig`` the
rest, so settings built in Python are held to the same rules. A new rule is one decorated function.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from sca_caption.models.decoder import DECODERS
from sca_caption.models.sca import KERNELS, ORDERS


@dataclass(frozen=True)
class Rule:
    """``check`` over the values of ``keys`` ("section.key", in its parameters' order)."""

    keys: tuple[str, ...]
    check: Callable[..., str | None]

    @property
    def sections(self) -> frozenset[str]:
        return frozenset(key.partition(".")[0] for key in self.keys)

    def problem(self, values: Mapping[str, Any]) -> str | None:
        """What ``values`` ({"section.key": value}, holding every key of the rule) break, or None."""
        return self.check(*(values[key] for key in self.keys))


RULES: list[Rule] = []


def rule(check: Callable[..., str | None]) -> Callable[..., str | None]:
    """Add ``check`` to ``RULES``, reading the keys its parameters name."""
    keys = tuple(name.replace("_", ".", 1) for name in inspect.signature(check).parameters)
    RULES.append(Rule(keys, check))
    return check


def rules_of(*sections: str) -> list[Rule]:
    """The rules that read keys of ``sections`` only."""
    return [r for r in RULES if r.sections <= set(sections)]


def first_problem(rules: list[Rule], values: Mapping[str, Any]) -> str | None:
    """The problem of the first of ``rules`` that ``values`` break, or None."""
    return next((p for r in rules if (p := r.problem(values)) is not None), None)


def section_values(section: str, settings: Any) -> dict[str, Any]:
    """{"section.key": value} of a settings dataclass."""
    return {f"{section}.{name}": value for name, value in vars(settings).items()}


# model: one section


@rule
def decoder_is_known(model_decoder: str) -> str | None:
    return _one_of("decoder", model_decoder, DECODERS)


@rule
def context_to_output_is_show_attend_tell(model_decoder: str, model_context_to_output: bool) -> str | None:
    if model_decoder == "updown" and not model_context_to_output:
        return "model config: context_to_output is Show-Attend-Tell's output layer; the updown decoder's reads h² only"
    return None


@rule
def kernels_are_known(model_kernels: str) -> str | None:
    return _one_of("kernels", model_kernels, KERNELS)


@rule
def order_is_known(model_order: str) -> str | None:
    return _one_of("order", model_order, ORDERS)


@rule
def one_to_three_layers(model_layers: tuple[str, ...]) -> str | None:
    if not 1 <= len(model_layers) <= 3:
        return f"model config: layers must name 1 to 3 taps; got {list(model_layers)}"
    return None


@rule
def widths_are_positive(model_attention_dim: int, model_hidden_dim: int, model_embed_dim: int) -> str | None:
    return _first_below(1, attention_dim=model_attention_dim, hidden_dim=model_hidden_dim, embed_dim=model_embed_dim)


@rule
def dropout_is_a_probability(model_dropout: float) -> str | None:
    if not 0.0 <= model_dropout < 1.0:
        return f"model config: dropout must be in [0, 1); got {model_dropout}"
    return None


@rule
def weights_are_not_negative(model_doubly_stochastic: float, model_num_tags: int, model_tag_loss_weight: float) -> str | None:
    return _first_below(0, doubly_stochastic=model_doubly_stochastic, num_tags=model_num_tags, tag_loss_weight=model_tag_loss_weight)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> str | None:
    """The problem of a model setting not among ``choices``, or None."""
    return None if value in choices else f"model config: {name} must be one of {', '.join(choices)}; got {value!r}"


def _first_below(bound: int, **values: float) -> str | None:
    """The problem of the first model setting in ``values`` below ``bound``, or None."""
    return next((f"model config: {name} must be >= {bound}; got {value}" for name, value in values.items() if value < bound), None)


@rule
def finetune_upper_has_stages_between_layers(model_finetune_upper: bool, model_layers: tuple[str, ...]) -> str | None:
    if model_finetune_upper and len(model_layers) < 2:
        return "model config: finetune_upper needs at least two layers (it trains the backbone stages between them)"
    return None


# decode: one section (its fields' ranges are in their metadata)


@rule
def alpha_is_the_wu_exponent(decode_alpha: float, decode_length_penalty: str) -> str | None:
    if decode_alpha and decode_length_penalty != "wu":
        return f"decoding settings: alpha {decode_alpha} needs length_penalty wu (it is the wu penalty's exponent)"
    return None


@rule
def wu_has_an_alpha(decode_length_penalty: str, decode_alpha: float) -> str | None:
    if decode_length_penalty == "wu" and not (decode_alpha > 0 and math.isfinite(decode_alpha)):
        return (
            "decoding settings: length_penalty wu needs a finite alpha above 0 (--length-alpha, decode.alpha), "
            f"got {decode_alpha}; at 0 it ranks as none"
        )
    return None


@rule
def n_best_within_the_beam(decode_n_best: int, decode_beam_size: int) -> str | None:
    if decode_n_best > decode_beam_size:
        return f"decoding settings: n_best ({decode_n_best}) must be at most beam ({decode_beam_size}), the beam_size"
    return None


@rule
def min_length_below_max_length(decode_min_length: int, decode_max_length: int | None) -> str | None:
    if decode_max_length is not None and decode_min_length >= decode_max_length:
        return min_length_problem(decode_min_length, decode_max_length)
    return None


def min_length_problem(min_length: int, max_length: int) -> str:
    return f"decoding settings: min_length ({min_length}) must be below max_length ({max_length}), the decoding steps with <end>"


# the experiment: across sections


@rule
def min_length_below_the_caption_steps(decode_min_length: int, data_max_length: int, decode_max_length: int | None) -> str | None:
    steps = data_max_length + 1  # ExperimentConfig.decoding_limit
    if decode_max_length is None and decode_min_length >= steps:
        return f"{min_length_problem(decode_min_length, steps)} (decode.max_length null: data.max_length + 1)"
    return None


@rule
def val_split_is_not_the_training_split(data_val_split: str, data_train_split: str) -> str | None:
    if data_val_split == data_train_split:
        return f"data.val_split is {data_train_split!r}, the training split: pick another split"
    return None


@rule
def test_split_is_not_the_training_split(data_test_split: str, data_train_split: str) -> str | None:
    if data_test_split == data_train_split:
        return f"data.test_split is {data_train_split!r}, the training split: pick another split"
    return None


@rule
def early_stop_metric_is_computed(train_early_stop_metric: str, train_meteor: bool, data_dataset: str) -> str | None:
    if train_early_stop_metric == "METEOR" and not train_meteor:
        return "train.early_stop_metric is METEOR but train.meteor is false"
    if train_early_stop_metric == "shapes_accuracy" and data_dataset != "shapes":
        return f"train.early_stop_metric shapes_accuracy needs the shapes dataset, not {data_dataset}"
    return None


@rule
def self_critical_starts_before_the_end(train_scst_after: int | None, train_epochs: int) -> str | None:
    if train_scst_after is not None and train_scst_after >= train_epochs:
        return f"train.scst_after is {train_scst_after}: it must be below train.epochs ({train_epochs})"
    return None


@rule
def label_smoothing_has_cross_entropy_epochs(train_label_smoothing: float, train_scst_after: int | None) -> str | None:
    if train_label_smoothing > 0 and train_scst_after == 0:
        return "train.label_smoothing smooths the cross-entropy epochs' loss, and train.scst_after 0 leaves none"
    return None


@rule
def upper_lr_scale_has_fine_tuned_stages(train_upper_lr_scale: float, model_finetune_upper: bool) -> str | None:
    if train_upper_lr_scale != 1.0 and not model_finetune_upper:
        return "train.upper_lr_scale is the learning rate of fine-tuned backbone stages: it needs model.finetune_upper true"
    return None


@rule
def mean_baseline_has_other_samples(train_scst_after: int | None, train_scst_baseline: str, train_scst_samples: int) -> str | None:
    if train_scst_after is not None and train_scst_baseline == "mean" and train_scst_samples < 2:
        return "train.scst_baseline mean needs train.scst_samples >= 2 (the mean of the other samples)"
    return None


@rule
def validations_counted_one_way(train_val_every: int | None, train_eval_every: int) -> str | None:
    if train_val_every is not None and train_eval_every != 1:
        return "train.val_every (steps between validations) and train.eval_every (epochs between them): set one"
    return None
