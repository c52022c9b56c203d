"""SCA-CNN captioner: the multi-layer SCA encoder, the LSTM decoder and an optional CSRA tag head.

The model reads the cached backbone prefix outputs ({tap: (B, C, H, W)}, named by
``feature_names``), never images. Decoding drives it one word at a time (``start`` then
``step``); training uses ``forward`` (teacher forcing), which runs exactly the same step
computation, so the scores beam search sees are the scores training optimised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sca_caption.models.backbones import TappedBackbone, build_backbone
from sca_caption.config_rules import first_problem, rules_of, section_values
from sca_caption.models.decoder import LSTMDecoder, UpDownDecoder
from sca_caption.models.errors import ModelConfigError
from sca_caption.models.sca import AttentionWeights, ImageMemory, SCAEncoder
from sca_caption.models.tag_head import TagHead, tag_loss



@dataclass(frozen=True)
class ModelConfig:
    """Model settings; plain types only, saved in checkpoints as ``to_dict()``.

    ``layers``: attended taps, low to high (1 to 3); ``order``: one of ``ORDERS``;
    ``finetune_upper``: train the backbone stages between attended layers; ``rescale``: keep
    attended maps at the unattended scale (see ``sca``); ``doubly_stochastic``: weight of
    Show-Attend-Tell's Σ_i (1 − Σ_t α_ti)² regulariser; ``num_tags`` > 0 adds the CSRA tag head
    (``tag_heads`` heads, residual weight ``tag_lambda``), whose BCE joins the loss with weight
    ``tag_loss_weight``; it reads the unattended top map, so its loss trains shared weights only
    where that map is computed in the model (upper stages with ``finetune_upper``): on cached
    features it trains the head alone and leaves the captions as they were. ``coord_channels``
    appends each location's x and y (from -1 to 1) to every attended map, as CoordConv does (Liu
    et al., 2018): not in SCA-CNN, whose convolutional features say what is at a location far
    better than where it is; the shapes captions, which are about positions, need it.
    ``kernels``: the attention's backend, one of ``KERNELS`` ("plain": the modules' equations;
    "cpu": the CPU kernels, an explicit choice; see ``sca``). ``decoder``: "sat", Show-Attend-Tell's
    LSTM as SCA-CNN uses it (h_{t-1} queries the encoder), or "updown", Up-Down's attention and
    language LSTMs (the attention LSTM's h¹_t queries it; ``models.decoder``).

    Where the authors' Theano code differs from the defaults (the authors' setting in brackets):

    - ``context_to_output`` True: the output layer reads z_t through L_z (False: their
      ``ctx2out=False`` default, the paper's output equation of h_t and y_{t-1} only);
    - ``normalize_features`` False: z_t and the mean feature as computed (True: both
      L2-normalised before the decoder reads them);
    - ``finetune_upper`` False: the backbone stages between attended layers frozen (True:
      fine-tuned with the captioner, at ``train.upper_lr_scale`` times its learning rate).
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
    kernels: str = "plain"
    context_to_output: bool = True
    normalize_features: bool = False
    decoder: str = "sat"

    def __post_init__(self) -> None:
        """The model rules of ``config_rules``."""
        object.__setattr__(self, "layers", tuple(self.layers))
        problem = first_problem(rules_of("model"), section_values("model", self))
        if problem:
            raise ModelConfigError(problem)

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


@dataclass(frozen=True)
class CaptionState:
    """The decoder state between steps, one row per caption being decoded.

    ``h``, ``c``: the LSTM's hidden state and cell (R, H); ``image``: (R,) the image (row of the
    ``ImageMemory``) each row reads, or None when row r reads image r.
    """

    h: Tensor
    c: Tensor
    image: Tensor | None = None

    def select(self, index: Tensor) -> "CaptionState":
        """Rows ``index`` (R',), in that order (beam reorder or repeat); per-image tensors are
        never copied, only the row-to-image index follows."""
        image = index if self.image is None else self.image.index_select(0, index)
        return CaptionState(self.h.index_select(0, index), self.c.index_select(0, index), image)


class CaptionMemory(NamedTuple):
    """What decoding keeps per image (N images): the encoder's ``ImageMemory`` and the decoder's
    per-image gate terms (N, G), or None where the decoder has none."""

    encoder: ImageMemory
    image_gates: Tensor | None


class StepOutput(NamedTuple):
    """One decoding step: ``logits`` (R, V) unnormalised next-word scores, the ``state`` after
    the step and the ``attention`` the step used (per layer α (R, m_l), β (R, C_l))."""

    logits: Tensor
    state: CaptionState
    attention: AttentionWeights


class CaptionerOutput(NamedTuple):
    """Teacher-forced outputs for captions (B, T): ``logits`` (B, T-1, V) predict
    ``captions[:, 1:]``; ``attention`` per layer (B, T-1, m_l) / (B, T-1, C_l); ``tag_logits``
    (B, K), or None without a tag head."""

    logits: Tensor
    attention: AttentionWeights
    tag_logits: Tensor | None


class CaptionLoss(NamedTuple):
    """A batch's loss as sums and their counts, so that shares of a batch (DDP) add up exactly.

    ``words``: Σ −log p(target) over the non-pad targets (label-smoothed where asked), ``tokens``
    of them; ``per_image``: Σ over the ``images`` of doubly_stochastic · Σ_l Σ_i (1 − Σ_t α_ti)²
    + tag_loss_weight · (mean tag BCE).
    """

    words: Tensor
    per_image: Tensor
    tokens: int
    images: int

    def mean(self, tokens: int | None = None, images: int | None = None) -> Tensor:
        """words / tokens + per_image / images, over this batch's counts or the given ones (a
        global batch's, when this is one process's share)."""
        return self.words / (tokens or self.tokens) + self.per_image / (images or self.images)


class SCACaptioner(nn.Module):
    """SCA-CNN encoder over a backbone's upper stages + Show-Attend-Tell LSTM decoder (+ tag head).

    ``backbone``: the backbone named by ``config.backbone``, built with its default (pretrained)
    weights when None. Only its stages above the lowest attended layer are kept (and frozen unless
    ``config.finetune_upper``: this freezes them in the given backbone object too).

    Decoding: ``start(features)`` gives the state before the first word and the per-image memory;
    ``step(words, state, memory)`` is the one decoding step (embedding, the queries of every
    attended layer, the encoder, the LSTM and the output layer). Teacher forcing (``forward``) runs
    the same step for every position of the captions.
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
            config.coord_channels, config.kernels,
        )
        sizes = (vocab_size, self.encoder.context_dim, config.embed_dim, config.hidden_dim, self.encoder.query_dim, config.dropout)
        self.decoder: LSTMDecoder | UpDownDecoder = (
            UpDownDecoder(*sizes) if config.decoder == "updown" else LSTMDecoder(*sizes, config.context_to_output)
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

    def start(self, features: Mapping[str, Tensor]) -> tuple[CaptionState, CaptionMemory]:
        """Cached features {tap: (N, C, H, W)} -> the state before the first word (N rows) and
        the images' memory."""
        state, memory, _ = self._start(features)
        return state, memory

    def step(self, words: Tensor, state: CaptionState, memory: CaptionMemory) -> StepOutput:
        """Previous words (R,), state and memory -> next-word logits (R, V), new state, attention."""
        embedded = self.decoder.embed(words)
        h, c, output, context, attention = self._advance(self.decoder.input_gates(embedded), state, memory)
        logits = self.decoder.logits(embedded, output, context)
        return StepOutput(logits, CaptionState(h, c, state.image), attention)

    def forward(self, features: Mapping[str, Tensor], captions: Tensor) -> CaptionerOutput:
        """Teacher forcing: captions (B, T) starting with ``<start>`` -> outputs for steps 1..T-1.

        The step of ``step``, with the word projections and the output layer of all positions
        computed at once (one large matmul each instead of T - 1 small ones)."""
        if captions.dim() != 2 or captions.shape[1] < 2:
            raise ModelConfigError(f"captions must be (B, T) with T >= 2; got {tuple(captions.shape)}")
        state, memory, top = self._start(features)
        if state.h.shape[0] != captions.shape[0]:
            raise ModelConfigError(f"{state.h.shape[0]} images but {captions.shape[0]} captions")
        embedded = self.decoder.embed(captions[:, :-1].t())
        hiddens: list[Tensor] = []
        contexts: list[Tensor] = []
        attentions: list[AttentionWeights] = []
        # unbind, not indexing: its backward stacks the step gradients once instead of adding
        # each into a zero tensor of all steps
        for word_gates in self.decoder.input_gates(embedded).unbind(0):
            h, c, output, context, attention = self._advance(word_gates, state, memory)
            state = CaptionState(h, c)
            hiddens.append(output)
            contexts.append(context)
            attentions.append(attention)
        logits = self.decoder.logits(
            embedded.transpose(0, 1), torch.stack(hiddens, dim=1), torch.stack(contexts, dim=1)
        )
        tag_logits = self.tag_head(top) if self.tag_head is not None else None
        return CaptionerOutput(logits, _stack_steps(attentions), tag_logits)

    def loss(
        self,
        output: CaptionerOutput,
        captions: Tensor,
        pad_id: int,
        tag_targets: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> CaptionLoss:
        """Summed word cross-entropy over the non-pad targets ``captions[:, 1:]`` and the summed,
        weighted per-image terms; ``tag_targets`` (B, K) is needed when the tag loss counts.

        ``label_smoothing`` ε: each target's term is (1 − ε)·(−log p_target) + ε·mean_k(−log p_k)
        over the K words of the vocabulary (Szegedy et al. 2016)."""
        targets = captions[:, 1:]
        words = F.cross_entropy(
            output.logits.reshape(-1, output.logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=pad_id, reduction="sum", label_smoothing=label_smoothing,
        )
        per_image = words.new_zeros(())
        config = self.config
        if output.attention.spatial is not None and config.doubly_stochastic > 0:
            mask = (targets != pad_id).to(words.dtype).unsqueeze(2)
            coverage = sum(((1.0 - (alpha * mask).sum(dim=1)) ** 2).sum() for alpha in output.attention.spatial)
            per_image = per_image + config.doubly_stochastic * coverage
        if output.tag_logits is not None and config.tag_loss_weight > 0:
            if tag_targets is None:
                raise ModelConfigError("tag_loss_weight > 0 needs tag targets for the loss")
            per_image = per_image + config.tag_loss_weight * tag_loss(output.tag_logits, tag_targets) * len(captions)
        return CaptionLoss(words, per_image, int((targets != pad_id).sum()), len(captions))

    def _start(self, features: Mapping[str, Tensor]) -> tuple[CaptionState, CaptionMemory, Tensor]:
        """The initial state, the memory and the top layer's unattended map (B, C_top, H, W)."""
        memory, top = self.encoder.remember(features, self.decoder.embedding.weight.dtype)
        mean = self._decoder_view(top.mean(dim=(2, 3)))
        h, c = self.decoder.initial_state(mean)
        return CaptionState(h, c), CaptionMemory(memory, self.decoder.image_gates(mean)), top

    def _advance(
        self, word_gates: Tensor, state: CaptionState, memory: CaptionMemory
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, AttentionWeights]:
        """The step's recurrence (the decoder's ``advance``, with the encoder as its attention):
        word gates (R, G) and the state at t-1 -> h_t, c_t, the output layer's hidden, the
        context z_t and the attention."""

        def attend(queries: Tensor) -> tuple[Tensor, AttentionWeights]:
            context, attention = self.encoder(memory.encoder, queries, state.image)
            return self._decoder_view(context), attention

        image_gates = memory.image_gates
        if image_gates is not None and state.image is not None:
            image_gates = image_gates.index_select(0, state.image)
        return self.decoder.advance(word_gates, state.h, state.c, image_gates, attend)

    def _decoder_view(self, feature: Tensor) -> Tensor:
        """A context or mean feature (R, C) as the decoder reads it: L2-normalised per row with
        ``normalize_features``, else as it is."""
        return F.normalize(feature, dim=1) if self.config.normalize_features else feature


def _stack_steps(steps: list[AttentionWeights]) -> AttentionWeights:
    """Per step the attention (R, n) of every layer -> per layer (R, T, n); None stays None."""

    def stack(per_step: list[tuple[Tensor, ...] | None]) -> tuple[Tensor, ...] | None:
        if per_step[0] is None:
            return None
        return tuple(torch.stack(layer, dim=1) for layer in zip(*per_step))  # type: ignore[arg-type]

    return AttentionWeights(stack([a.spatial for a in steps]), stack([a.channel for a in steps]))
