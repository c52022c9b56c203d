"""The fast paths of the attention and the loss against plain autograd references, in float64:
the chunked C-S spatial scores (values and every gradient), rows that read per-image memory
(beam search) against copied per-row tensors, and the fused word cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sca import expected_layer, hand_spatial, inputs, randomise
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.models import captioner, sca
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.sca import ORDERS, SCALayer, SpatialAttention

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
    monkeypatch.setattr(sca, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)  # two rows per chunk
    rows = None if ROWS[layout] is None else torch.tensor(ROWS[layout])
    args = spatial_arguments(6, 6 if rows is None else 3)
    assert len(sca._row_chunks(6, M * C, sca._SPATIAL_CHUNK_ELEMENTS)) == 3
    assert sca._per_image(rows, 3) == (2 if layout == "grouped" else 0)
    assert torch.autograd.gradcheck(lambda *a: sca._WeightedSpatialScores.apply(*a, rows), args)


@pytest.mark.parametrize("layout", ROWS)
def test_weighted_spatial_attention_equals_the_plain_composition(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """α over V ⊙ s, and the gradients of everything, equal the equation on the materialised map."""
    monkeypatch.setattr(sca, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)
    attention = randomise(SpatialAttention(C, K))
    rows = None if ROWS[layout] is None else torch.tensor(ROWS[layout])
    maps, scale, query = spatial_arguments(6, 6 if rows is None else 3, seed=1)[:3]
    per_row = maps[rows] if rows is not None else maps
    fast = attention.over_weighted(maps, scale, query, rows)
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
    layer = randomise(SCALayer(C, K, order, rescale=True))
    maps, queries = inputs()
    maps.requires_grad_(True)
    queries.requires_grad_(True)
    tensors = [maps, queries, *layer.parameters()]
    for top in (False, True):
        fast = layer(maps, queries, top=top).output
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
    monkeypatch.setattr(sca, "_SPATIAL_CHUNK_ELEMENTS", 2 * M * C)
    layer = randomise(SCALayer(C, K, order, rescale=True))
    maps, _ = inputs()
    rows = torch.tensor(ROWS[layout])
    torch.manual_seed(5)
    queries = torch.randn(6, layer.query_dim, dtype=torch.float64)
    shared = layer(maps, queries, layer.prepare(maps), top=top, rows=rows)
    copied = layer(maps[rows], queries, layer.prepare(maps[rows]), top=top)
    torch.testing.assert_close(shared.output, copied.output)
    for a, b in ((shared.spatial, copied.spatial), (shared.channel, copied.channel)):
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
        state = model.init_state(features)
        first, second = torch.tensor([2, 2, 0, 1]), torch.tensor([3, 0, 0])
        twice = state.select(first).select(second)
        assert twice.memory.maps is state.memory.maps  # nothing per image is copied
        assert twice.memory.side is state.memory.side
        torch.testing.assert_close(twice.memory.rows, first[second])
        words = torch.tensor([1, 4, 6])
        once = state.select(first[second])
        torch.testing.assert_close(model.step(words, twice).logits, model.step(words, once).logits)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_word_cross_entropy_equals_torch_cross_entropy(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captioner, "_LOG_SOFTMAX_ROWS", 3)  # several chunks
    torch.manual_seed(0)
    logits = (10 * torch.randn(10, 7, dtype=dtype)).requires_grad_(True)
    targets = torch.tensor([3, 0, 6, 0, 1, 2, 5, 0, 4, 4])  # 0 is padding
    fast = captioner._WordCrossEntropy.apply(logits, targets, 0)
    plain = F.cross_entropy(logits, targets, ignore_index=0)
    torch.testing.assert_close(fast, plain)
    (g_fast,) = torch.autograd.grad(2.5 * fast, logits)
    (g_plain,) = torch.autograd.grad(2.5 * plain, logits)
    torch.testing.assert_close(g_fast, g_plain)
    assert g_fast[targets == 0].abs().max() == 0  # padded targets get no gradient
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: captioner._WordCrossEntropy.apply(x, targets, 0), (logits,))
