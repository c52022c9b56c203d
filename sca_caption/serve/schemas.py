"""The JSON API's options and answers as pydantic models: they validate the query string (extra
fields refused) and document every answer in the OpenAPI schema at ``/docs``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from sca_caption.captioning import ImageCaptioner
from sca_caption.decode_options import DECODE_OPTIONS, decode_changes, option_limits, option_type
from sca_caption.decoding import MAX_LENGTH, DecodeSettings

SERVICE_CAPS: dict[str, dict[str, Any]] = {  # tighter bounds on the work one request may ask for
    "beam": {"max": 20}, "n_best": {"max": 20}, "length_alpha": {"max": 5.0},
}
MAX_TOP_CHANNELS = 64


def _query_field(name: str) -> tuple[Any, Any]:
    """Decoding option ``name`` as an optional query parameter: its field's type (or choices)
    and range, tightened by ``SERVICE_CAPS``."""
    limits = option_limits(name) | SERVICE_CAPS.get(name, {})
    kind = Literal[limits["choices"]] if "choices" in limits else option_type(name)  # type: ignore[valid-type]
    return kind | None, Field(None, ge=limits.get("min"), le=limits.get("max"), description=DECODE_OPTIONS[name][1])


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def settings(self, captioner: ImageCaptioner) -> DecodeSettings:
        """These options over the checkpoint's recorded settings, checked whole (a one-line
        ``DecodingError`` for settings that do not fit together or with the checkpoint's)."""
        return captioner.settings(**decode_changes(self), attention=self.attention)


CaptionOptions = create_model(
    "CaptionOptions",
    __base__=_Options,
    __doc__="Decoding options of ``POST /v1/captions``, given as query parameters; an option left out "
    "takes the checkpoint's recorded decoding setting (``GET /v1/model``: ``decoding_defaults``).",
    **{name: _query_field(name) for name in DECODE_OPTIONS},
    attention=(bool, Field(False, description="per word and attended layer: the spatial map and the top channels")),
    top_channels=(int, Field(5, ge=1, le=MAX_TOP_CHANNELS, description="channels per word and layer with attention")),
)


class ScoredCaption(BaseModel):
    caption: str = Field(description="the words joined by spaces")
    score: float = Field(description="the ranking score: the log-probability, divided by the length penalty if one is set")
    log_prob: float
    finished: bool = Field(description="false if cut at max_length before the end token")


class LayerAttention(BaseModel):
    """One word's attention in one attended layer (keys of an attention the model lacks are left out)."""

    layer: str
    grid: list[int] | None = Field(None, description="[h, w] of the spatial map")
    map: list[list[float]] | None = Field(None, description="the spatial weights, h rows of w (they sum to 1)")
    argmax: list[int] | None = Field(None, description="[row, col] of the largest weight")
    weight: float | None = Field(None, description="the largest spatial weight")
    entropy: float | None = Field(None, description="of the spatial map, in nats (log(h*w) is uniform)")
    top_channels: list[tuple[int, float]] | None = Field(None, description="[[channel, weight], ...], largest first")


class WordAttention(BaseModel):
    word: str
    layers: list[LayerAttention]


class Timing(BaseModel):
    queue_ms: float = Field(description="from the image joining the queue to its batch starting")
    batch_ms: float = Field(description="the batch's model time: backbone prefix and beam search")
    batch_size: int = Field(description="images decoded together in that beam-search batch")


class ImageCaptions(ScoredCaption):
    """An image's best caption, its n-best list and, when asked, the best caption's attention."""

    name: str = Field(description="the upload's file name, or 'image N' / 'request body'")
    n_best: list[ScoredCaption]
    attention: list[WordAttention] | None = Field(None, description="per word of the best caption; with attention=true")
    timing: Timing


class CaptionResponse(BaseModel):
    results: list[ImageCaptions] = Field(description="one per image, in upload order")
    elapsed_ms: float = Field(description="the request's time in the server")


DecodingDefaults = create_model(
    "DecodingDefaults",
    __doc__="The checkpoint's recorded decoding settings: what an option left out means.",
    **{name: (option_type(name), ...) for name in DECODE_OPTIONS},
)


class Limits(BaseModel):
    max_images: int = Field(description="images in one request")
    max_upload_mb: float = Field(description="request body size")
    max_batch: int = Field(description="images in one beam-search batch")
    max_wait_ms: float = Field(description="how long a batch waits for more images")
    max_beam: int = SERVICE_CAPS["beam"]["max"]
    max_length: int = MAX_LENGTH


class ModelInfo(BaseModel):
    checkpoint: str = Field(description="the checkpoint's file name")
    backbone: str
    layers: list[str] = Field(description="the attended layers, lowest first")
    order: str = Field(description="the attention order: cs, sc, c or s")
    grids: list[list[int]] = Field(description="[h, w] of each attended layer")
    input_size: int = Field(description="images are squashed to input_size x input_size")
    vocabulary_size: int
    scores: dict[str, float | int | str | dict[str, float]] = Field(
        description="what the checkpoint recorded: the early-stopping metric, best epoch and score, that epoch's validation scores"
    )
    decoding_defaults: DecodingDefaults
    limits: Limits
    device: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    queued: int = Field(description="images waiting for a batch")


class ErrorResponse(BaseModel):
    error: str = Field(description="one line saying what was wrong")
