"""sca-caption: image captioning with SCA-CNN (Chen et al., CVPR 2017)."""

__version__ = "0.1.0"
