"""The "cpu" kernels against the plain equations, in float64: the chunked C-S spatial scores
(values and every gradient), rows that read per-image memory (beam search) against copied per-row
tensors, whole captioners (loss, gradients, beam search) for every order and depth, and the
memory the kernels keep in inference. And how a backend is chosen: the plain equations unless the
kernels are asked for (as the CPU presets do), which refuse a layer they were not written for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_sca import expected_layer, hand_spatial, inputs, randomise
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.checkpoint import load_checkpoint
from sca_caption.config import ExperimentConfig, load_config
from sca_caption.decoding import beam_search
from sca_caption.models import kernels
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import ORDERS, ChannelAttention, SCALayer, SpatialAttention

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "flickr8k_cs_lite0.pt"

B, M, C, K = 3, 6, 5, 4


def spatial_arguments(rows: int, images: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """maps (images, m, C), scale (rows, C), query (rows, k), W_s, b_s, w: float64, all needing grad."""
    torch.manual_seed(seed)
    shapes = ((images, M, C), (rows, C), (rows, K), (K, C), (K,), (K,))
    return tuple(torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes)


# which image each row reads: none given (row r is image r), scattered, and beam search's layout
# (each image's rows together), which is broadcast instead of gathered
ROWS = {"none": None, "scattered": [2, 0, 2, 1, 1, 0], "grouped": [0, 0, 1, 1, 2, 2]}


@pytest.mark.parametrize("layout", ROWS)
def test_weighted_spatial_scores_gradcheck_across_chunks(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)  # two rows per chunk
    rows = None if ROWS[layout] is None else torch.tensor(ROWS[layout])
    args = spatial_arguments(6, 6 if rows is None else 3)
    assert len(kernels._row_chunks(6, M * C, kernels._SPATIAL_CHUNK_ELEMENTS)) == 3
    assert kernels._per_image(rows, 3) == (2 if layout == "grouped" else 0)
    assert torch.autograd.gradcheck(lambda *a: kernels._WeightedSpatialScores.apply(*a, rows, True), args)


@pytest.mark.parametrize("layout", ROWS)
def test_weighted_spatial_attention_equals_the_plain_composition(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """α over V ⊙ s, and the gradients of everything, equal the equation on the materialised map."""
    monkeypatch.setattr(kernels, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)
    attention = randomise(SpatialAttention(C, K))
    rows = None if ROWS[layout] is None else torch.tensor(ROWS[layout])
    maps, scale, query = spatial_arguments(6, 6 if rows is None else 3, seed=1)[:3]
    per_row = maps[rows] if rows is not None else maps
    fast = kernels.weighted_spatial_weights(attention, maps, scale, query, rows)
    plain = hand_spatial(attention, per_row * scale.unsqueeze(1), query)
    torch.testing.assert_close(fast, plain)
    upstream = torch.randn(6, M, dtype=torch.float64)
    tensors = [maps, scale, query, *attention.parameters()]
    got = torch.autograd.grad((fast * upstream).sum(), tensors)
    want = torch.autograd.grad((plain * upstream).sum(), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("order", ["cs", "sc"])
def test_layer_gradients_equal_the_hand_composition(order: str) -> None:
    layer = randomise(SCALayer(C, K, order, True, "cpu"))
    maps, queries = inputs()
    maps.requires_grad_(True)
    queries.requires_grad_(True)
    tensors = [maps, queries, *layer.parameters()]
    for top in (False, True):
        fast = layer(maps, queries, top=top)[0]
        plain = expected_layer(layer, maps, queries)[1 if top else 0]
        upstream = torch.randn(plain.shape, dtype=torch.float64)
        got = torch.autograd.grad((fast * upstream).sum(), tensors)
        want = torch.autograd.grad((plain * upstream).sum(), tensors)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("layout", ["scattered", "grouped"])
@pytest.mark.parametrize("top", [False, True])
@pytest.mark.parametrize("order", ORDERS)
def test_rows_read_per_image_memory_as_copied_rows_would(
    order: str, top: bool, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)
    layer = randomise(SCALayer(C, K, order, True, "cpu"))
    maps, _ = inputs()
    rows = torch.tensor(ROWS[layout])
    torch.manual_seed(5)
    queries = torch.randn(6, layer.query_dim, dtype=torch.float64)
    shared = layer(maps, queries, rows, layer.first_terms(maps), top=top)
    copied = layer(maps[rows], queries, None, layer.first_terms(maps[rows]), top=top)
    for a, b in zip(shared, copied):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_state_select_shares_the_image_memory_and_composes() -> None:
    config = ModelConfig(
        backbone="tiny", layers=("conv3", "conv4"), attention_dim=4, hidden_dim=7, embed_dim=5, dropout=0.0
    )
    torch.manual_seed(0)
    model = SCACaptioner(config, 11, build_tiny_backbone()).double().eval()
    features = {name: x.double() for name, x in tiny_features(config.layers).items()}
    with torch.no_grad():
        state, memory = model.start(features)
        first, second = torch.tensor([2, 2, 0, 1]), torch.tensor([3, 0, 0])
        twice = state.select(first).select(second)
        torch.testing.assert_close(twice.image, first[second])  # only the row-to-image index moves
        words = torch.tensor([1, 4, 6])
        once = state.select(first[second])
        torch.testing.assert_close(model.step(words, twice, memory).logits, model.step(words, once, memory).logits)


def captioner_pair(order: str, layers: tuple[str, ...]) -> tuple[SCACaptioner, SCACaptioner]:
    """The same float64 captioner (random weights) with the plain equations and with the kernels."""
    config = ModelConfig(
        backbone="tiny", layers=layers, order=order, attention_dim=4, hidden_dim=7, embed_dim=5, dropout=0.0,
        doubly_stochastic=0.5 if order in ("cs", "sc", "s") else 0.0, kernels="plain",
    )
    torch.manual_seed(0)
    plain = SCACaptioner(config, 11, build_tiny_backbone()).double()
    randomise(plain.encoder.layers)  # zero-initialised biases included
    fast = SCACaptioner(dataclasses.replace(config, kernels="cpu"), 11, build_tiny_backbone()).double()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("layers", [("conv3",), ("conv3", "conv4")])
@pytest.mark.parametrize("order", ORDERS)
def test_kernels_give_the_plain_loss_gradients_and_beams(order: str, layers: tuple[str, ...]) -> None:
    plain, fast = captioner_pair(order, layers)
    features = {name: x.double() for name, x in tiny_features(layers).items()}
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 4, 9, 10, 6, 2]])
    results = []
    for model in (plain, fast):
        sums = model.loss(model(features, captions), captions, 0)
        loss = sums.mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert len(results[0][1]) == len(results[1][1])
    for want, got in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want)
    settings = dict(start=1, end=2, beam_size=3, max_length=6, n_best=3, return_attention=True)
    for a, b in zip(beam_search(plain.eval(), features, **settings), beam_search(fast.eval(), features, **settings)):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        for x, y in zip(a, b):
            assert x.score == pytest.approx(y.score, rel=1e-9)
            if order == "none":
                assert x.attention is None and y.attention is None
                continue
            for maps_x, maps_y in ((x.attention.spatial, y.attention.spatial), (x.attention.channel, y.attention.channel)):
                assert (maps_x is None) == (maps_y is None)
                for p, q in zip(maps_x or (), maps_y or ()):
                    torch.testing.assert_close(p, q)


def test_inference_keeps_no_spatial_map_for_a_backward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under inference mode the C-S kernel must not allocate the (R, m, k) map it keeps for the
    gradients, only chunk-sized buffers; with gradients on it must."""
    torch.manual_seed(0)
    rows, images, m, channels, k = 40, 8, 49, 16, 64
    monkeypatch.setattr(kernels, "_SPATIAL_CHUNK_ELEMENTS", 10 * m * k)  # chunks of 10 rows
    attention = SpatialAttention(channels, k)  # its parameters require grad
    maps, scale, query = torch.randn(images, m, channels), torch.rand(rows, channels), torch.randn(rows, k)
    index = torch.arange(images).repeat_interleave(rows // images)
    kept = rows * m * k * 4  # bytes of the float32 map

    def largest_allocation(grad: bool) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                kernels.weighted_spatial_weights(attention, maps, scale, query, index)
        return max(event.cpu_memory_usage for event in prof.events())

    assert largest_allocation(grad=True) >= kept
    assert largest_allocation(grad=False) < kept


def test_the_default_backend_runs_the_modules_as_a_reader_edits_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit to ``ChannelAttention.forward`` (here: uniform weights) is what a default model
    computes, on a CPU too."""
    monkeypatch.setattr(ChannelAttention, "forward", lambda self, pooled, query: torch.full_like(pooled, 1 / pooled.shape[1]))
    config = ModelConfig(backbone="tiny", layers=("conv3", "conv4"), attention_dim=4, hidden_dim=7, embed_dim=5)
    torch.manual_seed(0)
    encoder = SCACaptioner(config, 11, build_tiny_backbone()).double().encoder
    memory, _ = encoder.remember({name: x.double() for name, x in tiny_features(config.layers).items()}, torch.float64)
    _, attention = encoder(memory, torch.randn(3, encoder.query_dim, dtype=torch.float64))
    assert attention.channel is not None
    for beta in attention.channel:
        torch.testing.assert_close(beta, torch.full_like(beta, 1 / beta.shape[1]))


class TemperedChannelAttention(ChannelAttention):
    """A reader's variant: the scores divided by a learnt temperature (a new parameter)."""

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__(channels, attention_dim)
        self.temperature = torch.nn.Parameter(torch.ones(()))


def test_the_cpu_backend_refuses_a_layer_it_does_not_implement(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = SCALayer(C, K, "cs", True, "plain")
    layer.channel = TemperedChannelAttention(C, K)
    with pytest.raises(ModelConfigError) as caught:
        kernels.check_implements(layer)
    message = str(caught.value)
    assert "\n" not in message and "use kernels 'plain'" in message
    assert "channel is TemperedChannelAttention, not ChannelAttention" in message
    assert "channel.temperature is an extra tensor" in message

    class Subclassed(SCALayer):
        pass

    with pytest.raises(ModelConfigError, match="the layer is Subclassed, not SCALayer"):
        Subclassed(C, K, "sc", True, "cpu")
    # a parameter added to ChannelAttention itself: refused when the model is built, by the cpu
    # backend only, and only for orders with channel attention
    original = ChannelAttention.__init__

    def with_temperature(self: ChannelAttention, channels: int, attention_dim: int) -> None:
        original(self, channels, attention_dim)
        self.register_buffer("temperature", torch.ones(()))

    monkeypatch.setattr(ChannelAttention, "__init__", with_temperature)
    config = ModelConfig(backbone="tiny", layers=("conv3",), attention_dim=4, hidden_dim=7, embed_dim=5, kernels="cpu")
    with pytest.raises(ModelConfigError, match="channel.temperature is an extra tensor"):
        SCACaptioner(config, 11, build_tiny_backbone())
    SCACaptioner(dataclasses.replace(config, kernels="plain"), 11, build_tiny_backbone())
    SCACaptioner(dataclasses.replace(config, order="s"), 11, build_tiny_backbone())
    kernels.check_implements(SCALayer(C, K, "s", True, "plain"))


def test_presets_choose_the_kernels_and_old_checkpoints_auto_reads_as_plain() -> None:
    assert ModelConfig().kernels == "plain"
    assert load_config("flickr8k").model.kernels == "cpu" and load_config("shapes").model.kernels == "cpu"
    with pytest.raises(ModelConfigError, match="kernels must be one of plain, cpu; got 'auto'"):
        ModelConfig(kernels="auto")
    # the shipped checkpoint recorded kernels: auto (the kernels on a CPU, before they were a choice)
    saved = load_checkpoint(SHIPPED)
    assert saved.config["model"]["kernels"] == "plain"
    assert ExperimentConfig.from_dict(saved.config).model.kernels == "plain"
