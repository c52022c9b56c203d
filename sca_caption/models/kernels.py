"""The "cpu" backend of the SCA attention: the equations of ``sca_caption.models.sca`` computed in
cache-sized chunks with hand-written backward passes, faster than the plain equations on a CPU
(BENCHMARKS.md) and equal to them (tests/test_sca_kernels.py). It runs only where chosen
(``model.kernels: cpu``, as the CPU presets do), follows the layer's ``steps``, and refuses a
layer whose modules are not the ones written out here (``check_implements``).

What makes it fast, and why each trick is safe:

- tanh is evaluated as 2σ(2x) − 1 in the scores: the sum wᵀ tanh(x) then equals 2wᵀσ(2x) − Σ w,
  and the constant Σ w cancels in the softmax. A sigmoid is several times cheaper than a tanh on
  a CPU, and the k×C channel map is the largest element-wise tensor of a decoding step.
- The (R, C, k) channel map and the C-S spatial block (the channel-weighted map V ⊙ β̃ and its
  W_s projection) are never stored whole: they are built a few rows at a time in one reused
  buffer that stays in cache, reduced, and rebuilt in the backward pass (``_ChannelScores``,
  ``_WeightedSpatialScores``). Intermediates written into fresh memory cost more than their
  arithmetic on a CPU (page faults, then a cache miss on every first write).
- Decoding rows (beams) read their image's per-image tensors through ``rows`` rather than
  per-row copies; beam search's layout (each image's K rows together) is broadcast, not gathered.
- The C-S top context is taken as β̃ ⊙ Σ_i α_i V_i, never forming X.

The paper's scalar score biases are left out here as in the plain equations.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from sca_caption.models import sca  # the module object: sca imports this module in turn
from sca_caption.models.errors import ModelConfigError

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
    (R, m, k) sigmoid map is kept for the backward pass when ``keep`` (a gradient will be asked
    for), which rebuilds V' chunk by chunk for the gradients of W_s and s.
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
        keep: bool,
    ) -> Tensor:
        total, m, channels = scale.shape[0], maps.shape[1], maps.shape[2]
        k = key_weight.shape[0]
        projection = key_weight.t().mul(2)  # (C, k): the tanh trick's 2x folded into W_s and b_s + q
        offset = (key_bias + query).mul(2)
        score2 = score.mul(2)
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
        return g_maps, g_scale, g_query, g_weight * factor.unsqueeze(1), g_query.sum(dim=0), g_score.mul_(2), None, None


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


def _tanh_scores(preactivation: Tensor, weight: Tensor) -> Tensor:
    """wᵀ tanh(x) over the last dim up to a constant: 2wᵀσ(2x), (..., k) -> (...); overwrites x."""
    return preactivation.mul_(2).sigmoid_() @ weight.mul(2)


def channel_weights(attention: sca.ChannelAttention, pooled: Tensor, query: Tensor) -> Tensor:
    """``attention(pooled, query)``: v (R, C), q (R, k) -> β (R, C), computed in the parameters'
    dtype (under bfloat16 autocast v and q arrive in bfloat16)."""
    dtype = attention.weight.dtype
    offset = (attention.bias + query.to(dtype)).mul(2)
    scores = _ChannelScores.apply(pooled.to(dtype), offset, attention.weight.mul(2), attention.score.mul(2))
    return torch.softmax(scores, dim=1)


def spatial_weights(attention: sca.SpatialAttention, keys: Tensor, query: Tensor, rows: Tensor | None) -> Tensor:
    """α from per-image keys W_s V + b_s (N, m, k) and per-row queries (R, k) -> (R, m)."""
    if rows is None:
        return torch.softmax(_tanh_scores(keys + query.unsqueeze(1), attention.score), dim=1)
    group = _per_image(rows, keys.shape[0])
    scores = []
    for part in _row_chunks(query.shape[0], keys.shape[1] * keys.shape[2], _SPATIAL_CHUNK_ELEMENTS, group):
        if group:
            images = keys[part.start // group : part.stop // group].unsqueeze(1)
            preactivation = (images + query[part].view(-1, group, 1, keys.shape[2])).flatten(0, 1)
        else:
            preactivation = keys.index_select(0, rows[part]).add_(query[part].unsqueeze(1))
        scores.append(_tanh_scores(preactivation, attention.score))
    return torch.softmax(torch.cat(scores), dim=1)


def weighted_spatial_weights(
    attention: sca.SpatialAttention, maps: Tensor, scale: Tensor, query: Tensor, rows: Tensor | None
) -> Tensor:
    """α over the channel-weighted map V ⊙ s: per-image V (N, m, C), per-row s (R, C) and query
    (R, k) -> α (R, m); V ⊙ s is never materialised. Computed in the parameters' dtype."""
    dtype = attention.score.dtype
    maps, scale, query = maps.to(dtype), scale.to(dtype), query.to(dtype)
    tensors = (maps, scale, query, attention.key.weight, attention.key.bias, attention.score)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return torch.softmax(_WeightedSpatialScores.apply(*tensors, rows, keep), dim=1)


