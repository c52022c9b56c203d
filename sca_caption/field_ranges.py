"""The ranges of settings fields: a dataclass field's ``metadata`` may give its ``choices``, a
``min`` and ``max`` (inclusive) or a ``below`` (exclusive) bound; ``out_of_range`` checks a value
against them. The config checks every key with it, and ``DecodeSettings`` its fields."""

from __future__ import annotations

import math
from typing import Any, Mapping


def out_of_range(value: Any, metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` given its field's ``metadata`` ("must be ..."), or None."""
    if value is None:
        return None
    if "choices" in metadata and value not in metadata["choices"]:
        return "must be one of " + ", ".join(metadata["choices"])
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if "min" in metadata and value < metadata["min"]:
        return f"must be at least {metadata['min']}"
    if "max" in metadata and value > metadata["max"]:
        return f"must be at most {metadata['max']}"
    if "below" in metadata and value >= metadata["below"]:
        return f"must be below {metadata['below']}"
    return None
