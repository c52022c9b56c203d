"""The word decoders: Show, Attend and Tell's LSTM (as SCA-CNN uses it) and Up-Down's two LSTMs.

Both serve ``SCACaptioner`` through one interface: ``initial_state``, ``embed``, ``input_gates``,
``advance`` (one step of the recurrence, given ``attend``: queries -> the encoder's context) and
``logits``; a state is (h, c), each (R, state_dim).

Show, Attend and Tell (``LSTMDecoder``, ``model.decoder: sat``).

At step t, with previous word y_{t-1}, previous state (h_{t-1}, c_{t-1}) and the context z_t that
the encoder computed from h_{t-1}:

    gates  = W_e E y_{t-1} + b + U h_{t-1} + W_z z_t         (i, f, o, g), 4H wide
    c_t    = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),   h_t = σ(o) ⊙ tanh(c_t)
    logits = L_o dropout(tanh(E y_{t-1} + L_h dropout(h_t) + L_z z_t))   (the "deep output")

The paper writes the deep output without the tanh; the authors' code (and Show-Attend-Tell's)
applies it, and so does this module. ``context_to_output=False`` drops the L_z z_t term, as the
authors' code does by default (its ``ctx2out``) and as the paper's output equation reads h_t and
y_{t-1} only. h_0, c_0 = tanh(linear(mean feature of the top layer)).

Speed: ``recurrent`` holds U and, in the same matrix, the attention's query projections W_h
(``query_dim`` rows), so one matmul of h_{t-1} serves the LSTM and every attention module;
``input_gates`` runs on all words of a caption at once in training, and ``logits`` on all steps
at once after the loop.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from sca_caption.models.sca import AttentionWeights

DECODERS = ("sat", "updown")  # Show-Attend-Tell's LSTM, Up-Down's two LSTMs

Attend = Callable[[Tensor], tuple[Tensor, AttentionWeights]]
"""This step's queries (R, query_dim) -> the context z_t (R, C) and the attention that made it."""