def weighted_sum(alpha: Tensor, maps: Tensor, rows: Tensor | None = None) -> Tensor:
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


def attend(
    layer: sca.SCALayer, maps: Tensor, queries: Tensor, rows: Tensor | None, terms: sca.FirstTerms | None, top: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``SCALayer.forward`` computed with the kernels above (same arguments, same results), step
    by step through ``layer.steps``. The map a step leaves, V ⊙ β̃ or V ⊙ α̃, is never formed for
    the next one: a channel step after α pools Σ_i α̃_i V_i / m, a spatial step after β scores
    V ⊙ β̃ through ``weighted_spatial_weights``, and the context is β̃ ⊙ Σ_i α_i V_i."""
    terms = layer.first_terms(maps) if terms is None else terms
    _, m, c = maps.shape
    query = layer.split_queries(queries)
    alpha: Tensor | None = None
    beta: Tensor | None = None
    summed: Tensor | None = None  # Σ_i α_i V_i (R, C) for the final α, where a step needed it
    for step in layer.steps:
        if step == "channel":
            assert layer.channel is not None
            if alpha is None:  # the first step: v from the image's memory
                assert terms.pooled is not None
                pooled = sca.per_row(terms.pooled, rows)
            else:
                summed = weighted_sum(alpha, maps, rows)
                pooled = layer.rescaled(summed, m) / m  # the mean of V ⊙ α̃
            beta = channel_weights(layer.channel, pooled, query["channel"])
        else:
            assert layer.spatial is not None
            if beta is None:  # the first step: W_s V + b_s from the image's memory
                assert terms.keys is not None
                alpha = spatial_weights(layer.spatial, terms.keys, query["spatial"], rows)
            else:
                alpha = weighted_spatial_weights(layer.spatial, maps, layer.rescaled(beta, c), query["spatial"], rows)
    if not top:
        x = sca.per_row(maps, rows)
        for step in layer.steps:
            if step == "channel":
                assert beta is not None
                x = x * layer.rescaled(beta, c).unsqueeze(1)  # V ⊙ β̃
            else:
                assert alpha is not None
                x = x * layer.rescaled(alpha, m).unsqueeze(2)  # V ⊙ α̃
        return x, alpha, beta
    if summed is None:  # Σ_i α_i V_i, the mean without spatial attention
        summed = sca.per_row(maps.mean(dim=1), rows) if alpha is None else weighted_sum(alpha, maps, rows)
    return (summed if beta is None else layer.rescaled(beta, c) * summed), alpha, beta


def check_implements(layer: sca.SCALayer) -> None:
    """Refuse (``ModelConfigError``, one line) a layer that is not exactly what ``attend``
    computes: an ``SCALayer`` whose steps' modules are ``ChannelAttention`` and
    ``SpatialAttention`` (its ``nn.Linear`` key), holding their own parameters and nothing more.
    ``attend`` reads those parameters and re-derives the equations, so a subclass, another module
    or a new parameter or buffer would otherwise be ignored without a word."""
    modules: dict[str, type] = {"": sca.SCALayer}
    tensors: set[str] = set()
    if "channel" in layer.steps:
        modules["channel"] = sca.ChannelAttention
        tensors |= {"channel.weight", "channel.bias", "channel.score"}
    if "spatial" in layer.steps:
        modules |= {"spatial": sca.SpatialAttention, "spatial.key": nn.Linear}
        tensors |= {"spatial.key.weight", "spatial.key.bias", "spatial.score"}
    found = {name: type(module) for name, module in layer.named_modules()}
    named = itertools.chain(layer.named_parameters(), layer.named_buffers())
    problems = [
        f"{name or 'the layer'} is {kind.__name__}, not {modules[name].__name__}" if name in modules
        else f"{name} is an extra {kind.__name__}"
        for name, kind in found.items()
        if modules.get(name) is not kind
    ]
    problems += [f"{name} is an extra tensor" for name, _ in named if name not in tensors]
    if problems:
        raise ModelConfigError(
            f"kernels 'cpu' implements the SCA layer of models/sca.py as written, but {'; '.join(problems)}: "
            "use kernels 'plain', or teach models/kernels.py the change"
        )
