"""An image's decoded captions as the API's JSON (``schemas.ImageCaptions``): the caption CLI's
``--json`` fields (``captioning.attention_summary``), plus each word's whole spatial map."""

from __future__ import annotations

from typing import Any, Sequence

from sca_caption.captioning import Caption, attention_summary
from sca_caption.serve.batcher import Decoded

MAP_DIGITS = 6


def image_result(
    name: str, decoded: Decoded, layers: Sequence[str], *, attention: bool, top_channels: int
) -> dict[str, Any]:
    """The ``ImageCaptions`` answer for one image."""
    best = decoded.captions[0]
    result: dict[str, Any] = {"name": name, **_scored(best)}
    result["n_best"] = [_scored(c) for c in decoded.captions]
    if attention:
        result["attention"] = _attention(best, layers, top_channels)
    result["timing"] = {
        "queue_ms": round(decoded.queue_ms, 2),
        "batch_ms": round(decoded.batch_ms, 2),
        "batch_size": decoded.batch_size,
    }
    return result


def _scored(caption: Caption) -> dict[str, Any]:
    h = caption.hypothesis
    return {"caption": caption.text, "score": h.score, "log_prob": h.log_prob, "finished": h.finished}


def _attention(caption: Caption, layers: Sequence[str], top_channels: int) -> list[dict[str, Any]]:
    summary = attention_summary(caption, layers, top_channels)
    attention = caption.hypothesis.attention
    if attention is not None and attention.spatial is not None:
        for t, word in enumerate(summary):
            for l, entry in enumerate(word["layers"]):
                entry["map"] = [[round(v, MAP_DIGITS) for v in row] for row in caption.spatial_map(t, l).tolist()]
    return summary
