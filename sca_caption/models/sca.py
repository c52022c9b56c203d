"""SCA-CNN attention (Chen et al., CVPR 2017): channel-wise and spatial attention inside the CNN,
driven by the LSTM's previous hidden state h, over one to three layers of a backbone.

Notation, per image and attended layer: V is the feature map, C channels at m = H·W locations,
laid out (m, C) ("channels last") so every projection is one large matmul; k is the attention
width. A *query* q = W_h h is the projection of h that an attention reads; the captioner computes
every query of every layer in one matmul together with the LSTM's recurrent weights, so the
modules here take queries, not h.

    channel:  b = tanh((W_c ⊗ v + b_c) ⊕ q_c)     k×C     β = softmax_C(w'ᵀ b)
    spatial:  a = tanh((W_s V + b_s) ⊕ q_s)       k×m     α = softmax_m(wᵀ a)

v is V pooled over locations, ⊗ the outer product of the k-vector W_c with v, ⊕ adds a k-vector
to every column. The paper's scalar score biases (b'_i, b_i) are left out: a softmax ignores a
constant shift, so they would never receive a gradient.

Orders (``ORDERS``): "cs" β from V, then α from the channel-weighted map, X = V ⊙ β ⊙ α (the
paper's best); "sc" α from V, then β from the spatially weighted map pooled; "c" and "s" one
attention only; "none" no attention at all (the mean-pooled baseline of the ablation).

Magnitude rescaling (``rescale=True``, as the authors' Theano code does): each weight vector is
multiplied by its length, β̃ = C·β and α̃ = m·α, so both average 1 and uniform weights leave the
map unchanged; X = V ⊙ β̃ ⊙ α̃ then keeps V's mean scale, which matters because X is fed through
the backbone's next (pretrained, frozen) layers. Without rescaling β̃ = β and α̃ = α (the
equations as printed). The same β̃, α̃ are used for the intermediate maps: "cs" computes α from
V ⊙ β̃, "sc" pools V ⊙ α̃ over locations (its mean) for β.

Context (what the decoder reads from the top layer): z = β̃ ⊙ Σ_i α_i V_i, the α-weighted sum of
the channel-weighted map, i.e. Σ_i X_i / (m or 1) = the spatial mean of the rescaled X, or the
spatial sum of the unrescaled one; a mode without spatial attention uses α_i = 1/m (the mean).

Coordinate channels (``coord_channels``, off by default and not in the paper): every attended
map gets two more channels, the x and y of each location from -1 to 1 (CoordConv, Liu et al.
2018), before its attention; they are dropped again before the backbone's next stages, and the
context carries the α-weighted position of what was attended. Convolutional features encode
what is at a location much better than where it is, and captions about positions need the latter.

Cost per step and image: channel attention k·C tanh's; spatial attention over a channel-weighted
map m·C·k multiply-adds (its W_s projection cannot be cached: β changes every step), over the
cached first layer's V only m·k (W_s V + b_s is computed once per image in ``prepare``; a higher
layer's V changes every step). The channel-weighted map V ⊙ β̃ is never stored: its projection and
scores are computed a few rows at a time while in cache (``_WeightedSpatialScores``), and the top
context is taken as β̃ ⊙ Σ_i α_i V_i. Decoding rows (beams) read their image's per-image tensors
through ``EncoderMemory.rows`` rather than per-row copies.

tanh is evaluated as 2σ(2x) − 1 in the scores: the sum wᵀ tanh(x) then equals 2wᵀσ(2x) − Σ w, and
the constant Σ w cancels in the softmax. A sigmoid is several times cheaper than a tanh on a CPU,
and the k×C channel map is the largest element-wise tensor of a decoding step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from sca_caption.models.backbones.base import TappedBackbone, freeze
from sca_caption.models.errors import ModelConfigError

ORDERS = ("cs", "sc", "c", "s", "none")
COORD_CHANNELS = 2  # x and y of each location, appended to attended maps when asked for
_CHANNEL_ORDERS = ("cs", "sc", "c")
_SPATIAL_ORDERS = ("cs", "sc", "s")


_CHUNK_ELEMENTS = 1 << 18  # floats of the (rows, C, k) channel map handled at once: 1 MiB, about L2
_SPATIAL_CHUNK_ELEMENTS = 1 << 18  # floats of a (rows, m, max(C, k)) block of the C-S spatial attention


class _ChannelScores(torch.autograd.Function):
    """scores[b, c] = Σ_j weight_j σ(slope_j · pooled[b, c] + offset[b, j]).

    The (B, C, k) sigmoid map is the largest tensor of a step (21 MB for 64 images at C = 320,
    k = 256), so it is never stored whole: it is built, reduced and discarded a few images at a
    time (``_CHUNK_ELEMENTS``) in one reused buffer that stays in cache. The backward pass rebuilds
    each chunk (a sigmoid costs about what writing the map to memory and reading it back would)
    and takes every gradient from it at once.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, pooled: Tensor, offset: Tensor, slope: Tensor, weight: Tensor) -> Tensor:
        scores = pooled.new_empty(pooled.shape)
        parts = _row_chunks(pooled.shape[0], pooled.shape[1] * offset.shape[1], _CHUNK_ELEMENTS)
        buffer = _scratch(pooled, parts, pooled.shape[1], offset.shape[1])
        for rows in parts:
            torch.matmul(_sigmoid_map(pooled, offset, slope, rows, buffer), weight, out=scores[rows])
        ctx.save_for_backward(pooled, offset, slope, weight)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pooled, offset, slope, weight = ctx.saved_tensors
        need_pooled = ctx.needs_input_grad[0]  # False for a cached first layer's mean
        g_pooled = torch.empty_like(pooled) if need_pooled else None
        g_offset = torch.empty_like(offset)
        g_slope, g_weight = torch.zeros_like(slope), torch.zeros_like(weight)
        weight_slope = weight * slope
        k = weight.shape[0]
        parts = _row_chunks(pooled.shape[0], pooled.shape[1] * offset.shape[1], _CHUNK_ELEMENTS)
        buffer = _scratch(pooled, parts, pooled.shape[1], k)
        for rows in parts:
            hidden = _sigmoid_map(pooled, offset, slope, rows, buffer)
            g_weight.addmv_(hidden.reshape(-1, k).t(), grad[rows].reshape(-1))
            # grad[b, c] · σ'(x) with σ' = σ(1 - σ), over the map in place
            derivative = _sigmoid_grad(grad[rows].unsqueeze(2), hidden)
            torch.sum(derivative, dim=1, out=g_offset[rows])
            g_slope.addmv_(derivative.reshape(-1, k).t(), pooled[rows].reshape(-1))
            if g_pooled is not None:
                torch.matmul(derivative, weight_slope, out=g_pooled[rows])
        return g_pooled, g_offset * weight, g_slope * weight, g_weight


