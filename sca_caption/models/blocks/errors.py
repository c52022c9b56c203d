"""The error raised for a block built with impossible settings or fed a tensor it cannot take."""

from __future__ import annotations

from torch import Tensor

from sca_caption.models.errors import ModelConfigError


class BlockConfigError(ModelConfigError):
    """Bad block arguments or input shape; the message is one line naming the block and the problem."""


def require(condition: bool, block: str, problem: str) -> None:
    """Raise ``BlockConfigError("<block>: <problem>")`` unless ``condition`` holds."""
    if not condition:
        raise BlockConfigError(f"{block}: {problem}")


def check_feature_map(x: Tensor, channels: int, block: str) -> None:
    """Require ``x`` to be a (B, channels, H, W) tensor."""
    require(
        x.dim() == 4 and x.shape[1] == channels,
        block,
        f"expected a (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}",
    )
