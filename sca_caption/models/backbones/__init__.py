"""Backbone registry: ``build_backbone(name, weights=...)``, ``list_backbones()``.

Importing this package registers every backbone module listed below.
"""

from sca_caption.models.backbones.base import (  # noqa: F401
    IMAGENET,
    TF_LITE,
    BackbonePrefix,
    Normalization,
    TappedBackbone,
    UpperChain,
    build_backbone,
    list_backbones,
    register_backbone,
)

# Each backbone module registers itself on import; keep one import line per module here.
