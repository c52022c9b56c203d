"""Any timm model as a tapped backbone: ``build_backbone("timm:<name>", weights=...)``.

``<name>`` is a timm model name, optionally with a pretrained tag (``resnet50.a1_in1k``).

Taps are the model's ``feature_info``: one per entry, named after its module with the first dot
made an underscore (``act1``, ``layer1``..``layer4`` for a ResNet; ``blocks_0``, ``blocks_1``,
``blocks_2``, ``blocks_4``, ``blocks_6`` for an EfficientNet), with its channels and reduction.

Stages come from timm's ``FeatureListNet``: the model's top-level modules in registration order,
the first level of ``nn.Sequential`` containers flattened into it where a feature module lies
inside one, cut off after the last feature module. That chain is what the model computes only for
models timm itself extracts features from that way; so the model is first built on the meta
device with ``features_only=True``, and one that timm wraps in another feature class (ViTs'
``FeatureGetterNet``, hook- or graph-based extractors) or whose features are not NCHW is refused.
Stage i is the run of chain modules after tap i-1's module up to and including tap i's; stages
read no side inputs. timm's EfficientNet and MobileNetV3 families have their own feature classes
by default; asked for a ``feature_cfg`` they return the same features through a FeatureListNet
over their stem and blocks, so they are built that way.

Weights: ``None`` keeps timm's random init; ``"imagenet"`` is timm's default pretrained tag of the
name (or the tag given), downloaded from the Hugging Face hub (cached in ``$HF_HOME``); anything
else is a local weights file of the timm model (the hub's ``model.safetensors`` or
``pytorch_model.bin``, or a ``torch.save``d state dict), loaded strictly by timm. Normalisation
and input size are the pretrained config's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sca_caption._timm import import_timm
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import open_regular
from sca_caption.models.backbones.base import (
    IMAGENET as IMAGENET_NORMALIZATION,
    Normalization,
    Plain,
    TapInfo,
    TappedBackbone,
    register_backbone_family,
)
from sca_caption.errors import first_line
from sca_caption.models.backbones.weights import IMAGENET, WeightsSpec

# timm module families whose default feature class is their own but a FeatureListNet on request.
BLOCK_FAMILIES = ("efficientnet", "mobilenetv3")


@dataclass(frozen=True)
class FeatureLayout:
    """How timm reads a model's features as a chain of its modules (see the module docstring)."""

    out_indices: tuple[int, ...]
    flatten_sequential: bool


def check_model_name(name: str) -> None:
    """A one-line ValueError unless timm has a model ``name`` (a pretrained tag allowed)."""
    timm = import_timm()
    if not timm.models.is_model(name):
        raise ValueError(f"timm:{name}: timm {timm.__version__} has no such model (see timm.list_models())")


def feature_layout(name: str) -> FeatureLayout:
    """The FeatureListNet layout of timm model ``name``, from a build on the meta device (no
    weights, no memory); ValueError where such a chain is not how the model computes its features."""
    check_model_name(name)
    timm = import_timm()
    extra = {"feature_cfg": {"flatten_sequential": True}} if timm.models.is_model_in_modules(name, BLOCK_FAMILIES) else {}
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, features_only=True, **extra)
    if not isinstance(probe, timm.models.FeatureDictNet):
        raise ValueError(
            f"timm:{name}: timm extracts its features with a {type(probe).__name__}, not a chain of its "
            "modules (FeatureListNet), so it cannot be split into stages"
        )
    if probe.output_fmt != "NCHW":
        raise ValueError(f"timm:{name}: its features are {probe.output_fmt.value}, not NCHW")
    flatten = any("." in module for module in probe.feature_info.module_name())
    return FeatureLayout(tuple(probe.feature_info.out_indices), flatten)


def tapped_stages(chain: Any) -> list[tuple[TapInfo, Plain]]:
    """A FeatureListNet's modules grouped into one stage per feature tap, in forward order."""
    stages: list[tuple[TapInfo, Plain]] = []
    run: OrderedDict[str, nn.Module] = OrderedDict()
    for module_name, module in chain.items():
        run[module_name] = module
        if module_name in chain.return_layers:
            info = chain.feature_info.info[int(chain.return_layers[module_name])]
            stages.append((TapInfo(module_name, info["num_chs"], info["reduction"]), Plain(nn.Sequential(run))))
            run = OrderedDict()
    return stages


def create_model(name: str, weights: WeightsSpec) -> nn.Module:
    """timm model ``name`` (classifier included) with ``weights``; every failure is a one-line
    DataError naming where the weights were to come from."""
    timm = import_timm()
    if weights is None:
        return timm.create_model(name, pretrained=False)
    if isinstance(weights, str) and weights == IMAGENET:
        where, filename = _download_source(timm, name)
        try:
            return timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError) as err:  # an unreachable hub or URL raises OSErrors
            raise DataError(
                f"timm:{name}: could not download its pretrained weights from {where} ({first_line(err)}); "
                f"fetch {filename} from there elsewhere and pass weights='/path/to/{filename}'"
            ) from None
    path = Path(weights)
    open_regular(path, "weights file").close()  # timm reads it by name: refuse a missing or special file first
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except Exception as err:  # safetensors, torch.load and load_state_dict each raise their own types
        raise DataError(f"{path}: not timm:{name} weights ({_first_problem(err)})") from None


def _download_source(timm: Any, name: str) -> tuple[str, str]:
    """Where timm downloads the pretrained weights of ``name`` from, and the file to fetch there."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}", "model.safetensors"
    if cfg is not None and cfg.url:
        return cfg.url, cfg.url.rsplit("/", 1)[-1]
    raise DataError(f"timm:{name}: timm has no pretrained weights for it; pass weights=None or a weights file")


def _first_problem(err: BaseException) -> str:
    """``load_state_dict``'s first listed problem (its first line only says that there are some)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1][:200]
    return first_line(err)


def normalization(model: nn.Module) -> Normalization:
    """The pretrained config's input normalisation (``IMAGENET`` where it is that one)."""
    cfg = model.pretrained_cfg
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    if (mean, std) == (IMAGENET_NORMALIZATION.mean, IMAGENET_NORMALIZATION.std):
        return IMAGENET_NORMALIZATION
    return Normalization("timm", mean, std)  # type: ignore[arg-type]


@register_backbone_family("timm", check_model=check_model_name)
def timm_backbone(name: str, weights: WeightsSpec = IMAGENET) -> TappedBackbone:
    """timm model ``name`` cut at its feature taps; ``weights``: "imagenet" (hub), None or a file."""
    layout = feature_layout(name)
    model = create_model(name, weights)
    chain = import_timm().models.FeatureListNet(
        model, out_indices=layout.out_indices, flatten_sequential=layout.flatten_sequential
    )
    return TappedBackbone(f"timm:{name}", tapped_stages(chain), normalization(model), model.pretrained_cfg["input_size"][-1])
