"""The GPU configurations (paper-size ResNet-152 models) build and train one step on the CPU at
reduced widths, on randomly initialised backbones (no weights are downloaded)."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from sca_caption.config import load_config
from sca_caption.models.backbones import build_cache_backbone
from sca_caption.optimization import learning_rate
from sca_caption.trainer import build_model

GPU_CONFIGS = ("flickr8k_gpu", "flickr30k", "coco")
SMALL = ("model.hidden_dim=48", "model.attention_dim=24", "model.embed_dim=16")
VOCAB = 60
PAD = 0


@lru_cache(maxsize=None)
def _features(backbone: str, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Cached features of two images: uniform in [0, 1) (the scale of a trained backbone's ReLU
    outputs; a randomly initialised ResNet-152's grow to 1e8 and saturate every gate) in the
    shapes the real prefix gives a 224 px image."""
    prefix, _ = build_cache_backbone(backbone, "none").split(layers)
    with torch.no_grad():
        shapes = {tap: x.shape[1:] for tap, x in prefix.eval()(torch.zeros(1, 3, 224, 224)).items()}
    generator = torch.Generator().manual_seed(0)
    return {tap: torch.rand(2, *shape, generator=generator) for tap, shape in shapes.items()}


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_trains_one_step_on_the_cpu_at_reduced_widths(name: str) -> None:
    config = load_config(name, overrides=SMALL)  # its settings pass every rule of config_rules
    assert config.model.backbone == "resnet152" and config.train.bf16
    model = build_model(config, VOCAB, "none")
    features = _features(config.model.backbone, tuple(config.model.layers))
    assert set(model.feature_names) == set(features)
    # two captions of the configured length: <start>, max_length words, <end>; the second one
    # shorter, padded
    captions = torch.randint(4, VOCAB, (2, config.data.max_length + 2), generator=torch.Generator().manual_seed(0))
    captions[:, 0] = 1
    captions[1, 5:] = PAD
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate(0, config.train, 100), weight_decay=config.train.weight_decay)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.bf16):
        output = model(features, captions)
        loss = model.loss(output, captions, PAD).mean()
    assert output.logits.shape == (2, config.data.max_length + 1, VOCAB)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, trainable))  # every trained tensor moved
    assert frozen and all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
