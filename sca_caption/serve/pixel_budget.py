"""A bound on the image pixels being decoded at once, all requests together: a decoded frame
holds 3-8 bytes per pixel, so unbounded concurrent decoding of large uploads (a 9400 x 9400 PNG
is 280 KB compressed, a 265 MB frame) can exhaust the server's memory."""

from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

from PIL import Image

from sca_caption.data.images import MAX_PIXELS


class PixelBudget:
    """At most ``limit`` pixels of images being decoded, across threads: ``hold(n)`` waits until
    ``n`` more fit, or until nothing is held (an image over the limit is decoded alone)."""

    def __init__(self, limit: int = MAX_PIXELS) -> None:
        self.limit = limit
        self._held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._held == 0 or self._held + pixels <= self.limit)
            self._held += pixels
        try:
            yield
        finally:
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()


def declared_pixels(data: bytes) -> int:
    """Width x height from an image file's header (no decoding); 0 if Pillow cannot read it (the
    decoder then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except Exception:  # not an image, a bomb, a broken header: decode_image reports it
        return 0
