"""The captioner: shapes, teacher forcing equal to step-by-step decoding, gradients, loss, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_backbone import NAME, build_tiny_backbone, tiny_features

from sca_caption.decoding import beam_search
from sca_caption.models.captioner import CaptionState, ModelConfig, SCACaptioner
from sca_caption.models.decoder import DECODERS
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import ORDERS
from sca_caption.optimization import make_optimizer, optimizer_step, set_learning_rate

VOCAB, PAD, START, END = 11, 0, 1, 2
DEPTHS = [("conv3",), ("conv3", "conv4"), ("conv3", "conv4", "conv5")]
SIZES = {"conv3": (8, 16), "conv4": (6, 16), "conv5": (10, 4)}  # channels, locations


def config(layers: tuple[str, ...] = ("conv3", "conv4"), order: str = "cs", **overrides: object) -> ModelConfig:
    settings = dict(backbone=NAME, layers=layers, order=order, attention_dim=5, hidden_dim=7, embed_dim=6, dropout=0.3)
    settings.update(overrides)
    return ModelConfig(**settings)


def build(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> SCACaptioner:
    torch.manual_seed(seed)
    return SCACaptioner(cfg, VOCAB, build_tiny_backbone()).to(dtype)


def captions(batch: int = 3, length: int = 6, seed: int = 2) -> torch.Tensor:
    """<start> w w ... with a padded tail on the last row."""
    torch.manual_seed(seed)
    caps = torch.randint(3, VOCAB, (batch, length))
    caps[:, 0] = START
    caps[-1, -2:] = torch.tensor([END, PAD])
    return caps


@pytest.mark.parametrize("layers", DEPTHS)
@pytest.mark.parametrize("order", ORDERS)
def test_forward_shapes_and_attention_sums(order: str, layers: tuple[str, ...]) -> None:
    model = build(config(layers, order))
    caps = captions()
    out = model(tiny_features(layers), caps)
    assert out.logits.shape == (3, 5, VOCAB)
    assert out.tag_logits is None
    attention = out.attention
    for weights, orders, size in ((attention.spatial, ("cs", "sc", "s"), 1), (attention.channel, ("cs", "sc", "c"), 0)):
        if order not in orders:
            assert weights is None
            continue
        assert [w.shape for w in weights] == [(3, 5, SIZES[name][size]) for name in layers]
        for w in weights:
            torch.testing.assert_close(w.sum(dim=2), torch.ones(3, 5))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("layers", DEPTHS)
@pytest.mark.parametrize("order", ORDERS)
def test_teacher_forcing_equals_stepping(order: str, layers: tuple[str, ...], decoder: str) -> None:
    assert_teacher_forcing_equals_stepping(config(layers, order, decoder=decoder))


def assert_teacher_forcing_equals_stepping(cfg: ModelConfig) -> None:
    """``forward``'s logits and attention at every position equal ``step``'s, in float64."""
    model = build(cfg, dtype=torch.float64).eval()
    features = {name: x.double() for name, x in tiny_features(cfg.layers).items()}
    caps = captions()
    with torch.no_grad():
        out = model(features, caps)
        state, memory = model.start(features)
        for t in range(caps.shape[1] - 1):
            step = model.step(caps[:, t], state, memory)
            torch.testing.assert_close(step.logits, out.logits[:, t], rtol=1e-10, atol=1e-10)
            pairs = ((step.attention.spatial, out.attention.spatial), (step.attention.channel, out.attention.channel))
            for per_step, whole in pairs:
                assert (per_step is None) == (whole is None)
                for a, b in zip(per_step or [], whole or []):
                    torch.testing.assert_close(a, b[:, t], rtol=1e-10, atol=1e-10)
            state = step.state


def test_step_shapes_and_state_select() -> None:
    model = build(config()).eval()
    features = tiny_features(("conv3", "conv4"))
    with torch.no_grad():
        state, memory = model.start(features)
        assert isinstance(state, CaptionState)
        assert state.h.shape == state.c.shape == (3, 7)
        words = torch.tensor([START, 5, 7])
        full = model.step(words, state, memory)
        assert full.logits.shape == (3, VOCAB)
        assert [a.shape for a in full.attention.spatial] == [(3, 16), (3, 16)]
        assert [b.shape for b in full.attention.channel] == [(3, 8), (3, 6)]
        index = torch.tensor([2, 0, 2, 1])  # reorder and repeat rows, as beam search does
        picked = model.step(words[index], state.select(index), memory)
        torch.testing.assert_close(picked.logits, full.logits[index])
        torch.testing.assert_close(picked.state.h, full.state.h[index])
        torch.testing.assert_close(picked.attention.spatial[1], full.attention.spatial[1][index])


def trainable_model(order: str, finetune: bool = False, decoder: str = "sat") -> SCACaptioner:
    return build(
        config(
            ("conv3", "conv4", "conv5"),
            order,
            decoder=decoder,
            finetune_upper=finetune,
            doubly_stochastic=0.5,
            num_tags=4,
            tag_heads=2,
            tag_loss_weight=0.3,
        )
    )


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("order", ORDERS)
def test_gradients_reach_every_learning_parameter_and_no_frozen_one(order: str, decoder: str) -> None:
    model = trainable_model(order, decoder=decoder)
    caps = captions()
    out = model(tiny_features(model.config.layers), caps)
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    model.loss(out, caps, PAD, tags).mean().backward()
    upper = {id(p) for p in model.encoder.upper.parameters()}
    assert upper
    for name, p in model.named_parameters():
        if id(p) in upper:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_finetuning_trains_the_upper_stages() -> None:
    model = trainable_model("cs", finetune=True)
    caps = captions()
    out = model(tiny_features(model.config.layers), caps)
    model.loss(out, caps, PAD, torch.ones(3, 4)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.upper.parameters())


@pytest.mark.parametrize("finetune", [False, True])
def test_fine_tuned_upper_stages_learn_at_their_own_rate(finetune: bool) -> None:
    model = trainable_model("cs", finetune=finetune)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    set_learning_rate(optimizer, 1e-3, upper_lr_scale=0.1)
    upper = {id(p) for p in model.encoder.upper.parameters()}
    assert [{id(p) for p in g["params"]} == upper for g in optimizer.param_groups] == [False, True][: 1 + finetune]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    caps = captions()
    out = model(tiny_features(model.config.layers), caps)
    optimizer_step(model, optimizer, model.loss(out, caps, PAD, torch.ones(3, 4)).mean(), grad_clip=None)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():  # Adam's first step moves each weight by about lr (sign of its gradient)
        rate = (0.1e-3 if finetune else 0.0) if id(p) in upper else 1e-3
        assert moved[name] == pytest.approx(rate, rel=0.02), name


def test_deterministic_given_a_seed() -> None:
    caps = captions()
    features = tiny_features(("conv3", "conv4"))
    runs = []
    for _ in range(2):
        model = build(config(), seed=5).train()
        torch.manual_seed(9)  # dropout draws
        runs.append((model.state_dict(), model(features, caps).logits))
    for name, value in runs[0][0].items():
        torch.testing.assert_close(value, runs[1][0][name], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    assert not torch.allclose(build(config(), seed=6)(features, caps).logits, runs[0][1])


def test_loss_terms_by_hand() -> None:
    model = build(config(doubly_stochastic=0.5, num_tags=4, tag_loss_weight=0.25))
    caps = captions()
    out = model(tiny_features(("conv3", "conv4")), caps)
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]])
    loss = model.loss(out, caps, PAD, tags)
    targets = caps[:, 1:]
    real = targets != PAD
    log_probs = F.log_softmax(out.logits, dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)
    assert (loss.tokens, loss.images) == (int(real.sum()), 3)
    torch.testing.assert_close(loss.words, -(log_probs[real]).sum())
    penalty = 0.0
    for alpha in out.attention.spatial:  # Σ_i (1 − Σ_t α_ti)² over the real (non-pad) steps, mean over images
        coverage = (alpha * real.unsqueeze(2)).sum(dim=1)
        penalty = penalty + ((1 - coverage) ** 2).sum(dim=1).mean()
    tag_bce = F.binary_cross_entropy_with_logits(out.tag_logits, tags)
    torch.testing.assert_close(loss.per_image, 3 * (0.5 * penalty + 0.25 * tag_bce))
    torch.testing.assert_close(loss.mean(), -(log_probs[real]).mean() + 0.5 * penalty + 0.25 * tag_bce)
    torch.testing.assert_close(loss.mean(tokens=20, images=6), loss.words / 20 + loss.per_image / 6)
    with pytest.raises(ModelConfigError, match="needs tag targets"):
        model.loss(out, caps, PAD)


def test_label_smoothing_spreads_a_share_of_each_target_over_the_vocabulary() -> None:
    model = build(config())
    caps = captions()
    out = model(tiny_features(("conv3", "conv4")), caps)
    targets = caps[:, 1:]
    real = targets != PAD
    log_probs = F.log_softmax(out.logits, dim=2)
    target_terms = -log_probs.gather(2, targets.unsqueeze(2)).squeeze(2)[real]
    uniform_terms = -log_probs.mean(dim=2)[real]  # mean over the K words, pad included
    smoothed = model.loss(out, caps, PAD, label_smoothing=0.2)
    torch.testing.assert_close(smoothed.words, (0.8 * target_terms + 0.2 * uniform_terms).sum())
    torch.testing.assert_close(model.loss(out, caps, PAD, label_smoothing=0.0).words, target_terms.sum())
    assert smoothed.tokens == int(real.sum())


def test_float16_cached_features_are_accepted() -> None:
    model = build(config()).eval()
    features = tiny_features(("conv3", "conv4"))
    half = {name: x.half() for name, x in features.items()}
    with torch.no_grad():
        torch.testing.assert_close(
            model(half, captions()).logits, model(features, captions()).logits, rtol=1e-2, atol=1e-2
        )


@pytest.mark.parametrize("layers", DEPTHS[:2])
@pytest.mark.parametrize("order", ORDERS)
def test_bfloat16_autocast_trains_and_matches_float32(order: str, layers: tuple[str, ...]) -> None:
    features, caps = tiny_features(layers), captions()
    losses, grads = [], []
    for bf16 in (False, True):
        model = build(config(layers, order, dropout=0.0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(model(features, caps), caps, PAD).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0.0)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("decoder", DECODERS)
def test_greedy_decoding_scores_equal_teacher_forced_scores(decoder: str) -> None:
    model = build(config(decoder=decoder), dtype=torch.float64).eval()
    features = {name: x.double() for name, x in tiny_features(("conv3", "conv4")).items()}
    hypotheses = [h[0] for h in beam_search(model, features, start=START, end=END, beam_size=1, max_length=5)]
    for b, hyp in enumerate(hypotheses):
        tokens = [START, *hyp.tokens] + ([END] if hyp.finished else [])
        caps = torch.tensor([tokens])
        with torch.no_grad():
            logits = model({name: x[b : b + 1] for name, x in features.items()}, caps).logits
        log_prob = F.log_softmax(logits, dim=2).gather(2, caps[:, 1:].unsqueeze(2)).sum()
        assert hyp.log_prob == pytest.approx(float(log_prob), abs=1e-6)


def test_config_round_trip_and_errors() -> None:
    cfg = config(("conv3", "conv5"), "sc", num_tags=3)
    data = cfg.to_dict()
    assert data["layers"] == ["conv3", "conv5"]
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ModelConfigError, match="unknown setting"):
        ModelConfig.from_dict({**data, "heads": 2})
    with pytest.raises(ModelConfigError, match="order must be one of"):
        config(order="channel")
    with pytest.raises(ModelConfigError, match="dropout"):
        config(dropout=1.0)
    with pytest.raises(ModelConfigError, match="1 to 3 taps"):
        config(layers=())
    with pytest.raises(ModelConfigError, match="names backbone 'efficientnet_lite0' but got 'tiny'"):
        SCACaptioner(ModelConfig(layers=("conv3",)), VOCAB, build_tiny_backbone())
    with pytest.raises(ModelConfigError, match="tag_heads must be one of"):
        build(config(num_tags=3, tag_heads=3))
    model = build(config())
    with pytest.raises(ModelConfigError, match=r"captions must be \(B, T\)"):
        model(tiny_features(("conv3", "conv4")), torch.tensor([START, 4]))
    with pytest.raises(ModelConfigError, match="3 images but 2 captions"):
        model(tiny_features(("conv3", "conv4")), captions(batch=2))


@pytest.mark.parametrize("context_to_output", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_authors_options_keep_teacher_forcing_equal_to_stepping(context_to_output: bool, normalize: bool) -> None:
    cfg = config(("conv3", "conv4"), "cs", context_to_output=context_to_output, normalize_features=normalize)
    assert (build(cfg).decoder.out_context is not None) == context_to_output
    assert_teacher_forcing_equals_stepping(cfg)


def test_normalized_features_make_the_decoder_blind_to_feature_scale() -> None:
    """Order "none" on one layer reads only the mean feature: L2-normalised, a feature map ten
    times larger gives the same words; as computed, it does not."""
    features = {name: x.double() for name, x in tiny_features(("conv3",)).items()}
    larger = {name: 10 * x for name, x in features.items()}
    caps = captions()
    for normalize in (True, False):
        model = build(config(("conv3",), "none", normalize_features=normalize), dtype=torch.float64).eval()
        with torch.no_grad():
            same = torch.allclose(model(features, caps).logits, model(larger, caps).logits, rtol=1e-9, atol=1e-9)
        assert same == normalize
