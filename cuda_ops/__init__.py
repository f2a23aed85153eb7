"""Multi-scale deformable attention (MSDeformAttn): compiled CPU/CUDA kernels and a PyTorch reference."""

from .functions import OpsStatus, ms_deform_attn, prepare_ops
from .modules import MSDeformAttn
from .reference import ms_deform_attn_reference

__all__ = ["MSDeformAttn", "OpsStatus", "ms_deform_attn", "ms_deform_attn_reference", "prepare_ops"]
