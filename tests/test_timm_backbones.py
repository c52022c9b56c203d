"""``timm:<name>`` backbones: taps from feature_info, splits, timm's own features, weights (no network)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file
from torch import Tensor

from sca_caption._timm import import_timm
from sca_caption.data.errors import DataError
from sca_caption.models.backbones import TappedBackbone, build_backbone, build_cache_backbone, check_backbone_name

# timm's tiny test models (~0.5M parameters each, built for 160 px): a ResNet, an EfficientNet
# (whose features timm gives through its own class unless asked otherwise), a ConvNeXt.
MODELS = ["test_resnet", "test_efficientnet", "test_convnext"]
SIZE = 64


@lru_cache(maxsize=3)
def _backbone(name: str) -> TappedBackbone:
    torch.manual_seed(0)
    return build_backbone(f"timm:{name}", weights=None).eval()


def _images(batch: int = 2) -> Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _timm_features(name: str, backbone: TappedBackbone) -> list[Tensor]:
    """timm's own feature extractor for ``name``, with ``backbone``'s weights, on ``_images()``."""
    timm = import_timm()
    extra = {"feature_cfg": {"flatten_sequential": True}} if name == "test_efficientnet" else {}
    reference = timm.create_model(name, features_only=True, **extra).eval()
    # strict: our stages hold exactly the extractor's modules, under the same names
    reference.load_state_dict({key.split(".body.", 1)[1]: value for key, value in backbone.stages.state_dict().items()})
    with torch.inference_mode():
        return reference(backbone.normalization(_images()))


@pytest.mark.parametrize("name", MODELS)
def test_taps_are_the_feature_info_and_the_features_are_timms(name: str) -> None:
    backbone = _backbone(name)
    with torch.device("meta"):
        feature_info = import_timm().create_model(name, features_only=True).feature_info
    expected = list(zip(feature_info.channels(), feature_info.reduction()))
    assert [(i.channels, i.stride) for i in backbone.tap_info.values()] == expected
    assert backbone.taps == tuple(m.replace(".", "_", 1) for m in feature_info.module_name())
    with torch.inference_mode():
        full = backbone(backbone.normalization(_images()))
    for tap, info in backbone.tap_info.items():
        assert full[tap].shape == (2, info.channels, SIZE // info.stride, SIZE // info.stride), tap
    for ours, theirs in zip(full.values(), _timm_features(name, backbone), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", MODELS)
def test_prefix_then_upper_chain_equals_the_full_forward(name: str) -> None:
    backbone = _backbone(name)
    images = _images()
    with torch.inference_mode():
        full = backbone(backbone.normalization(images))
    taps = backbone.taps
    for layers in [taps, taps[-2:], (taps[0], taps[-1]), (taps[1], taps[3])]:
        prefix, upper = backbone.split(layers)
        assert prefix.outputs == (layers[0],)  # timm stages read no earlier taps
        with torch.inference_mode():
            cached = prefix(images)
            assert torch.equal(cached[layers[0]], full[layers[0]])
            x = cached[layers[0]]
            for i in range(len(layers) - 1):
                x = upper(i, x, cached)
                torch.testing.assert_close(x, full[layers[i + 1]], rtol=1e-5, atol=1e-5)


def test_names_and_refused_models() -> None:
    assert check_backbone_name("timm:resnet50.a1_in1k") == "timm:resnet50.a1_in1k"
    for bad in ["timm:", "nosuch:resnet50", "resnet18"]:
        with pytest.raises(ValueError, match="timm:<model>"):
            check_backbone_name(bad)
    refused = {
        "timm:nosuch_net": "timm .* has no such model",
        "timm:test_vit": "FeatureGetterNet, not a chain of its modules",
        "timm:swin_tiny_patch4_window7_224": "its features are NHWC, not NCHW",
    }
    for name, problem in refused.items():
        with pytest.raises(ValueError, match=problem):
            build_backbone(name, weights=None)


def test_random_cache_backbone_is_seeded() -> None:
    one, two = (build_cache_backbone("timm:test_resnet", "none") for _ in range(2))
    prefix_one, _ = one.split(["layer4"])
    prefix_two, _ = two.split(["layer4"])
    assert prefix_one.fingerprint() == prefix_two.fingerprint()


def test_offline_hub_is_one_line_naming_the_download_and_the_file_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(import_timm().models._builder, "load_state_dict_from_hf", offline)
    with pytest.raises(DataError) as caught:
        build_backbone("timm:test_resnet")
    message = str(caught.value)
    assert "\n" not in message, message
    assert "https://huggingface.co/timm/test_resnet.r160_in1k" in message
    assert "LocalEntryNotFoundError" in message and "weights='/path/to/model.safetensors'" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_into_every_stage(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(3)
    source = import_timm().create_model("test_resnet").state_dict()
    path = tmp_path / f"model{suffix}"
    save_file(source, path) if suffix == ".safetensors" else torch.save(source, path)
    backbone = build_backbone("timm:test_resnet", weights=path)
    loaded = {key.split(".body.", 1)[1]: value for key, value in backbone.stages.state_dict().items()}
    assert loaded.keys() <= source.keys() and len(loaded) > 0
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key


def test_bad_weight_files_are_one_line_errors(tmp_path: Path) -> None:
    save_file(import_timm().create_model("test_convnext").state_dict(), tmp_path / "convnext.safetensors")
    (tmp_path / "text.pth").write_text("hello")
    cases = {
        tmp_path / "absent.pth": "weights file not found",
        tmp_path / "text.pth": "not timm:test_resnet weights",
        tmp_path / "convnext.safetensors": "not timm:test_resnet weights (Missing key(s) in state_dict",
    }
    for path, problem in cases.items():
        with pytest.raises(DataError) as caught:
            build_backbone("timm:test_resnet", weights=path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and problem in message, message
