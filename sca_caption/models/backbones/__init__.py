"""Backbone registry: ``build_backbone(name, weights=...)``, ``list_backbones()``, and
``build_backbone("timm:<model>", ...)`` for any timm model.

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
    check_backbone_name,
    list_backbone_families,
    list_backbones,
    register_backbone,
    register_backbone_family,
)

# Each backbone module registers itself on import; keep one import line per module here.
from sca_caption.models.backbones import efficientnet_lite  # noqa: E402,F401
from sca_caption.models.backbones import vgg  # noqa: E402,F401
from sca_caption.models.backbones import resnet  # noqa: E402,F401
from sca_caption.models.backbones import attention_net  # noqa: E402,F401
from sca_caption.models.backbones import timm_models  # noqa: E402,F401
