"""SCA-CNN captioner: the multi-layer SCA encoder, the LSTM decoder and an optional CSRA tag head.

The model reads the cached backbone prefix outputs ({tap: (B, C, H, W)}, named by
``feature_names``), never images. Decoding drives it one word at a time (``init_state`` then
``step``); training uses ``forward`` (teacher forcing), which runs exactly the same step
computation, so the scores beam search sees are the scores training optimised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from sca_caption.models.backbones import TappedBackbone, build_backbone
from sca_caption.models.decoder import LSTMDecoder
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import ORDERS, EncoderMemory, EncoderStep, SCAEncoder
from sca_caption.models.tag_head import TagHead, tag_loss


@dataclass
class ModelConfig:
    """Model settings; plain types only, saved in checkpoints as ``to_dict()``.

    ``layers``: attended taps, low to high (1 to 3); ``order``: one of ``ORDERS``;
    ``finetune_upper``: train the backbone stages between attended layers; ``rescale``: keep
    attended maps at the unattended scale (see ``sca``); ``doubly_stochastic``: weight of
    Show-Attend-Tell's Σ_i (1 − Σ_t α_ti)² regulariser; ``num_tags`` > 0 adds the CSRA tag head
    (``tag_heads`` heads, residual weight ``tag_lambda``), whose BCE joins the loss with weight
    ``tag_loss_weight``. ``coord_channels`` appends each location's x and y (from -1 to 1) to
    every attended map, as CoordConv does (Liu et al., 2018): not in SCA-CNN, whose convolutional
    features say what is at a location far better than where it is; the shapes captions, which
    are about positions, need it.
    """

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ("stage7",)
    order: str = "cs"
    attention_dim: int = 256
    hidden_dim: int = 512
    embed_dim: int = 256
    dropout: float = 0.5
    finetune_upper: bool = False
    rescale: bool = True
    doubly_stochastic: float = 0.0
    num_tags: int = 0
    tag_heads: int = 1
    tag_lambda: float = 0.1
    tag_loss_weight: float = 0.0
    coord_channels: bool = False

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.order not in ORDERS:
            raise ModelConfigError(f"model config: order must be one of {', '.join(ORDERS)}; got {self.order!r}")
        if not 1 <= len(self.layers) <= 3:
            raise ModelConfigError(f"model config: layers must name 1 to 3 taps; got {list(self.layers)}")
        for name in ("attention_dim", "hidden_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"model config: {name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"model config: dropout must be in [0, 1); got {self.dropout}")
        for name in ("doubly_stochastic", "num_tags", "tag_loss_weight"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"model config: {name} must be >= 0; got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON/YAML types."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Settings back from ``to_dict()`` (or a config file); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"model config: unknown setting(s) {', '.join(unknown)}")
        return cls(**dict(data))


@dataclass
class CaptionState:
    """The decoder state between steps; every tensor has the batch (rows) on dim 0.

    ``h``, ``c``: LSTM state (B, H); ``memory``: the encoder's per-image tensors and the image
    of each row.
    """

    h: Tensor
    c: Tensor
    memory: EncoderMemory

    def select(self, index: Tensor) -> "CaptionState":
        """Rows ``index`` (N,), in that order (beam reorder or repeat); the memory's per-image
        tensors are shared, not copied."""
        return CaptionState(self.h.index_select(0, index), self.c.index_select(0, index), self.memory.select(index))


class StepOutput(NamedTuple):
    """One decoding step.

    ``logits``: (B, V) unnormalised next-word scores; ``state``: the state after the step;
    ``spatial``: per attended layer α (B, m_l), None when the order has no spatial attention
    ("c", "none"); ``channel``: per layer β (B, C_l), None without channel attention ("s", "none").
    Weights sum to 1 over locations / channels.
    """

    logits: Tensor
    state: CaptionState
    spatial: list[Tensor] | None
    channel: list[Tensor] | None


@dataclass
class CaptionerOutput:
    """Teacher-forced outputs for captions (B, T).

    ``logits`` (B, T-1, V) predict ``captions[:, 1:]``; ``spatial`` / ``channel``: per attended
    layer (B, T-1, m_l) / (B, T-1, C_l), None as in ``StepOutput``; ``tag_logits`` (B, K) or None
    without a tag head.
    """

    logits: Tensor
    spatial: list[Tensor] | None
    channel: list[Tensor] | None
    tag_logits: Tensor | None


class CaptionLoss(NamedTuple):
    """``total`` = ``words`` + doubly_stochastic · ``doubly_stochastic`` + tag_loss_weight · ``tags``
    (scalars; a term whose part of the model is absent is 0)."""

    total: Tensor
    words: Tensor
    doubly_stochastic: Tensor
    tags: Tensor


class SCACaptioner(nn.Module):
    """SCA-CNN encoder over a backbone's upper stages + Show-Attend-Tell LSTM decoder (+ tag head).

    ``backbone``: the backbone named by ``config.backbone``, built with its default (pretrained)
    weights when None. Only its stages above the lowest attended layer are kept (and frozen unless
    ``config.finetune_upper``: this freezes them in the given backbone object too).
    """

    def __init__(self, config: ModelConfig, vocab_size: int, backbone: TappedBackbone | None = None) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ModelConfigError(f"vocab_size must be >= 2; got {vocab_size}")
        if backbone is None:
            backbone = build_backbone(config.backbone)
        elif backbone.name != config.backbone:
            raise ModelConfigError(f"model config names backbone {config.backbone!r} but got {backbone.name!r}")
        self.config = config
        self.encoder = SCAEncoder(
            backbone, config.layers, config.attention_dim, config.order, config.rescale, config.finetune_upper,
            config.coord_channels,
        )
        self.decoder = LSTMDecoder(
            vocab_size,
            self.encoder.context_dim,
            config.embed_dim,
            config.hidden_dim,
            self.encoder.query_dim,
            config.dropout,
        )
        self.tag_head = (
            TagHead(self.encoder.context_dim, config.num_tags, config.tag_heads, config.tag_lambda)
            if config.num_tags
            else None
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The cached prefix outputs the model reads (what the feature cache must store)."""
        return self.encoder.inputs

    def init_state(self, features: Mapping[str, Tensor]) -> CaptionState:
        """Cached features {tap: (B, C, H, W)} -> the state before the first word."""
        return self._start(features)[0]

    def step(self, words: Tensor, state: CaptionState) -> StepOutput:
        """Previous words (B,) and state -> next-word logits (B, V), new state and attention."""
        embedded = self.decoder.embed(words)
        h, c, attended = self._advance(self.decoder.input_gates(embedded), state.h, state.c, state.memory)
        logits = self.decoder.logits(embedded, h, attended.context)
        return StepOutput(logits, CaptionState(h, c, state.memory), attended.spatial, attended.channel)

    def forward(self, features: Mapping[str, Tensor], captions: Tensor) -> CaptionerOutput:
        """Teacher forcing: captions (B, T) starting with ``<start>`` -> outputs for steps 1..T-1."""
        if captions.dim() != 2 or captions.shape[1] < 2:
            raise ModelConfigError(f"captions must be (B, T) with T >= 2; got {tuple(captions.shape)}")
        state, top = self._start(features)
        if state.h.shape[0] != captions.shape[0]:
            raise ModelConfigError(f"{state.h.shape[0]} images but {captions.shape[0]} captions")
        words = captions[:, :-1].t()
        embedded = self.decoder.embed(words)
        h, c = state.h, state.c
        hiddens: list[Tensor] = []
        contexts: list[Tensor] = []
        steps: list[EncoderStep] = []
        # unbind, not indexing: its backward stacks the step gradients once instead of adding
        # each into a zero tensor of all steps
        for word_gates in self.decoder.input_gates(embedded).unbind(0):
            h, c, attended = self._advance(word_gates, h, c, state.memory)
            hiddens.append(h)
            contexts.append(attended.context)
            steps.append(attended)
        logits = self.decoder.logits(
            embedded.transpose(0, 1), torch.stack(hiddens, dim=1), torch.stack(contexts, dim=1)
        )
        return CaptionerOutput(
            logits=logits,
            spatial=_stack_layers([s.spatial for s in steps]),
            channel=_stack_layers([s.channel for s in steps]),
            tag_logits=self.tag_head(top) if self.tag_head is not None else None,
        )

    def loss(
        self, output: CaptionerOutput, captions: Tensor, pad_id: int, tag_targets: Tensor | None = None
    ) -> CaptionLoss:
        """Word cross-entropy over the non-pad targets ``captions[:, 1:]``, plus the weighted
        doubly-stochastic and tag terms; ``tag_targets`` (B, K) is needed when the tag loss counts."""
        targets = captions[:, 1:]
        logits = output.logits.reshape(-1, output.logits.shape[-1])
        words = _WordCrossEntropy.apply(logits, targets.reshape(-1), pad_id)
        zero = words.new_zeros(())
        coverage_penalty = zero
        if output.spatial is not None:
            mask = (targets != pad_id).to(words.dtype).unsqueeze(2)
            coverage_penalty = sum(
                ((1.0 - (alpha * mask).sum(dim=1)) ** 2).sum(dim=1).mean() for alpha in output.spatial
            )
        tags = zero
        if output.tag_logits is not None and self.config.tag_loss_weight > 0:
            if tag_targets is None:
                raise ModelConfigError("tag_loss_weight > 0 needs tag targets for the loss")
            tags = tag_loss(output.tag_logits, tag_targets)
        total = words + self.config.doubly_stochastic * coverage_penalty + self.config.tag_loss_weight * tags
        return CaptionLoss(total, words, coverage_penalty, tags)

    def _start(self, features: Mapping[str, Tensor]) -> tuple[CaptionState, Tensor]:
        """The initial state and the top layer's unattended map (B, C_top, H, W)."""
        memory, top = self.encoder.remember(features, self.decoder.embedding.weight.dtype)
        h, c = self.decoder.initial_state(top.mean(dim=(2, 3)))
        return CaptionState(h, c, memory), top

    def _advance(
        self, word_gates: Tensor, h: Tensor, c: Tensor, memory: EncoderMemory
    ) -> tuple[Tensor, Tensor, EncoderStep]:
        """One step shared by ``step`` and ``forward``: word gates (B, 4H), h_{t-1}, c_{t-1}
        -> h_t, c_t and the encoder's attention (computed from h_{t-1})."""
        recurrent, queries = self.decoder.project_hidden(h)
        attended = self.encoder(memory, queries)
        h, c = self.decoder.cell(word_gates + recurrent, attended.context, c)
        return h, c, attended


