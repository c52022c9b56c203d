"""Attention blocks over (B, C, H, W) feature maps, one paper per module."""

from sca_caption.models.blocks.bam import BAM, BAMChannelBranch, BAMSpatialBranch
from sca_caption.models.blocks.cbam import CBAM, ChannelGate, SpatialGate
from sca_caption.models.blocks.criss_cross import CrissCrossAttention
from sca_caption.models.blocks.csra import CSRA, HEAD_TEMPERATURES, MAX_POOL_TEMPERATURE, MultiHeadCSRA
from sca_caption.models.blocks.double_attention import DoubleAttention
from sca_caption.models.blocks.eca import ECA, eca_kernel_size
from sca_caption.models.blocks.errors import BlockConfigError
from sca_caption.models.blocks.gc import GlobalContext
from sca_caption.models.blocks.gsop import GSoP, centred_covariance
from sca_caption.models.blocks.non_local import NonLocal
from sca_caption.models.blocks.residual_attention import AttentionModule, ResidualUnit, SoftMaskBranch
from sca_caption.models.blocks.se import SqueezeExcitation
from sca_caption.models.blocks.selective_kernel import SelectiveKernel
from sca_caption.models.blocks.split_attention import SplitAttention
from sca_caption.models.blocks.triplet import TripletAttention, ZPoolGate, z_pool

__all__ = [
    "AttentionModule",
    "BAM",
    "BAMChannelBranch",
    "BAMSpatialBranch",
    "BlockConfigError",
    "CBAM",
    "CSRA",
    "ChannelGate",
    "CrissCrossAttention",
    "DoubleAttention",
    "ECA",
    "GSoP",
    "GlobalContext",
    "HEAD_TEMPERATURES",
    "MAX_POOL_TEMPERATURE",
    "MultiHeadCSRA",
    "NonLocal",
    "ResidualUnit",
    "SelectiveKernel",
    "SoftMaskBranch",
    "SpatialGate",
    "SplitAttention",
    "SqueezeExcitation",
    "TripletAttention",
    "ZPoolGate",
    "centred_covariance",
    "eca_kernel_size",
    "z_pool",
]
