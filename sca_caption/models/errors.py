"""The error raised for a captioner built with impossible settings or fed features it cannot take."""

from __future__ import annotations

from sca_caption.errors import SCACaptionError


class ModelConfigError(SCACaptionError):
    """Bad model settings or input; the message is one line naming the setting (or input) and the problem."""