class LSTMDecoder(nn.Module):
    """Word embedding, LSTM cell and deep output layer; the encoder supplies the context."""

    def __init__(
        self,
        vocab_size: int,
        context_dim: int,
        embed_dim: int,
        hidden_dim: int,
        query_dim: int,
        dropout: float,
        context_to_output: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.init_state = nn.Linear(context_dim, 2 * hidden_dim)
        self.word_gates = nn.Linear(embed_dim, 4 * hidden_dim)
        self.context_gates = nn.Linear(context_dim, 4 * hidden_dim, bias=False)
        self.recurrent = nn.Linear(hidden_dim, 4 * hidden_dim + query_dim, bias=False)
        self.out_hidden = nn.Linear(hidden_dim, embed_dim)
        self.out_context = nn.Linear(context_dim, embed_dim, bias=False) if context_to_output else None
        self.classifier = nn.Linear(embed_dim, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, mean_feature: Tensor) -> tuple[Tensor, Tensor]:
        """Mean top-layer feature (B, C) -> h_0, c_0, each (B, H)."""
        h, c = torch.tanh(self.init_state(mean_feature)).chunk(2, dim=1)
        return h.contiguous(), c.contiguous()

    def image_gates(self, mean_feature: Tensor) -> None:
        """Per-image gate terms every step adds: none in this decoder."""
        return None

    def advance(
        self, word_gates: Tensor, h: Tensor, c: Tensor, image_gates: Tensor | None, attend: Attend
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, AttentionWeights]:
        """One step: word gates (R, 4H), the state at t-1 -> h_t, c_t, the output layer's hidden
        h_t, the context z_t and the attention, both computed from h_{t-1}."""
        recurrent, queries = self.project_hidden(h)
        context, attention = attend(queries)
        h, c = self.cell(word_gates + recurrent, context, c)
        return h, c, h, context, attention

    def embed(self, words: Tensor) -> Tensor:
        """Word ids (...) -> embeddings E y (..., E)."""
        return self.embedding(words)

    def input_gates(self, embedded: Tensor) -> Tensor:
        """W_e E y + b: (..., E) -> (..., 4H)."""
        return self.word_gates(embedded)

    def project_hidden(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """h_{t-1} (B, H) -> U h_{t-1} (B, 4H) and the attention queries (B, query_dim)."""
        projected = self.recurrent(hidden)
        return projected[:, : 4 * self.hidden_dim], projected[:, 4 * self.hidden_dim :]

    def cell(self, gates: Tensor, context: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        """One LSTM step: word and recurrent gates (B, 4H), context z_t (B, C), the cell c_{t-1}
        (B, H) -> h_t, c_t (B, H)."""
        return _lstm_cell(torch.addmm(gates, context, self.context_gates.weight.t()), cell)

    def logits(self, embedded: Tensor, hidden: Tensor, context: Tensor) -> Tensor:
        """Deep output: E y_{t-1} (..., E), h_t (..., H), z_t (..., C) -> word logits (..., V)."""
        deep = embedded + self.out_hidden(self.dropout(hidden))
        if self.out_context is not None:
            deep = deep + self.out_context(context)
        return self.classifier(self.dropout(torch.tanh(deep)))


class UpDownDecoder(nn.Module):
    """Up-Down's decoder (Anderson et al., CVPR 2018, eqs. 2-7), with SCA-CNN as the attention.

    An attention LSTM reads the previous word, the mean image feature v̄ and the language LSTM's
    h²_{t-1}; its new state h¹_t queries every attended layer; a language LSTM reads the context
    z_t and h¹_t, and its state gives the word:

        h¹_t, c¹_t = LSTM₁([h²_{t-1}; v̄; W_e Π_t], h¹_{t-1}, c¹_{t-1})
        z_t        = SCA(h¹_t)                                   (every layer's queries W_h h¹_t)
        h²_t, c²_t = LSTM₂([z_t; h¹_t], h²_{t-1}, c²_{t-1})
        logits     = W_p dropout(h²_t)

    The state is (h, c) = ([h¹; h²], [c¹; c²]), each (R, 2H), and starts at zero, as in
    ruotianluo's self-critical.pytorch ``UpDownCore``. Gate layout per LSTM: (i, f, o, g).

    Speed: ``previous`` maps [h¹_{t-1}; h²_{t-1}] to the attention LSTM's gate terms in one
    matmul; ``from_attention`` maps h¹_t to the queries and the language LSTM's h¹ term in one.
    """

    def __init__(
        self, vocab_size: int, context_dim: int, embed_dim: int, hidden_dim: int, query_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.query_dim = query_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.word_gates = nn.Linear(embed_dim, 4 * hidden_dim)  # W_e Π_t's share of LSTM₁, its bias
        self.mean_gates = nn.Linear(context_dim, 4 * hidden_dim, bias=False)  # v̄'s share of LSTM₁
        self.previous = nn.Linear(2 * hidden_dim, 4 * hidden_dim, bias=False)  # [h¹_{t-1}; h²_{t-1}]'s share of LSTM₁
        self.language_recurrent = nn.Linear(hidden_dim, 4 * hidden_dim, bias=False)  # h²_{t-1}'s share of LSTM₂
        self.from_attention = nn.Linear(hidden_dim, query_dim + 4 * hidden_dim)  # queries; h¹_t's share of LSTM₂, its bias
        self.context_gates = nn.Linear(context_dim, 4 * hidden_dim, bias=False)  # z_t's share of LSTM₂
        self.classifier = nn.Linear(hidden_dim, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def initial_state(self, mean_feature: Tensor) -> tuple[Tensor, Tensor]:
        """Mean top-layer feature (B, C) -> h_0, c_0: zeros, each (B, 2H)."""
        zeros = mean_feature.new_zeros(mean_feature.shape[0], 2 * self.hidden_dim)
        return zeros, zeros

    def image_gates(self, mean_feature: Tensor) -> Tensor:
        """Mean top-layer feature v̄ (N, C) -> its term in LSTM₁'s gates (N, 4H), added every step."""
        return self.mean_gates(mean_feature)

    def embed(self, words: Tensor) -> Tensor:
        """Word ids (...) -> embeddings W_e Π (..., E)."""
        return self.embedding(words)

    def input_gates(self, embedded: Tensor) -> Tensor:
        """The word's term in LSTM₁'s gates, with its bias: (..., E) -> (..., 4H)."""
        return self.word_gates(embedded)

    def advance(
        self, word_gates: Tensor, h: Tensor, c: Tensor, image_gates: Tensor | None, attend: Attend
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, AttentionWeights]:
        """One step: word gates (R, 4H), the state at t-1 (R, 2H) each, v̄'s gates per row (R, 4H)
        -> h_t, c_t (R, 2H), the output layer's hidden h²_t (R, H), the context z_t (computed from
        h¹_t) and the attention."""
        assert image_gates is not None
        hidden = self.hidden_dim
        h1, c1 = _lstm_cell(word_gates + image_gates + self.previous(h), c[:, :hidden])
        projected = self.from_attention(h1)
        context, attention = attend(projected[:, : self.query_dim])
        language_gates = projected[:, self.query_dim :] + self.language_recurrent(h[:, hidden:])
        language_gates = torch.addmm(language_gates, context, self.context_gates.weight.t())
        h2, c2 = _lstm_cell(language_gates, c[:, hidden:])
        return torch.cat([h1, h2], dim=1), torch.cat([c1, c2], dim=1), h2, context, attention

    def logits(self, embedded: Tensor, hidden: Tensor, context: Tensor) -> Tensor:
        """W_p dropout(h²_t): h²_t (..., H) -> word logits (..., V); the word and the context are
        not read (the interface's other arguments)."""
        return self.classifier(self.dropout(hidden))


def _lstm_cell(gates: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """All gate terms (R, 4H) in the layout (i, f, o, g) and c_{t-1} (R, H) -> h_t, c_t."""
    hidden_dim = cell.shape[1]
    sigmoid = torch.sigmoid(gates[:, : 3 * hidden_dim])
    candidate = torch.tanh(gates[:, 3 * hidden_dim :])
    input_gate = sigmoid[:, :hidden_dim]
    forget_gate = sigmoid[:, hidden_dim : 2 * hidden_dim]
    output_gate = sigmoid[:, 2 * hidden_dim :]
    cell = torch.addcmul(forget_gate * cell, input_gate, candidate)
    return output_gate * torch.tanh(cell), cell