_LOG_SOFTMAX_ROWS = 32  # rows of logits normalised at once (their log-probabilities stay in cache)


class _WordCrossEntropy(torch.autograd.Function):
    """Mean of −log softmax(logits)[target] over the rows whose target is not ``ignore``:
    ``F.cross_entropy(logits, targets, ignore_index=ignore)`` for logits (N, V) and targets (N,).

    It never builds the (N, V) log-probabilities or a zero-filled gradient: the forward normalises
    ``_LOG_SOFTMAX_ROWS`` rows at a time and keeps only the targets' log-probabilities, and the
    backward writes (softmax − one-hot) · weight straight into the one gradient buffer. Each (N, V)
    buffer is fresh memory the size of the logits, so fewer of them is most of the saving.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, ignore: int) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bfloat16 -> float32
        kept = targets != ignore
        picked = targets.masked_fill(~kept, 0).unsqueeze(1)  # any valid id for the ignored rows
        log_probs = [
            torch.log_softmax(part, dim=1, dtype=dtype).gather(1, ids)
            for part, ids in zip(logits.split(_LOG_SOFTMAX_ROWS), picked.split(_LOG_SOFTMAX_ROWS))
        ]
        keep = kept.to(dtype)
        count = keep.sum()
        ctx.save_for_backward(logits, picked, keep, count)
        return -(torch.cat(log_probs).squeeze(1) * keep).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        logits, picked, keep, count = ctx.saved_tensors
        g_logits = torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
        g_logits.scatter_add_(1, picked, g_logits.new_full(picked.shape, -1.0))
        g_logits.mul_((keep * (grad / count)).unsqueeze(1))
        return g_logits.to(logits.dtype), None, None


def _stack_layers(per_step: list[list[Tensor] | None]) -> list[Tensor] | None:
    """Per step a list of per-layer (B, n) weights -> per layer (B, T, n); None stays None."""
    first = per_step[0] if per_step else None
    if first is None:
        return None
    return [torch.stack([step[layer] for step in per_step if step is not None], dim=1) for layer in range(len(first))]
