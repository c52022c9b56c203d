"""The captioning service as a FastAPI app: the JSON API, the web page and one-line JSON errors.

``create_app(captioner, card=...)`` serves one ``ImageCaptioner`` (the caption CLI's loader and
decoding step, so the service, the CLI and ``evaluate`` give the same captions). Routes:

- ``POST /v1/captions``: images as multipart files (field ``images``) or one raw ``image/*`` body,
  decoding options in the query string (``schemas.CaptionOptions``); one result per image.
- ``GET /v1/model``: the model, its recorded scores, the decoding defaults and the limits.
- ``GET /healthz``; ``GET /``: the web page (``static/``, every asset served from here).

Every refusal is a 4xx JSON ``{"error": "one line"}`` (503 while the server shuts down). The
event loop never runs the model: images are decoded one at a time on one decoding thread (a
decoded frame can be 1 GB; threads decoding side by side each keep their own malloc arena of
it) and captioned by the ``MicroBatcher``'s worker thread. ``/docs`` serves Swagger UI
from the packaged copy of ``fastapi-offline``, so it works with no network.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Sequence

from fastapi import FastAPI, Query, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from torch import Tensor

from sca_caption.captioning import ImageCaptioner
from sca_caption.data.errors import DataError
from sca_caption.data.images import decode_image
from sca_caption.decode_options import DECODE_OPTIONS
from sca_caption.decoding import DecodingError
from sca_caption.serve.batcher import MicroBatcher, ShuttingDown
from sca_caption.serve.model_card import ModelCard
from sca_caption.serve.results import image_result
from sca_caption.serve.schemas import (
    CaptionOptions,
    CaptionResponse,
    ErrorResponse,
    Health,
    Limits,
    ModelInfo,
)
from sca_caption.serve.uploads import FILE_FIELD, Upload, UploadError, read_uploads

STATIC = Path(__file__).parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
CAPTION_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FILE_FIELD],
                "properties": {
                    FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"}
                },
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}
REFUSALS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "empty body, no image, an empty file or a malformed multipart body"),
        (408, "the request body was not received within the body timeout"),
        (413, "over the upload limit, or too many images in one request"),
        (415, "neither multipart/form-data nor an image/* body"),
        (422, "an image that cannot be decoded (not an image, truncated, over the pixel limit), "
              "an option of the wrong type or range, options that do not fit together or with the "
              "checkpoint's settings, or an unknown option or form field"),
        (503, "the server is shutting down"),
    )
}


@dataclass(frozen=True)
class ServiceLimits:
    """``max_images`` per request, ``max_upload_mb`` per request body, received within
    ``body_timeout_s`` seconds, and the micro-batching: up to ``max_batch`` images per batch,
    waiting at most ``max_wait_ms`` for more. Each value must be finite and within ``BOUNDS``
    (a ``ValueError`` naming the first that is not)."""

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_upload_mb: float = 10.0
    max_images: int = 16
    body_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high) or (value == 0 and name in POSITIVE):
                above = "above 0" if name in POSITIVE else f"at least {low:g}"
                raise ValueError(f"{name} {value:g}: must be a finite number {above} and at most {high:g}")


BOUNDS: dict[str, tuple[float, float]] = {
    "max_batch": (1, 1024),
    "max_wait_ms": (0, 60_000),  # a batch waits a minute at most, so every request is answered
    "max_upload_mb": (0, 1024),
    "max_images": (1, 1024),
    "body_timeout_s": (0, 3600),
}
POSITIVE = ("max_upload_mb", "body_timeout_s")


def create_app(captioner: ImageCaptioner, *, card: ModelCard, limits: ServiceLimits = ServiceLimits()) -> FastAPI:
    """The service's app for ``captioner``; ``card`` names its checkpoint and recorded scores."""
    batcher = MicroBatcher(captioner, max_batch=limits.max_batch, max_wait_ms=limits.max_wait_ms)
    decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decoder")  # a new one at each start

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal decoder
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decoder")
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()
            decoder.shutdown(wait=True)

    app = FastAPIOffline(
        title="sca-caption",
        summary="Captions for images from an SCA-CNN captioner, with per-word attention maps",
        lifespan=lifespan,
    )
    app.state.batcher = batcher  # the server stops it when its shutdown begins (__main__)
    _add_error_handlers(app)
    _add_page(app)
    info = _model_info(captioner, card, limits)

    @app.post(
        "/v1/captions",
        response_model=CaptionResponse,
        response_model_exclude_none=True,
        responses=REFUSALS,
        openapi_extra={"requestBody": CAPTION_BODY},
        summary="Caption one or more images",
    )
    async def captions(request: Request, options: Annotated[CaptionOptions, Query()]) -> dict[str, Any]:
        """Images as multipart files in the field ``images`` or one raw ``image/*`` body; options
        in the query string. One result per image, in upload order."""
        start = time.perf_counter()
        _refuse_repeated_options(request)
        try:  # the whole request, over the checkpoint's settings, before any image is queued
            settings = options.settings(captioner)
        except DecodingError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        uploads = await read_uploads(
            request, max_bytes=int(limits.max_upload_mb * 2**20), max_images=limits.max_images,
            timeout_s=limits.body_timeout_s,
        )
        images = await asyncio.get_running_loop().run_in_executor(decoder, _decode_all, uploads, captioner.input_size)
        decoded = await batcher.caption(images, settings)
        results = await run_in_threadpool(
            lambda: [
                image_result(u.name, d, captioner.layers, attention=options.attention, top_channels=options.top_channels)
                for u, d in zip(uploads, decoded)
            ]
        )
        return {"results": results, "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.get("/v1/model", response_model=ModelInfo, summary="The model, its recorded scores, defaults and limits")
    async def model() -> ModelInfo:
        return info

    @app.get("/healthz", response_model=Health, summary="Liveness, and the images waiting for a batch")
    async def healthz() -> Health:
        return Health(queued=batcher.queued)

    return app


def _decode_all(uploads: Sequence[Upload], size: int) -> list[Tensor]:
    try:
        return [decode_image(u.data, size, u.name) for u in uploads]
    except DataError as err:
        raise UploadError(422, str(err)) from None


def _refuse_repeated_options(request: Request) -> None:
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UploadError(422, f"option {repeated[0]!r} given more than once")


def _model_info(captioner: ImageCaptioner, card: ModelCard, limits: ServiceLimits) -> ModelInfo:
    config = captioner.model.config
    defaults = captioner.decode
    return ModelInfo(
        checkpoint=card.checkpoint,
        backbone=config.backbone,
        layers=list(captioner.layers),
        order=config.order,
        grids=[list(grid) for grid in captioner.grids],
        input_size=captioner.input_size,
        vocabulary_size=len(captioner.vocab),
        scores=card.scores,
        decoding_defaults={name: getattr(defaults, field) for name, (field, _) in DECODE_OPTIONS.items()},
        limits=Limits(
            max_images=limits.max_images,
            max_upload_mb=limits.max_upload_mb,
            max_batch=limits.max_batch,
            max_wait_ms=limits.max_wait_ms,
        ),
        device=str(captioner.device),
    )


def _add_page(app: FastAPI) -> None:
    """``/`` and its assets, read once from ``static/``: no request path ever names a file."""
    page = (STATIC / "index.html").read_bytes()
    app.add_api_route("/", lambda: Response(page, media_type="text/html; charset=utf-8"), include_in_schema=False)
    for name, media_type in ASSETS.items():
        content = (STATIC / name).read_bytes()
        app.add_api_route(
            f"/static/{name}",
            lambda content=content, media_type=media_type: Response(content, media_type=media_type),
            include_in_schema=False,
        )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadError)
    async def refused(_: Request, err: UploadError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(ShuttingDown)
    async def stopping(_: Request, err: ShuttingDown) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": "5", "Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(err)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def failed(_: Request, err: Exception) -> JSONResponse:  # logged with its traceback by the server
        first = str(err).strip().splitlines()
        return JSONResponse({"error": f"captioning failed: {type(err).__name__}: {first[0] if first else ''}"}, status_code=500)


def _validation_message(err: RequestValidationError) -> str:
    """The first problem of a request's options, in one line."""
    errors = err.errors()
    first = errors[0]
    names = [str(part) for part in first["loc"] if part not in ("query", "body")]
    if first["type"] == "extra_forbidden":
        message = f"unknown option {names[-1]!r}; the options are {', '.join(CaptionOptions.model_fields)}"
    elif names:
        message = f"option {names[-1]!r}: {first['msg']} (got {first.get('input')!r})"
    else:
        message = str(first["msg"]).removeprefix("Value error, ")
    more = len(errors) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
