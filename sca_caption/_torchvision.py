"""The one place that imports torchvision.

torchvision 0.28.0 on PyPI is a CUDA build. Beside a CPU build of torch its compiled operators
(nms, roi_align, ...) do not load, and ``import torchvision`` then dies in
``torchvision/_meta_registrations.py`` with ``operator torchvision::nms does not exist``
(upstream pytorch/vision#9085). That module only registers fake-tensor kernels for those
detection operators, which this project never calls, so when (and only when) that exact failure
happens we import torchvision again with the module replaced by an empty one. The model builders
(VGG, ResNet) and weight enums work normally; ``torchvision.ops``/``torchvision.io`` kernels do
not, so images are decoded with Pillow everywhere in this project.
"""

from __future__ import annotations

import sys
import types
from types import ModuleType

_META = "torchvision._meta_registrations"


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, working around a CPU-torch/CUDA-torchvision mismatch."""
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules[_META] = types.ModuleType(_META)
        import torchvision
    return torchvision
