"""The images of a captioning request: multipart files in the field ``images``, or one raw body
with an ``image/*`` content type. The body is read into memory up to the upload limit and no
further, and within the body timeout (a client sending a byte now and then is answered 408 and
its connection closed, not kept open for ever); file names are only echoed back, never used as paths."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from sca_caption.errors import SCACaptionError

FILE_FIELD = "images"
RAW_BODY_NAME = "request body"
NAME_CHARACTERS = 80


@dataclass(frozen=True)
class Upload:
    """One uploaded image file: a name for messages and its bytes."""

    name: str
    data: bytes


class UploadError(SCACaptionError):
    """A request whose images cannot be taken: an HTTP ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_uploads(request: Request, *, max_bytes: int, max_images: int, timeout_s: float) -> list[Upload]:
    """The request's images, in order; ``UploadError`` for a body that is too large, not received
    within ``timeout_s`` seconds, empty, of another content type, malformed, or holding other fields
    or more than ``max_images`` images."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = media_type == "multipart/form-data"
    if not multipart and not media_type.startswith("image/"):
        raise UploadError(
            415,
            f"unsupported content type {media_type or '(none)'!r}: send images as multipart/form-data files "
            f"in the field {FILE_FIELD!r}, or one image as the raw body with an image/* content type",
        )
    try:
        body = await asyncio.wait_for(_read_body(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise UploadError(408, f"request body not received within the body timeout of {timeout_s:g} s") from None
    if not body:
        raise UploadError(400, "empty request body: no image to caption")
    uploads = await _multipart_files(request.headers, body) if multipart else [Upload(RAW_BODY_NAME, body)]
    if not uploads:
        raise UploadError(400, f"no image in the request: send image files in the multipart field {FILE_FIELD!r}")
    if len(uploads) > max_images:
        raise UploadError(413, f"too many images in one request: {len(uploads)}, at most {max_images}")
    for upload in uploads:
        if not upload.data:
            raise UploadError(400, f"{upload.name}: empty file")
    return uploads


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to be over ``max_bytes``."""
    too_large = UploadError(413, f"request body over the upload limit of {max_bytes / 2**20:g} MB")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


async def _multipart_files(headers: Headers, body: bytes) -> list[Upload]:
    """The files of a multipart body; any other field is refused (422). The body is already
    bounded by the upload limit, so the parser's own count limits are lifted."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, stream(), max_files=math.inf, max_fields=math.inf)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise UploadError(400, f"malformed multipart body: {err.message}") from None
    try:
        uploads = []
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise UploadError(
                    422,
                    f"unknown form field {field!r}: images go in file fields named {FILE_FIELD!r}, "
                    "options in the query string (e.g. ?beam=3)",
                )
            if field != FILE_FIELD:
                raise UploadError(422, f"unknown form field {field!r}: send image files in the field {FILE_FIELD!r}")
            name = _display_name(value.filename) or f"image {len(uploads) + 1}"
            uploads.append(Upload(name, await value.read()))
        return uploads
    finally:
        await form.close()


def _display_name(filename: str | None) -> str:
    """An upload's file name fit for a one-line message: printable characters, cut short."""
    name = "".join(c for c in filename or "" if c.isprintable())
    return name if len(name) <= NAME_CHARACTERS else name[: NAME_CHARACTERS - 3] + "..."
