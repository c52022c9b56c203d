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
    build_cache_backbone,
    list_backbones,
    register_backbone,
)

# Each backbone module registers itself on import; keep one import line per module here.
from sca_caption.models.backbones import efficientnet_lite  # noqa: E402,F401
from sca_caption.models.backbones import vgg  # noqa: E402,F401
from sca_caption.models.backbones import resnet  # noqa: E402,F401
from sca_caption.models.backbones import attention_net  # noqa: E402,F401