def _sigmoid_map(pooled: Tensor, offset: Tensor, slope: Tensor, rows: slice, buffer: Tensor) -> Tensor:
    """σ(slope_j · pooled[b, c] + offset[b, j]) for the images ``rows``: (rows, C, k), written
    into the front of ``buffer``."""
    out = _front(buffer, rows)
    return torch.addcmul(offset[rows].unsqueeze(1), pooled[rows].unsqueeze(2), slope, out=out).sigmoid_()


def _sigmoid_grad(grad: Tensor, sigmoid: Tensor, out: Tensor | None = None) -> Tensor:
    """grad · σ(1 - σ) from the sigmoid's output (broadcast), into ``out`` (default: over
    ``sigmoid`` itself)."""
    return torch.ops.aten.sigmoid_backward.grad_input(grad, sigmoid, grad_input=sigmoid if out is None else out)


def _scratch(like: Tensor, parts: list[slice], *shape: int) -> Tensor:
    """An empty (rows, *shape) buffer for the largest of ``parts``, to be reused chunk after chunk.

    Intermediates written into fresh memory cost more than their arithmetic on a CPU (page
    faults, then a cache miss on every first write), while one reused buffer stays in cache.
    """
    return like.new_empty(max(part.stop - part.start for part in parts), *shape)


