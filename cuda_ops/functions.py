"""The dispatching entry point of multi-scale deformable attention.

For now this is the pure-PyTorch reference; the compiled kernels (``csrc/``) plug in here.
"""

from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference


def prepare_ops() -> None:
    """Build or load the compiled kernels ahead of use (no-op until the extension lands)."""


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; same arguments and result as :func:`ms_deform_attn_reference`."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
