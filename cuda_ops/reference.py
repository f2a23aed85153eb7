"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against.

Convention (Deformable-DETR, identical to ``F.grid_sample(align_corners=False, padding_mode="zeros")``):
a normalised location ``(x, y)`` in ``[0, 1]`` on a level of size ``H x W`` reads the pixel-space
point ``(x * W - 0.5, y * H - 0.5)``, so ``x = (j + 0.5) / W`` lands exactly on the centre of
column ``j``. Bilinear interpolation treats every pixel outside the level as zero, so a point
half a pixel beyond the border still gets half of the border pixel and a point a full pixel or
more outside reads exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample``.

    Args:
        value: ``(N, S, M, D)`` per-head values of all levels, flattened level by level.
        spatial_shapes: ``(L, 2)`` int64 ``(H, W)`` of each level.
        level_start_index: ``(L,)`` int64 offset of each level along ``S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` locations.
        attention_weights: ``(N, Lq, M, L, P)`` weights of the samples.

    Returns:
        ``(N, Lq, M * D)`` in the dtype of ``value``.
    """
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    # grid_sample wants [-1, 1]; with align_corners=False that is exactly pixel = loc * W - 0.5.
    grids = 2 * sampling_locations.to(value.dtype) - 1
    sampled = []
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L, P) * (N*M, 1, Lq, L, P) summed over (L, P) -> (N, M*D, Lq)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(n * m, 1, lq, n_levels, n_points)
    output = (torch.stack(sampled, dim=-2) * weights).sum((-2, -1)).view(n, m * d, lq)
    return output.transpose(1, 2).contiguous()
