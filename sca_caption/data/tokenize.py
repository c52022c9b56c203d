"""Caption tokenisation matching the Karpathy split files: lowercase words, punctuation dropped.

Every run of letters or digits is a token; anything else (spaces, punctuation, hyphens,
apostrophes) separates tokens, so "tri-colored" gives "tri", "colored" and "horse 's" gives
"horse", "s", exactly as ``dataset_flickr8k.json`` has them. Needs no downloaded tokeniser data.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> tuple[str, ...]:
    """The caption's lowercase word tokens, punctuation dropped."""
    return tuple(_WORD.findall(text.lower()))