def _front(buffer: Tensor, part: slice) -> Tensor:
    """The first ``len(part)`` rows of ``buffer``: where chunk ``part`` is written."""
    return buffer[: part.stop - part.start]


class _WeightedSpatialScores(torch.autograd.Function):
    """scores[r, i] = Σ_j 2w_j σ(2(W_s (s_r ⊙ V_{n(r), i}) + b_s + q_r)_j), which is wᵀ tanh((W_s V'
    + b_s) ⊕ q) up to a constant, over the channel-weighted map V' = V ⊙ s of row r; row r reads
    image n(r) = ``rows[r]`` (image r when ``rows`` is None).

    V' (the size of V per row) is never stored: a few rows at a time (``_SPATIAL_CHUNK_ELEMENTS``)
    it is built from the per-image V (read at use, so the beams of an image share its V),
    projected by one matmul over all the chunk's locations and reduced while it is in cache. The
    (R, m, k) sigmoid map is kept for the backward pass, which rebuilds V' chunk by chunk for the
    gradients of W_s and s.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        maps: Tensor,
        scale: Tensor,
        query: Tensor,
        key_weight: Tensor,
        key_bias: Tensor,
        score: Tensor,
        rows: Tensor | None,
    ) -> Tensor:
        total, m, channels = scale.shape[0], maps.shape[1], maps.shape[2]
        k = key_weight.shape[0]
        projection = key_weight.t().mul(2)  # (C, k): the tanh trick's 2x folded into W_s and b_s + q
        offset = (key_bias + query).mul(2)
        score2 = score.mul(2)
        keep = any(ctx.needs_input_grad)
        hidden = maps.new_empty(total, m, k) if keep else None
        scores = maps.new_empty(total, m)
        group = _per_image(rows, maps.shape[0])
        parts = _row_chunks(total, m * max(channels, k), _SPATIAL_CHUNK_ELEMENTS, group)
        weighted_buffer = _scratch(maps, parts, m, channels)
        block_buffer = None if hidden is not None else _scratch(maps, parts, m, k)
        for part in parts:
            weighted = _weighted_rows(maps, scale, rows, part, group, weighted_buffer)
            block = hidden[part] if block_buffer is None else _front(block_buffer, part)
            torch.mm(weighted.reshape(-1, channels), projection, out=block.view(-1, k))
            block.add_(offset[part].unsqueeze(1)).sigmoid_()
            torch.mv(block.view(-1, k), score2, out=scores[part].view(-1))
        if keep:
            ctx.save_for_backward(maps, scale, key_weight, score, hidden, rows)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        maps, scale, key_weight, score, hidden, rows = ctx.saved_tensors
        need_maps, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, m, k = hidden.shape
        channels = maps.shape[2]
        # with u = σ(x), x = 2(keys + q): ∂scores/∂keys = 4w ⊙ u(1 - u), so every gradient below is
        # 4w times a sum of grad · u(1 - u) ("slope")
        factor = score.mul(4)
        back_projection = key_weight * factor.unsqueeze(1)  # (k, C)
        g_maps = torch.zeros_like(maps) if need_maps else None
        g_scale = torch.empty_like(scale) if need_scale else None
        g_offset = hidden.new_empty(total, k)
        g_weight = torch.zeros_like(key_weight)
        g_score = hidden.new_zeros(k)
        parts = _row_chunks(total, m * max(channels, k), _SPATIAL_CHUNK_ELEMENTS)
        slope_buffer = _scratch(hidden, parts, m, k)
        weighted_buffer, g_weighted_buffer = _scratch(maps, parts, m, channels), _scratch(maps, parts, m, channels)
        for part in parts:
            block = hidden[part]
            g_score.addmv_(block.view(-1, k).t(), grad[part].view(-1))
            slope = _sigmoid_grad(grad[part].unsqueeze(2), block, out=_front(slope_buffer, part))
            torch.sum(slope, dim=1, out=g_offset[part])
            weighted = _weighted_rows(maps, scale, rows, part, 0, weighted_buffer)
            g_weight.addmm_(slope.view(-1, k).t(), weighted.view(-1, channels))
            if need_maps or need_scale:
                g_weighted = _front(g_weighted_buffer, part)
                torch.mm(slope.view(-1, k), back_projection, out=g_weighted.view(-1, channels))
                if g_scale is not None:  # the weighted rows are spent: their buffer takes g ⊙ V
                    product = torch.mul(g_weighted, _read_rows(maps, rows, part), out=weighted)
                    torch.sum(product, dim=1, out=g_scale[part])
                if g_maps is not None:
                    g_source = g_weighted.mul_(scale[part].unsqueeze(1))
                    if rows is None:
                        g_maps[part] = g_source
                    else:
                        g_maps.index_add_(0, rows[part], g_source)
        g_query = g_offset.mul_(factor)
        return g_maps, g_scale, g_query, g_weight * factor.unsqueeze(1), g_query.sum(dim=0), g_score.mul_(2), None


def _row_chunks(total: int, per_row: int, elements: int, group: int = 0) -> list[slice]:
    """Slices of ``total`` rows of ``per_row`` floats each, about ``elements`` floats a slice
    (``_CHUNK_ELEMENTS`` or ``_SPATIAL_CHUNK_ELEMENTS``); with ``group`` > 0 each slice holds
    whole groups of ``group`` rows."""
    step = max(1, elements // per_row)
    if group:
        step = max(group, step - step % group)
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _per_image(rows: Tensor | None, images: int) -> int:
    """K when ``rows`` reads each of ``images`` images K times in a row (0, 0, 1, 1, ...: beam
    search's layout), so per-image tensors can be broadcast over rows instead of gathered; else 0."""
    if rows is None or rows.numel() % images:
        return 0
    group = rows.numel() // images
    return group if torch.equal(rows, torch.arange(images, device=rows.device).repeat_interleave(group)) else 0


def _read_rows(x: Tensor, rows: Tensor | None, part: slice) -> Tensor:
    """Rows ``part`` of a per-row view of per-image ``x``: ``x[rows[part]]`` (``x[part]`` without ``rows``)."""
    return x[part] if rows is None else x.index_select(0, rows[part])


def _weighted_rows(
    maps: Tensor, scale: Tensor, rows: Tensor | None, part: slice, group: int, buffer: Tensor
) -> Tensor:
    """V' = V ⊙ s for the rows ``part``: (r, m, C), written into the front of ``buffer``;
    ``group`` as ``_per_image`` gives."""
    out = _front(buffer, part)
    if rows is None:
        return torch.mul(maps[part], scale[part].unsqueeze(1), out=out)
    if not group:
        return torch.index_select(maps, 0, rows[part], out=out).mul_(scale[part].unsqueeze(1))
    images = maps[part.start // group : part.stop // group]
    grouped = out.view(images.shape[0], group, *maps.shape[1:])
    torch.mul(images.unsqueeze(1), scale[part].view(-1, group, 1, maps.shape[2]), out=grouped)
    return out


def _gather(x: Tensor, rows: Tensor | None) -> Tensor:
    """Per-image ``x`` (N, ...) read per row: ``x[rows]`` (R, ...), or ``x`` itself without ``rows``."""
    return x if rows is None else x.index_select(0, rows)


def _tanh_scores(preactivation: Tensor, weight: Tensor) -> Tensor:
    """wᵀ tanh(x) over the last dim up to a constant: 2wᵀσ(2x), (..., k) -> (...); overwrites x."""
    return preactivation.mul_(2).sigmoid_() @ weight.mul(2)


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
        """Pooled map v (B, C) and query q = W_hc h (B, k) -> channel weights β (B, C), rows sum to 1.

        Computed in the parameters' dtype: under bfloat16 autocast v and q arrive in bfloat16.
        """
        dtype = self.weight.dtype
        offset = (self.bias + query.to(dtype)).mul(2)
        scores = _ChannelScores.apply(pooled.to(dtype), offset, self.weight.mul(2), self.score.mul(2))
        return torch.softmax(scores, dim=1)


class SpatialAttention(nn.Module):
    """α = softmax_m(wᵀ tanh((W_s V + b_s) ⊕ q)): one weight per location.

    Parameters: ``key`` the linear map W_s, b_s (C -> k), ``score`` w (k,).

    ``rows`` (R,), where given, says which image each row (e.g. a beam) reads: the per-image
    tensors (N, ...) are then read at use, never copied per row.
    """

    def __init__(self, channels: int, attention_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(channels, attention_dim)
        bound = 1.0 / math.sqrt(attention_dim)
        self.score = nn.Parameter(torch.empty(attention_dim).uniform_(-bound, bound))

    def keys(self, maps: Tensor) -> Tensor:
        """W_s V + b_s: (B, m, C) -> (B, m, k)."""
        return self.key(maps)

    def forward(self, keys: Tensor, query: Tensor, rows: Tensor | None = None) -> Tensor:
        """Keys (N, m, k) and query q = W_hs h (R, k) -> spatial weights α (R, m), rows sum to 1."""
        if rows is None:
            return torch.softmax(_tanh_scores(keys + query.unsqueeze(1), self.score), dim=1)
        group = _per_image(rows, keys.shape[0])
        scores = []
        for part in _row_chunks(query.shape[0], keys.shape[1] * keys.shape[2], _SPATIAL_CHUNK_ELEMENTS, group):
            if group:
                images = keys[part.start // group : part.stop // group].unsqueeze(1)
                preactivation = (images + query[part].view(-1, group, 1, keys.shape[2])).flatten(0, 1)
            else:
                preactivation = keys.index_select(0, rows[part]).add_(query[part].unsqueeze(1))
            scores.append(_tanh_scores(preactivation, self.score))
        return torch.softmax(torch.cat(scores), dim=1)

    def over_weighted(self, maps: Tensor, scale: Tensor, query: Tensor, rows: Tensor | None = None) -> Tensor:
        """α over the channel-weighted map V ⊙ s: maps V (N, m, C), scale s (R, C), query (R, k)
        -> α (R, m); V ⊙ s is never materialised (see ``_WeightedSpatialScores``). Computed in the
        parameters' dtype, as ``ChannelAttention``."""
        dtype = self.score.dtype
        maps, scale, query = maps.to(dtype), scale.to(dtype), query.to(dtype)
        scores = _WeightedSpatialScores.apply(maps, scale, query, self.key.weight, self.key.bias, self.score, rows)
        return torch.softmax(scores, dim=1)


@dataclass
class Prepared:
    """What a layer's first attention reads from V alone, computable once per image.

    ``keys``: W_s V + b_s (B, m, k) for a spatial-first order ("s", "sc"); ``pooled``: mean of V
    over locations (B, C) for a channel-first order ("c", "cs"); the other is None.
    """

    keys: Tensor | None = None
    pooled: Tensor | None = None


@dataclass
class LayerAttention:
    """One layer's attention at one step.

    ``output``: the attended map X (B, m, C), or for the top layer the context z (B, C).
    ``spatial``: α (B, m) or None; ``channel``: β (B, C) or None (the weights before rescaling).
    """

    output: Tensor
    spatial: Tensor | None
    channel: Tensor | None


class SCALayer(nn.Module):
    """Channel and/or spatial attention over one layer in one of ``ORDERS``."""

    def __init__(self, channels: int, attention_dim: int, order: str, rescale: bool) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ModelConfigError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        self.order = order
        self.rescale = rescale
        self.attention_dim = attention_dim
        self.channel = ChannelAttention(channels, attention_dim) if order in _CHANNEL_ORDERS else None
        self.spatial = SpatialAttention(channels, attention_dim) if order in _SPATIAL_ORDERS else None

    @property
    def query_dim(self) -> int:
        """Width of this layer's queries: k per attention, channel query first."""
        return self.attention_dim * ((self.channel is not None) + (self.spatial is not None))

    def prepare(self, maps: Tensor) -> Prepared:
        """The per-image part of the first attention, for maps (B, m, C)."""
        if self.order in ("s", "sc"):
            assert self.spatial is not None
            return Prepared(keys=self.spatial.keys(maps))
        if self.order in ("c", "cs"):
            return Prepared(pooled=maps.mean(dim=1))
        return Prepared()

    def forward(
        self,
        maps: Tensor,
        queries: Tensor,
        prepared: Prepared | None = None,
        top: bool = False,
        rows: Tensor | None = None,
    ) -> LayerAttention:
        """Attend maps V (N, m, C) with queries (R, query_dim).

        ``prepared``: ``self.prepare(maps)`` if already computed; ``rows`` (R,): the image each
        row reads (rows = images when None). Returns X (R, m, C), or the context z (R, C) when
        ``top``.
        """
        if prepared is None:
            prepared = self.prepare(maps)
        _, m, c = maps.shape
        channel_scale = float(c) if self.rescale else 1.0
        spatial_scale = float(m) if self.rescale else 1.0
        k = self.attention_dim
        if self.order == "none":
            return LayerAttention(_gather(maps.mean(dim=1) if top else maps, rows), None, None)
        if self.order == "c":
            assert self.channel is not None and prepared.pooled is not None
            pooled = _gather(prepared.pooled, rows)
            beta = self.channel(pooled, queries)
            scaled = beta * channel_scale
            output = scaled * pooled if top else _gather(maps, rows) * scaled.unsqueeze(1)
            return LayerAttention(output, None, beta)
        if self.order == "s":
            assert self.spatial is not None and prepared.keys is not None
            alpha = self.spatial(prepared.keys, queries, rows)
            output = (
                _weighted_sum(alpha, maps, rows) if top else _gather(maps, rows) * (alpha * spatial_scale).unsqueeze(2)
            )
            return LayerAttention(output, alpha, None)
        assert self.channel is not None and self.spatial is not None
        if self.order == "cs":
            assert prepared.pooled is not None
            beta = self.channel(_gather(prepared.pooled, rows), queries[:, :k])
            scaled = beta * channel_scale
            alpha = self.spatial.over_weighted(maps, scaled, queries[:, k:], rows)
            if top:  # Σ_i α_i (β̃ ⊙ V_i) = β̃ ⊙ Σ_i α_i V_i
                output = scaled * _weighted_sum(alpha, maps, rows)
            else:
                output = _gather(maps, rows) * scaled.unsqueeze(1) * (alpha * spatial_scale).unsqueeze(2)
            return LayerAttention(output, alpha, beta)
        assert prepared.keys is not None
        alpha = self.spatial(prepared.keys, queries[:, k:], rows)
        attended_sum = _weighted_sum(alpha, maps, rows)
        beta = self.channel(attended_sum * (spatial_scale / m), queries[:, :k])
        scaled = beta * channel_scale
        if top:
            output = scaled * attended_sum
        else:
            output = _gather(maps, rows) * (alpha * spatial_scale).unsqueeze(2) * scaled.unsqueeze(1)
        return LayerAttention(output, alpha, beta)


def _weighted_sum(alpha: Tensor, maps: Tensor, rows: Tensor | None = None) -> Tensor:
    """Σ_i α_ri V_{n(r), i}: (R, m) and per-image maps (N, m, C) -> (R, C); n(r) = ``rows[r]``
    (r without ``rows``). With ``rows`` the maps are broadcast over each image's rows (beam
    search's layout) or else gathered a few rows at a time."""
    if rows is None:
        return torch.bmm(alpha.unsqueeze(1), maps).squeeze(1)
    group = _per_image(rows, maps.shape[0])
    if group:  # each image's K rows at once: (N, K, m) @ (N, m, C)
        return torch.bmm(alpha.view(maps.shape[0], group, -1), maps).flatten(0, 1)
    parts = _row_chunks(alpha.shape[0], maps.shape[1] * maps.shape[2], _SPATIAL_CHUNK_ELEMENTS)
    return torch.cat([torch.bmm(alpha[p].unsqueeze(1), maps.index_select(0, rows[p])).squeeze(1) for p in parts])


@dataclass
class EncoderMemory:
    """What the encoder keeps per image between steps, and which image each decoding row reads.

    ``maps``: the lowest attended layer (N, H, W, C), channels last; ``prepared``: its per-image
    attention part; ``side``: earlier taps the upper stages read, {tap: (N, C, H, W)};
    ``context``: the fixed context (N, C_top) of order "none" (then ``maps`` is None);
    ``rows``: (R,) the image of each row, or None when row r is image r. Selecting rows (beam
    reorder or repeat) changes only ``rows``; the per-image tensors are read at use.
    """

    maps: Tensor | None
    prepared: Prepared
    side: dict[str, Tensor]
    context: Tensor | None
    rows: Tensor | None = None

    def select(self, index: Tensor) -> "EncoderMemory":
        """The memory of rows ``index`` (R',) of this one, in that order."""
        return replace(self, rows=index if self.rows is None else self.rows.index_select(0, index))


@dataclass
class EncoderStep:
    """One step of the encoder: the context z (B, C_top) and the weights of every layer.

    ``spatial``: per layer α (B, m_l), None for orders without spatial attention; ``channel``:
    per layer β (B, C_l), None for orders without channel attention.
    """

    context: Tensor
    spatial: list[Tensor] | None
    channel: list[Tensor] | None


class SCAEncoder(nn.Module):
    """Multi-layer SCA over a backbone: attend layer l, run the backbone's next stages on the
    attended map to get layer l + 1, attend that, ..., up to the top layer's context.

    The upper stages always run in eval mode (their batch-norm statistics stay fixed, as in the
    authors' code); ``finetune_upper`` only decides whether their weights get gradients.
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
    ) -> None:
        super().__init__()
        if not 1 <= len(layers) <= 3:
            raise ModelConfigError(f"layers must name 1 to 3 taps of {backbone.name}; got {list(layers)}")
        try:
            prefix, upper = backbone.split(layers)
        except ValueError as error:
            raise ModelConfigError(f"layers: {error}") from None
        self.layer_names = tuple(layers)
        self.inputs = prefix.outputs
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
        self.layers = nn.ModuleList(SCALayer(c + extra, attention_dim, order, rescale) for c in self.channels)
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

    def train(self, mode: bool = True) -> "SCAEncoder":
        """Set the attention's mode; the upper stages stay in eval mode."""
        super().train(mode)
        self.upper.eval()
        return self

    def remember(self, features: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[EncoderMemory, Tensor]:
        """Cached prefix outputs {tap: (B, C, H, W)} -> the memory for ``forward`` and the top
        layer's unattended map (B, context_dim, H, W), computed through the upper stages.

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
            return EncoderMemory(None, Prepared(), {}, top.mean(dim=(2, 3))), top
        maps = self._with_coordinates(taps[self.layer_names[0]].permute(0, 2, 3, 1))
        return EncoderMemory(maps, self.layers[0].prepare(maps.flatten(1, 2)), side, None), top

    def forward(self, memory: EncoderMemory, queries: Tensor) -> EncoderStep:
        """Attend every layer with this step's queries (R, query_dim), one row per ``memory`` row."""
        rows = memory.rows
        if memory.maps is None:
            assert memory.context is not None
            return EncoderStep(_gather(memory.context, rows), None, None)
        taps = {name: _gather(x, rows) for name, x in memory.side.items()}
        maps = memory.maps
        spatial: list[Tensor] = []
        channel: list[Tensor] = []
        last = len(self.layers) - 1
        offset = self._query_offsets
        for i, layer in enumerate(self.layers):
            attended = layer(
                maps.flatten(1, 2),
                queries[:, offset[i] : offset[i + 1]],
                memory.prepared if i == 0 else None,
                top=i == last,
                rows=rows if i == 0 else None,
            )
            if attended.spatial is not None:
                spatial.append(attended.spatial)
            if attended.channel is not None:
                channel.append(attended.channel)
            if i < last:
                x = attended.output.view(-1, *maps.shape[1:])[..., : self.channels[i]].permute(0, 3, 1, 2)
                taps[self.layer_names[i]] = x
                maps = self._with_coordinates(self.upper(i, x, taps).permute(0, 2, 3, 1))
        return EncoderStep(attended.output, spatial or None, channel or None)

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
