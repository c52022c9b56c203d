"""The Up-Down decoder: its two LSTMs against torch's LSTMCell, both attention backends equal,
and a run that learns the shapes captions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_backbone import build_tiny_backbone, tiny_features

from sca_caption.decoding import beam_search
from sca_caption.models.captioner import ModelConfig, SCACaptioner
from sca_caption.models.decoder import UpDownDecoder
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import AttentionWeights

HIDDEN, EMBED, CONTEXT, QUERY, VOCAB = 6, 5, 4, 3, 9


def torch_cell(weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias: torch.Tensor) -> torch.nn.LSTMCell:
    """An LSTMCell with the given weights in this project's gate order (i, f, o, g); torch's is (i, f, g, o)."""
    order = torch.cat([torch.arange(0, 2 * HIDDEN), torch.arange(3 * HIDDEN, 4 * HIDDEN), torch.arange(2 * HIDDEN, 3 * HIDDEN)])
    cell = torch.nn.LSTMCell(weight_ih.shape[1], HIDDEN).double()
    with torch.no_grad():
        cell.weight_ih.copy_(weight_ih[order])
        cell.weight_hh.copy_(weight_hh[order])
        cell.bias_ih.copy_(bias[order])
        cell.bias_hh.zero_()
    return cell


def test_one_step_is_anderson_et_al_equations_with_torch_lstm_cells() -> None:
    """h¹ = LSTM₁([h²_{t-1}; v̄; W_e Π_t], h¹_{t-1}); z = SCA(h¹); h² = LSTM₂([z; h¹], h²_{t-1})."""
    torch.manual_seed(0)
    decoder = UpDownDecoder(VOCAB, CONTEXT, EMBED, HIDDEN, QUERY, dropout=0.0).double().eval()
    rows = 3
    words, mean = torch.tensor([1, 4, 7]), torch.randn(rows, CONTEXT, dtype=torch.double)
    h, c = torch.randn(rows, 2 * HIDDEN, dtype=torch.double), torch.randn(rows, 2 * HIDDEN, dtype=torch.double)
    attend_weight = torch.randn(CONTEXT, QUERY, dtype=torch.double)
    seen: list[torch.Tensor] = []

    def attend(queries: torch.Tensor) -> tuple[torch.Tensor, AttentionWeights]:
        seen.append(queries)
        return torch.tanh(queries @ attend_weight.t()), AttentionWeights(None, None)

    embedded = decoder.embed(words)
    new_h, new_c, output, context, _ = decoder.advance(decoder.input_gates(embedded), h, c, decoder.image_gates(mean), attend)

    previous = decoder.previous.weight
    lstm1 = torch_cell(
        torch.cat([previous[:, HIDDEN:], decoder.mean_gates.weight, decoder.word_gates.weight], dim=1),
        previous[:, :HIDDEN], decoder.word_gates.bias,
    )
    h1, c1 = lstm1(torch.cat([h[:, HIDDEN:], mean, embedded], dim=1), (h[:, :HIDDEN], c[:, :HIDDEN]))
    queries = h1 @ decoder.from_attention.weight[:QUERY].t() + decoder.from_attention.bias[:QUERY]
    torch.testing.assert_close(seen[0], queries)
    z = torch.tanh(queries @ attend_weight.t())
    lstm2 = torch_cell(
        torch.cat([decoder.context_gates.weight, decoder.from_attention.weight[QUERY:]], dim=1),
        decoder.language_recurrent.weight, decoder.from_attention.bias[QUERY:],
    )
    h2, c2 = lstm2(torch.cat([z, h1], dim=1), (h[:, HIDDEN:], c[:, HIDDEN:]))
    torch.testing.assert_close(new_h, torch.cat([h1, h2], dim=1))
    torch.testing.assert_close(new_c, torch.cat([c1, c2], dim=1))
    torch.testing.assert_close(output, h2)
    torch.testing.assert_close(context, z)
    torch.testing.assert_close(decoder.logits(embedded, output, context), h2 @ decoder.classifier.weight.t() + decoder.classifier.bias)
    assert torch.equal(decoder.initial_state(mean)[0], torch.zeros(rows, 2 * HIDDEN, dtype=torch.double))


@pytest.mark.parametrize("layers", [("conv3",), ("conv3", "conv4")])
@pytest.mark.parametrize("order", ["cs", "s"])
def test_both_attention_backends_give_the_same_loss_gradients_and_beams(order: str, layers: tuple[str, ...]) -> None:
    config = ModelConfig(
        backbone="tiny", layers=layers, order=order, attention_dim=4, hidden_dim=7, embed_dim=5, dropout=0.0,
        decoder="updown", kernels="plain",
    )
    torch.manual_seed(0)
    plain = SCACaptioner(config, 11, build_tiny_backbone()).double()
    for p in plain.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    fast = SCACaptioner(dataclasses.replace(config, kernels="cpu"), 11, build_tiny_backbone()).double()
    fast.load_state_dict(plain.state_dict())
    features = {name: x.double() for name, x in tiny_features(layers).items()}
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 4, 9, 10, 6, 2]])
    results = []
    for model in (plain, fast):
        loss = model.loss(model(features, captions), captions, 0).mean()
        results.append((loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])))
    torch.testing.assert_close(results[0][0], results[1][0])
    for want, got in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want)
    settings = dict(start=1, end=2, beam_size=3, max_length=6, n_best=3)
    for a, b in zip(beam_search(plain.eval(), features, **settings), beam_search(fast.eval(), features, **settings)):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-9)


def test_the_config_names_the_decoder_and_refuses_what_it_does_not_read() -> None:
    assert ModelConfig.from_dict(ModelConfig(decoder="updown").to_dict()).decoder == "updown"
    assert ModelConfig.from_dict({}).decoder == "sat"  # checkpoints saved before the option
    with pytest.raises(ModelConfigError, match="decoder must be one of sat, updown; got 'lstm'"):
        ModelConfig(decoder="lstm")
    with pytest.raises(ModelConfigError, match="context_to_output is Show-Attend-Tell's output layer"):
        ModelConfig(decoder="updown", context_to_output=False)


@pytest.mark.parametrize("decoder", ["sat", "updown"])
def test_each_decoder_learns_three_captions_by_heart(decoder: str) -> None:
    """Trained on three images' captions, greedy decoding gives each image its own caption back."""
    config = ModelConfig(
        backbone="tiny", layers=("conv3", "conv4"), attention_dim=8, hidden_dim=16, embed_dim=8, dropout=0.0,
        decoder=decoder,
    )
    torch.manual_seed(0)
    model = SCACaptioner(config, 11, build_tiny_backbone())
    features = tiny_features(config.layers)
    captions = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 3, 2, 0, 0], [1, 4, 9, 10, 6, 2]])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    for _ in range(150):
        optimizer.zero_grad()
        model.loss(model(features, captions), captions, 0).mean().backward()
        optimizer.step()
    decoded = beam_search(model.eval(), features, start=1, end=2, beam_size=1, max_length=6)
    assert [hyps[0].tokens for hyps in decoded] == [[5, 6, 7], [8, 3], [4, 9, 10, 6]]
