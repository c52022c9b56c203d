"""The LSTM decoder of Show, Attend and Tell, as SCA-CNN uses it.

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

import torch
from torch import Tensor, nn


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
        gates = torch.addmm(gates, context, self.context_gates.weight.t())
        hidden_dim = self.hidden_dim
        sigmoid = torch.sigmoid(gates[:, : 3 * hidden_dim])
        candidate = torch.tanh(gates[:, 3 * hidden_dim :])
        input_gate = sigmoid[:, :hidden_dim]
        forget_gate = sigmoid[:, hidden_dim : 2 * hidden_dim]
        output_gate = sigmoid[:, 2 * hidden_dim :]
        cell = torch.addcmul(forget_gate * cell, input_gate, candidate)
        return output_gate * torch.tanh(cell), cell

    def logits(self, embedded: Tensor, hidden: Tensor, context: Tensor) -> Tensor:
        """Deep output: E y_{t-1} (..., E), h_t (..., H), z_t (..., C) -> word logits (..., V)."""
        deep = embedded + self.out_hidden(self.dropout(hidden))
        if self.out_context is not None:
            deep = deep + self.out_context(context)
        return self.classifier(self.dropout(torch.tanh(deep)))
