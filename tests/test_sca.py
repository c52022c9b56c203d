"""SCA attention modules against the paper's equations written out by hand, and the multi-layer
encoder; every layer test runs both backends ("plain" equations and the "cpu" kernels)."""

from __future__ import annotations

import pytest
import torch
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.models import kernels
from sca_caption.models.captioner import ModelConfig
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import ORDERS, ChannelAttention, SCAEncoder, SCALayer, SpatialAttention

B, M, C, K = 3, 6, 5, 4


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 1) in float64 (zero-initialised biases included)."""
    torch.manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def hand_channel(attention: ChannelAttention, pooled: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """β = softmax_C(w'ᵀ tanh((W_c ⊗ v + b_c) ⊕ q)), one image at a time with b as a k×C matrix."""
    rows = []
    for v, q in zip(pooled, query):
        b = torch.tanh(torch.outer(attention.weight, v) + attention.bias[:, None] + q[:, None])  # k×C
        rows.append(torch.softmax(attention.score @ b, dim=0))
    return torch.stack(rows)


def hand_spatial(attention: SpatialAttention, maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """α = softmax_m(wᵀ tanh((W_s V + b_s) ⊕ q)), with V as a C×m matrix and a as k×m."""
    rows = []
    for v, q in zip(maps, query):
        a = torch.tanh(attention.key.weight @ v.t() + attention.key.bias[:, None] + q[:, None])  # k×m
        rows.append(torch.softmax(attention.score @ a, dim=0))
    return torch.stack(rows)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps V (B, m, C) and queries (B, 2k), float64."""
    torch.manual_seed(seed)
    return torch.randn(B, M, C, dtype=torch.float64), torch.randn(B, 2 * K, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["plain", "cpu"])
def test_channel_attention_matches_the_equation_and_its_gradient(backend: str) -> None:
    attention = randomise(ChannelAttention(C, K))
    pooled = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    query = torch.randn(B, K, dtype=torch.float64, requires_grad=True)
    beta = attention(pooled, query) if backend == "plain" else kernels.channel_weights(attention, pooled, query)
    expected = hand_channel(attention, pooled, query)
    assert beta.shape == (B, C)
    torch.testing.assert_close(beta, expected)
    torch.testing.assert_close(beta.sum(dim=1), torch.ones(B, dtype=torch.float64))
    upstream = torch.randn(B, C, dtype=torch.float64)
    tensors = [pooled, query, *attention.parameters()]
    got = torch.autograd.grad((beta * upstream).sum(), tensors)
    want = torch.autograd.grad((expected * upstream).sum(), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_channel_scores_gradcheck_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 2 * C * K)  # two images per chunk, three chunks
    torch.manual_seed(0)
    args = (
        torch.randn(5, C, dtype=torch.float64, requires_grad=True),
        torch.randn(5, K, dtype=torch.float64, requires_grad=True),
        torch.randn(K, dtype=torch.float64, requires_grad=True),
        torch.randn(K, dtype=torch.float64, requires_grad=True),
    )
    assert len(kernels._row_chunks(5, C * K, kernels._CHUNK_ELEMENTS)) == 3
    assert torch.autograd.gradcheck(kernels._ChannelScores.apply, args)


def test_spatial_attention_matches_the_equation() -> None:
    attention = randomise(SpatialAttention(C, K))
    maps, queries = inputs()
    alpha = attention(maps, queries[:, :K])
    assert alpha.shape == (B, M)
    expected = hand_spatial(attention, maps, queries[:, :K])
    torch.testing.assert_close(alpha, expected)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(B, dtype=torch.float64))
    torch.testing.assert_close(attention(maps, queries[:, :K], keys=attention.key(maps)), expected)
    torch.testing.assert_close(kernels.spatial_weights(attention, attention.key(maps), queries[:, :K], None), expected)


def expected_layer(layer: SCALayer, maps: torch.Tensor, queries: torch.Tensor) -> tuple:
    """(X, z, α, β) of one layer composed by hand from the two modules, per the module docstring."""
    rescale = layer.rescale
    s_c, s_s = (C, M) if rescale else (1, 1)
    q_c, q_s = queries[:, :K], queries[:, K:]
    if layer.order == "none":
        return maps, maps.mean(dim=1), None, None
    if layer.order == "c":
        beta = hand_channel(layer.channel, maps.mean(dim=1), queries)
        x = maps * s_c * beta[:, None, :]
        return x, x.mean(dim=1), None, beta
    if layer.order == "s":
        alpha = hand_spatial(layer.spatial, maps, queries)
        x = maps * s_s * alpha[:, :, None]
        return x, x.sum(dim=1) / s_s, alpha, None
    if layer.order == "cs":
        beta = hand_channel(layer.channel, maps.mean(dim=1), q_c)
        alpha = hand_spatial(layer.spatial, maps * s_c * beta[:, None, :], q_s)
    else:  # "sc": β from the spatially weighted map, pooled over locations (its mean)
        alpha = hand_spatial(layer.spatial, maps, q_s)
        beta = hand_channel(layer.channel, (maps * s_s * alpha[:, :, None]).mean(dim=1), q_c)
    x = maps * (s_c * beta)[:, None, :] * (s_s * alpha)[:, :, None]
    return x, x.sum(dim=1) / s_s, alpha, beta


BACKENDS = ("plain", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("order", ORDERS)
def test_layer_matches_hand_composition(order: str, rescale: bool, backend: str) -> None:
    layer = randomise(SCALayer(C, K, order, rescale, backend))
    maps, queries = inputs()
    queries = queries[:, : layer.query_dim]
    x, z, alpha, beta = expected_layer(layer, maps, queries)
    attended, got_alpha, got_beta = layer(maps, queries)
    context = layer(maps, queries, top=True)[0]
    torch.testing.assert_close(attended, x)
    torch.testing.assert_close(context, z)
    for got, want in ((got_alpha, alpha), (got_beta, beta)):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(got.sum(dim=1), torch.ones(B, dtype=torch.float64))
    # the image-only term computed once gives the same step
    torch.testing.assert_close(layer(maps, queries, terms=layer.first_terms(maps))[0], x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaled_uniform_attention_leaves_the_map_unchanged(backend: str) -> None:
    layer = randomise(SCALayer(C, K, "cs", True, backend))
    with torch.no_grad():
        layer.channel.score.zero_()
        layer.spatial.score.zero_()
    maps, queries = inputs()
    out, alpha, _ = layer(maps, queries)
    torch.testing.assert_close(out, maps)
    torch.testing.assert_close(alpha, torch.full((B, M), 1 / M, dtype=torch.float64))
    torch.testing.assert_close(layer(maps, queries, top=True)[0], maps.mean(dim=1))


class Named:
    """A layer's (X, α, β) by name."""

    def __init__(self, result: tuple) -> None:
        self.output, self.spatial, self.channel = result


@pytest.mark.parametrize("backend", BACKENDS)
def test_orders_cs_and_sc_differ_as_documented(backend: str) -> None:
    cs = randomise(SCALayer(C, K, "cs", True, backend))
    sc = SCALayer(C, K, "sc", True, backend).double()
    sc.load_state_dict(cs.state_dict())
    maps, queries = inputs()
    a_cs, a_sc = Named(cs(maps, queries)), Named(sc(maps, queries))
    assert not torch.allclose(a_cs.output, a_sc.output)
    # C-S: β reads V alone, so the spatial parameters cannot change it; α depends on β.
    # S-C: α reads V alone, so the channel parameters cannot change it; β depends on α.
    with torch.no_grad():
        for layer in (cs, sc):
            layer.spatial.key.weight.add_(1.0)
            layer.channel.weight.mul_(-2.0)
    b_cs, b_sc = Named(cs(maps, queries)), Named(sc(maps, queries))
    torch.testing.assert_close(b_cs.channel, hand_channel(cs.channel, maps.mean(dim=1), queries[:, :K]))
    assert not torch.allclose(b_cs.spatial, a_cs.spatial)
    torch.testing.assert_close(b_sc.spatial, hand_spatial(sc.spatial, maps, queries[:, K:]))
    assert not torch.allclose(b_sc.channel, a_sc.channel)
    # and changing only the channel parameters back moves C-S's α but not S-C's
    with torch.no_grad():
        cs.channel.weight.div_(-2.0)
        sc.channel.weight.div_(-2.0)
    assert not torch.allclose(cs(maps, queries)[1], b_cs.spatial)
    torch.testing.assert_close(sc(maps, queries)[1], b_sc.spatial)


def test_unknown_order_is_a_config_error() -> None:
    with pytest.raises(ModelConfigError, match="order must be one of"):
        ModelConfig(order="xs")
    with pytest.raises(ModelConfigError, match="kernels must be one of"):
        ModelConfig(kernels="fast")


def encoder(layers: tuple[str, ...], order: str = "cs", finetune: bool = False, backend: str = "plain") -> SCAEncoder:
    torch.manual_seed(0)
    return SCAEncoder(
        build_tiny_backbone(), layers, 4, order, rescale=True, finetune_upper=finetune, kernels=backend
    ).double()


def double(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: x.double() for name, x in features.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_layer_encoder_feeds_the_attended_map_through_the_upper_stage(backend: str) -> None:
    layers = ("conv3", "conv4")
    enc = encoder(layers, backend=backend)
    features = double(tiny_features(layers))
    assert enc.inputs == ("conv3", "conv2")  # the shortcut conv2 is cached with the attended conv3
    memory, top = enc.remember(features, torch.float64)
    stage = enc.upper.stages["conv4"]
    torch.testing.assert_close(top, stage(features["conv3"], features))
    torch.manual_seed(3)
    queries = torch.randn(3, enc.query_dim, dtype=torch.float64)
    context, attention = enc(memory, queries)
    # by hand: attend conv3, run the conv4 stage (with conv2 as its shortcut) on X, attend conv4
    v0 = features["conv3"].flatten(2).transpose(1, 2)
    first = Named(enc.layers[0](v0, queries[:, :8]))
    x0 = first.output.transpose(1, 2).reshape(features["conv3"].shape)
    v1 = stage(x0, features).flatten(2).transpose(1, 2)
    second = Named(enc.layers[1](v1, queries[:, 8:], top=True))
    torch.testing.assert_close(context, second.output)
    torch.testing.assert_close(attention.spatial[0], first.spatial)
    torch.testing.assert_close(attention.channel[1], second.channel)


@pytest.mark.parametrize("layers", [("conv3",), ("conv3", "conv4"), ("conv3", "conv4", "conv5")])
@pytest.mark.parametrize("order", ORDERS)
def test_encoder_runs_every_order_and_depth(order: str, layers: tuple[str, ...]) -> None:
    enc = encoder(layers, order)
    memory, top = enc.remember(double(tiny_features(layers)), torch.float64)
    context, attention = enc(memory, torch.randn(3, enc.query_dim, dtype=torch.float64))
    assert context.shape == (3, enc.context_dim) == (3, top.shape[1])
    sizes = {"conv3": 16, "conv4": 16, "conv5": 4}
    if order in ("cs", "sc", "s"):
        assert [a.shape for a in attention.spatial] == [(3, sizes[name]) for name in layers]
    else:
        assert attention.spatial is None
    if order in ("cs", "sc", "c"):
        assert [b.shape[1] for b in attention.channel] == list(enc.channels)
    else:
        assert attention.channel is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("finetune", [False, True])
def test_upper_stage_frozen_unless_finetuned(finetune: bool, backend: str) -> None:
    layers = ("conv3", "conv4", "conv5")
    enc = encoder(layers, finetune=finetune, backend=backend)
    enc.train()
    assert not any(m.training for m in enc.upper.modules())  # batch-norm statistics stay fixed
    memory, _ = enc.remember(double(tiny_features(layers)), torch.float64)
    enc(memory, torch.randn(3, enc.query_dim, dtype=torch.float64))[0].sum().backward()
    upper = list(enc.upper.parameters())
    assert upper
    if finetune:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in upper)
    else:
        assert all(not p.requires_grad and p.grad is None for p in upper)
    # the lower layer's attention learns through the (frozen or not) upper stages
    assert enc.layers[0].channel.weight.grad.abs().sum() > 0


def coord_encoder(layers: tuple[str, ...], order: str, backend: str = "plain") -> SCAEncoder:
    torch.manual_seed(0)
    backbone = build_tiny_backbone()
    return SCAEncoder(
        backbone, layers, 4, order, rescale=True, finetune_upper=False, coord_channels=True, kernels=backend
    ).double()


def test_coordinate_channels_hold_x_then_y_from_minus_one_to_one() -> None:
    enc = coord_encoder(("conv3",), "s")
    features = double(tiny_features(("conv3",)))
    memory, top = enc.remember(features, torch.float64)
    assert enc.context_dim == 8 + 2 and top.shape == (3, 10, 4, 4)
    steps = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(memory.maps[..., :8], features["conv3"].permute(0, 2, 3, 1))
    torch.testing.assert_close(memory.maps[1, :, :, 8], steps.expand(4, 4))  # x grows along a row
    torch.testing.assert_close(memory.maps[1, :, :, 9], steps[:, None].expand(4, 4))  # y down a column
    torch.testing.assert_close(top[:, 8:].mean(dim=(2, 3)), torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_carries_the_attended_position(backend: str) -> None:
    enc = coord_encoder(("conv3",), "s", backend)
    memory, _ = enc.remember(double(tiny_features(("conv3",))), torch.float64)
    context, attention = enc(memory, torch.randn(3, enc.query_dim, dtype=torch.float64))
    positions = memory.maps[:, :, :, 8:].flatten(1, 2)  # (B, m, 2)
    expected = torch.einsum("bm,bmp->bp", attention.spatial[0], positions)
    torch.testing.assert_close(context[:, 8:], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coordinate_channels_stay_out_of_the_upper_stages(backend: str) -> None:
    layers = ("conv3", "conv4")
    enc = coord_encoder(layers, "cs", backend)
    features = double(tiny_features(layers))
    memory, top = enc.remember(features, torch.float64)
    stage = enc.upper.stages["conv4"]
    torch.testing.assert_close(top[:, :6], stage(features["conv3"], features))
    torch.manual_seed(3)
    queries = torch.randn(3, enc.query_dim, dtype=torch.float64)
    context, _ = enc(memory, queries)
    v0 = memory.maps.flatten(1, 2)  # conv3 and its coordinates
    first = enc.layers[0](v0, queries[:, :8])[0]
    x0 = first[..., :8].transpose(1, 2).reshape(features["conv3"].shape)
    v1 = torch.cat([stage(x0, features).flatten(2).transpose(1, 2), v0[:, :, 8:]], dim=2)  # same 4x4 grid
    second = enc.layers[1](v1, queries[:, 8:], top=True)[0]
    torch.testing.assert_close(context, second)
    assert context.shape == (3, enc.context_dim) == (3, 6 + 2)


def test_encoder_rejects_missing_or_misshapen_features() -> None:
    layers = ("conv3", "conv4")
    enc = encoder(layers)
    features = tiny_features(layers)
    with pytest.raises(ModelConfigError, match="features lack tap 'conv2'"):
        enc.remember({"conv3": features["conv3"]}, torch.float64)
    with pytest.raises(ModelConfigError, match=r"features\['conv3'\]: expected \(B, 8, H, W\)"):
        enc.remember({"conv3": features["conv3"][:, :5], "conv2": features["conv2"]}, torch.float64)
    with pytest.raises(ModelConfigError, match="1 to 3 taps"):  # the model config's rule
        ModelConfig(layers=("conv1", "conv2", "conv3", "conv4"))
    with pytest.raises(ModelConfigError, match="layers:"):
        SCAEncoder(build_tiny_backbone(), ("conv4", "conv3"), 4, "cs", True, False)
