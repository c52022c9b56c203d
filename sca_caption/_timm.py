"""The one place that imports timm.

``import timm`` imports torchvision, which beside this project's CPU torch needs the workaround
in ``sca_caption._torchvision``; so torchvision is imported through it first, and timm then finds
it in ``sys.modules``.
"""

from __future__ import annotations

from types import ModuleType

from sca_caption._torchvision import import_torchvision


def import_timm() -> ModuleType:
    """Return the ``timm`` module, torchvision imported the safe way before it."""
    import_torchvision()
    import timm

    return timm
