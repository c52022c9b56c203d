"""SCA-CNN attention (Chen et al., CVPR 2017): channel-wise and spatial attention inside the CNN,
driven by the LSTM's previous hidden state h, over one to three layers of a backbone.

Notation, per image and attended layer l: V is the feature map, C channels at m = H·W locations,
laid out (m, C) ("channels last"); k is the attention width. A *query* q = W_h h is the projection
of h that one attention reads; the captioner computes every query of every layer in one matmul
with the LSTM's recurrent weights, so the modules here take queries, not h. The paper's equations
(section 3.2 and 3.3), as ``ChannelAttention`` and ``SpatialAttention`` compute them:

    channel (Eq. 5):  b = tanh((W_c ⊗ v + b_c) ⊕ q_c)      k×C,  β = softmax_C(w'ᵀ b)
    spatial (Eq. 3):  a = tanh((W_s V + b_s) ⊕ q_s)        k×m,  α = softmax_m(wᵀ a)

v is V pooled over locations (its mean), ⊗ the outer product of the k-vector W_c with v, ⊕ adds
a k-vector to every column. The paper's scalar score biases (b'_i, b_i) are left out: a softmax
ignores a constant shift, so they would never receive a gradient.

Orders (``ORDERS``) are sequences of the two attentions (``STEPS``), each applied to the map the
previous one left: "cs" β from V, then α from V ⊙ β̃, X = V ⊙ β̃ ⊙ α̃ (the paper's best, Eq. 6);
"sc" α from V, then β from the mean of V ⊙ α̃ (Eq. 7); "c" and "s" one attention only; "none" no
attention at all (the mean-pooled baseline of the ablation).

Magnitude rescaling (``rescale=True``, as the authors' Theano code does): each weight vector is
multiplied by its length, β̃ = C·β and α̃ = m·α, so both average 1 and uniform weights leave the
map unchanged; X then keeps V's mean scale, which matters because X is fed through the backbone's
next (pretrained, frozen) layers. Without rescaling β̃ = β and α̃ = α (the equations as printed).

Context (what the decoder reads from the top layer): z = β̃ ⊙ Σ_i α_i V_i, the α-weighted sum of
the channel-weighted map; an order without spatial attention uses α_i = 1/m (the mean), one
without channel attention β̃ = 1.

Coordinate channels (``coord_channels`` of the encoder, off by default and not in the paper):
every attended map gets two more channels, the x and y of each location from -1 to 1 (CoordConv,
Liu et al. 2018), before its attention; they are dropped again before the backbone's next stages,
and the context carries the α-weighted position of what was attended.

What is computed once per image (``ImageMemory``): the lowest attended layer's V comes from the
feature cache and never changes while a caption is decoded, so its first attention's image-only
term (W_s V + b_s, or the pooled v) is computed once (``first_terms``); a higher layer's V is
recomputed by the backbone from the attended map below at every step. Decoding rows (beams) read
their image's tensors through ``CaptionState.image``, a row-to-image index.

Backends (``KERNELS``): "plain", the default, is the modules above in plain PyTorch: what a
reader holds against the paper, edits, and what a GPU runs. "cpu" is ``sca_caption.models.kernels``,
an explicit choice (the CPU presets make it): the same numbers computed in cache-sized chunks with
hand-written backward passes, faster on a CPU, driven by ``SCALayer.steps`` but reading the
modules' parameters and re-deriving their equations, so a layer it was not written for (another
module class, a new parameter) is refused when built. Both are tested equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from sca_caption.models import kernels as cpu_kernels
from sca_caption.models.backbones.base import TappedBackbone, freeze
from sca_caption.models.errors import ModelConfigError

STEPS = {"cs": ("channel", "spatial"), "sc": ("spatial", "channel"), "c": ("channel",), "s": ("spatial",), "none": ()}
ORDERS = tuple(STEPS)
KERNELS = ("plain", "cpu")
COORD_CHANNELS = 2  # x and y of each location, appended to attended maps when asked for


@dataclass(frozen=True)
class AttentionWeights:
    """The attention weights of every attended layer, low to high, at one step or stacked over
    steps: ``spatial`` α (..., m_l), ``channel`` β (..., C_l), each summing to 1 over its last
    dimension (the weights before rescaling); None where the order has no such attention."""

    spatial: tuple[Tensor, ...] | None
    channel: tuple[Tensor, ...] | None


class ChannelAttention(nn.Module):
    """β = softmax_C(w'ᵀ tanh((W_c ⊗ v + b_c) ⊕ q)): one weight per channel.

    Parameters: ``weight`` W_c (k,), ``bias`` b_c (k,), ``score`` w' (k,).
    """

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.attention_dim = attention_dim
        self.weight = nn.Parameter(torch.empty(attention_dim).uniform_(-1.0, 1.0))
        self.bias = nn.Parameter(torch.zeros(attention_dim))
        bound = 1.0 / math.sqrt(attention_dim)
        self.score = nn.Parameter(torch.empty(attention_dim).uniform_(-bound, bound))

    def forward(self, pooled: Tensor, query: Tensor) -> Tensor:
        """Pooled map v (R, C) and query q = W_hc h (R, k) -> channel weights β (R, C)."""
        b = torch.tanh(pooled.unsqueeze(2) * self.weight + self.bias + query.unsqueeze(1))  # (R, C, k): bᵀ
        return torch.softmax(b @ self.score, dim=1)


class SpatialAttention(nn.Module):
    """α = softmax_m(wᵀ tanh((W_s V + b_s) ⊕ q)): one weight per location.

    Parameters: ``key`` the linear map W_s, b_s (C -> k), ``score`` w (k,).
    """

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(channels, attention_dim)
        bound = 1.0 / math.sqrt(attention_dim)
        self.score = nn.Parameter(torch.empty(attention_dim).uniform_(-bound, bound))

    def forward(self, maps: Tensor, query: Tensor, keys: Tensor | None = None) -> Tensor:
        """Map V (R, m, C) and query q = W_hs h (R, k) -> spatial weights α (R, m).

        ``keys``: W_s V + b_s (R, m, k) where already computed (``first_terms``)."""
        keys = self.key(maps) if keys is None else keys
        a = torch.tanh(keys + query.unsqueeze(1))  # (R, m, k): aᵀ
        return torch.softmax(a @ self.score, dim=1)


@dataclass(frozen=True)
class FirstTerms:
    """The image-only term of a layer's first attention, computed once per image: ``keys``
    W_s V + b_s (N, m, k) when it is spatial, ``pooled`` v (N, C) when it is channel-wise."""

    keys: Tensor | None = None
    pooled: Tensor | None = None


class SCALayer(nn.Module):
    """Channel and/or spatial attention over one layer, in one of ``ORDERS``.

    ``order`` and ``kernels`` as ``ModelConfig`` checks them (``config_rules``). ``kernels``: the
    backend, one of ``KERNELS`` (see the module docstring); "cpu" refuses a layer
    whose modules are not the ones the kernels implement (``kernels.check_implements``).
    """

    def __init__(self, channels: int, attention_dim: int, order: str, rescale: bool, kernels: str = "plain") -> None:
        super().__init__()
        self.order = order
        self.steps = STEPS[order]
        self.rescale = rescale
        self.attention_dim = attention_dim
        self.kernels = kernels
        self.channel = ChannelAttention(channels, attention_dim) if "channel" in self.steps else None
        self.spatial = SpatialAttention(channels, attention_dim) if "spatial" in self.steps else None
        if kernels == "cpu":
            cpu_kernels.check_implements(self)

    @property
    def query_dim(self) -> int:
        """Width of this layer's queries: k per attention, the channel query first."""
        return self.attention_dim * len(self.steps)

    def first_terms(self, maps: Tensor) -> FirstTerms:
        """The image-only term of the first attention, for maps V (N, m, C)."""
        if not self.steps:
            return FirstTerms()
        if self.steps[0] == "spatial":
            assert self.spatial is not None
            return FirstTerms(keys=self.spatial.key(maps))
        return FirstTerms(pooled=maps.mean(dim=1))

    def forward(
        self,
        maps: Tensor,
        queries: Tensor,
        rows: Tensor | None = None,
        terms: FirstTerms | None = None,
        top: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Attend per-image maps V (N, m, C) with queries (R, query_dim) -> (out, α, β).

        ``rows`` (R,): the image each row reads (row r reads image r when None); ``terms``:
        ``self.first_terms(maps)`` where already computed. ``out`` is X (R, m, C), or the context z
        (R, C) when ``top``; α (R, m) and β (R, C) are None without that attention.
        """
        if self.kernels == "cpu":
            return cpu_kernels.attend(self, maps, queries, rows, terms, top)
        v = per_row(maps, rows)  # (R, m, C)
        query = self.split_queries(queries)
        _, m, c = v.shape
        x, alpha, beta = v, None, None
        for i, step in enumerate(self.steps):
            cached = terms if i == 0 and terms is not None else FirstTerms()
            if step == "channel":
                assert self.channel is not None
                pooled = x.mean(dim=1) if cached.pooled is None else per_row(cached.pooled, rows)
                beta = self.channel(pooled, query["channel"])
                x = x * self.rescaled(beta, c).unsqueeze(1)  # V ⊙ β̃
            else:
                assert self.spatial is not None
                keys = None if cached.keys is None else per_row(cached.keys, rows)
                alpha = self.spatial(x, query["spatial"], keys)
                x = x * self.rescaled(alpha, m).unsqueeze(2)  # V ⊙ α̃
        if not top:
            return x, alpha, beta
        weights = torch.full_like(v[..., 0], 1.0 / m) if alpha is None else alpha
        context = torch.einsum("rm,rmc->rc", weights, v)  # Σ_i α_i V_i
        if beta is not None:
            context = context * self.rescaled(beta, c)  # β̃ ⊙ Σ_i α_i V_i
        return context, alpha, beta

    def split_queries(self, queries: Tensor) -> dict[str, Tensor]:
        """Queries (R, query_dim) -> {step: its query (R, k)}, the channel query first."""
        steps = [step for step in ("channel", "spatial") if step in self.steps]
        return dict(zip(steps, queries.split(self.attention_dim, 1)))

    def rescaled(self, weights: Tensor, length: int) -> Tensor:
        """β̃ = C·β or α̃ = m·α with ``rescale``, else the weights themselves."""
        return weights * length if self.rescale else weights


def per_row(x: Tensor, rows: Tensor | None) -> Tensor:
    """Per-image ``x`` (N, ...) read per row: ``x[rows]`` (R, ...), or ``x`` itself without ``rows``."""
    return x if rows is None else x.index_select(0, rows)


@dataclass(frozen=True)
class ImageMemory:
    """What the encoder keeps per image while its captions are decoded (N images).

    ``maps``: the lowest attended layer (N, H, W, C), channels last; ``terms``: its first
    attention's image-only term; ``side``: earlier taps the upper stages read, {tap: (N, C, H, W)};
    ``context``: the fixed context (N, C_top) of order "none" (then ``maps`` is None).
    """

    maps: Tensor | None
    terms: FirstTerms
    side: dict[str, Tensor]
    context: Tensor | None


class SCAEncoder(nn.Module):
    """Multi-layer SCA over a backbone: attend layer l, run the backbone's next stages on the
    attended map to get layer l + 1, attend that, ..., up to the top layer's context.

    The upper stages always run in eval mode (their batch-norm statistics stay fixed, as in the
    authors' code); ``finetune_upper`` only decides whether their weights get gradients. The
    buffer ``prefix_fingerprint`` holds ``BackbonePrefix.fingerprint()`` of the backbone it was
    built from, so a trained model knows which prefix its features must come from.
    """

    def __init__(
        self,
        backbone: TappedBackbone,
        layers: Sequence[str],
        attention_dim: int,
        order: str,
        rescale: bool,
        finetune_upper: bool,
        coord_channels: bool = False,
        kernels: str = "plain",
    ) -> None:
        super().__init__()
        try:
            prefix, upper = backbone.split(layers)
        except ValueError as error:
            raise ModelConfigError(f"layers: {error}") from None
        self.layer_names = tuple(layers)
        self.inputs = prefix.outputs
        # what the features it reads were computed with (checked where the prefix is rebuilt)
        self.register_buffer("prefix_fingerprint", torch.frombuffer(bytearray(prefix.fingerprint()), dtype=torch.uint8))
        self.channels = tuple(backbone.tap_info[name].channels for name in layers)
        self._input_channels = {name: backbone.tap_info[name].channels for name in self.inputs}
        self.order = order
        self.upper = upper
        self.finetune_upper = finetune_upper
        if not finetune_upper:
            freeze(upper)
        self.upper.eval()
        self.coord_channels = coord_channels
        extra = COORD_CHANNELS if coord_channels else 0
        self.layers = nn.ModuleList(SCALayer(c + extra, attention_dim, order, rescale, kernels) for c in self.channels)
        widths = [layer.query_dim for layer in self.layers]
        self._query_offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]

    @property
    def query_dim(self) -> int:
        """Width of all queries of one step, layer after layer."""
        return self._query_offsets[-1]

    @property
    def context_dim(self) -> int:
        """Channels of the top layer (plus the coordinate channels), the context's width."""
        return self.channels[-1] + (COORD_CHANNELS if self.coord_channels else 0)

    @property
    def features_fingerprint(self) -> bytes:
        """``BackbonePrefix.fingerprint()`` of the prefix whose features this encoder reads (the
        ``prefix_fingerprint`` buffer as bytes)."""
        return bytes(self.prefix_fingerprint.cpu().tolist())

    def train(self, mode: bool = True) -> "SCAEncoder":
        """Set the attention's mode; the upper stages stay in eval mode."""
        super().train(mode)
        self.upper.eval()
        return self

    def remember(self, features: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[ImageMemory, Tensor]:
        """Cached prefix outputs {tap: (N, C, H, W)} -> the per-image memory and the top layer's
        unattended map (N, context_dim, H, W), computed through the upper stages.

        The features are cast to ``dtype`` (the cache stores float16) and made channels last.
        With ``coord_channels`` every attended map, and the returned top map, carries the two
        coordinate channels after its own.
        """
        taps = {
            name: self._feature(features, name).to(dtype).contiguous(memory_format=torch.channels_last)
            for name in self.inputs
        }
        top = taps[self.layer_names[0]]
        unattended = dict(taps)
        for i in range(len(self.layer_names) - 1):
            top = self.upper(i, top, unattended)
            unattended[self.layer_names[i + 1]] = top
        side = {name: x for name, x in taps.items() if name != self.layer_names[0]}
        top = self._with_coordinates(top.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.order == "none":
            return ImageMemory(None, FirstTerms(), {}, top.mean(dim=(2, 3))), top
        maps = self._with_coordinates(taps[self.layer_names[0]].permute(0, 2, 3, 1))
        return ImageMemory(maps, self.layers[0].first_terms(maps.flatten(1, 2)), side, None), top

    def forward(self, memory: ImageMemory, queries: Tensor, rows: Tensor | None = None) -> tuple[Tensor, AttentionWeights]:
        """Attend every layer with this step's queries (R, query_dim) -> the context z (R, C_top)
        and the step's attention; row r reads image ``rows[r]`` (image r when None)."""
        if memory.maps is None:
            assert memory.context is not None
            return per_row(memory.context, rows), AttentionWeights(None, None)
        taps = {name: per_row(x, rows) for name, x in memory.side.items()}
        maps = memory.maps
        spatial: list[Tensor] = []
        channel: list[Tensor] = []
        last = len(self.layers) - 1
        offset = self._query_offsets
        for i, layer in enumerate(self.layers):
            output, alpha, beta = layer(
                maps.flatten(1, 2),
                queries[:, offset[i] : offset[i + 1]],
                rows if i == 0 else None,
                memory.terms if i == 0 else None,
                top=i == last,
            )
            spatial += [alpha] if alpha is not None else []
            channel += [beta] if beta is not None else []
            if i < last:
                x = output.view(-1, *maps.shape[1:])[..., : self.channels[i]].permute(0, 3, 1, 2)
                taps[self.layer_names[i]] = x
                maps = self._with_coordinates(self.upper(i, x, taps).permute(0, 2, 3, 1))
        return output, AttentionWeights(tuple(spatial) or None, tuple(channel) or None)

    def _with_coordinates(self, maps: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C + 2) with x then y of each location, from -1 (left, top) to 1,
        when ``coord_channels``; otherwise ``maps`` itself."""
        if not self.coord_channels:
            return maps
        b, h, w, _ = maps.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=maps.dtype, device=maps.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=maps.dtype, device=maps.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2): x, y
        return torch.cat([maps, grid.expand(b, h, w, COORD_CHANNELS)], dim=-1)

    def _feature(self, features: Mapping[str, Tensor], name: str) -> Tensor:
        """``features[name]``, checked to be (B, C, H, W) with this tap's channels."""
        if name not in features:
            raise ModelConfigError(
                f"features lack tap {name!r}: attending {', '.join(self.layer_names)} needs {', '.join(self.inputs)}"
            )
        x = features[name]
        expected = self._input_channels[name]
        if x.dim() != 4 or x.shape[1] != expected:
            raise ModelConfigError(f"features[{name!r}]: expected (B, {expected}, H, W), got {tuple(x.shape)}")
        return x
