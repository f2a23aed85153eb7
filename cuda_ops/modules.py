"""``MSDeformAttn``: the multi-scale deformable attention layer of Deformable-DETR / DINO."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .functions import ms_deform_attn, prepare_ops


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021).

    Each query predicts, per head, ``n_levels * n_points`` sampling offsets around its reference
    point and a softmax weight per sample; the output is the weighted sum of the bilinearly sampled
    value features, projected back to ``d_model``.

    Args:
        d_model: hidden size; must be divisible by ``n_heads``.
        n_levels: number of feature levels.
        n_heads: number of attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()
        # Build or load the kernels now, outside any torch.compile trace.
        prepare_ops()

    def _reset_parameters(self) -> None:
        # Offsets start on a ring: head h looks in direction 2*pi*h/n_heads, point i at distance i+1.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-level features.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` in ``[0, 1]`` (padded area
                included), or ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``; offsets are then scaled by
                half the box size.
            input_flatten: ``(N, S, C)`` features of all levels, ``S = sum(H_l * W_l)``.
            input_spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
            input_level_start_index: ``(L,)`` int64 offset of each level in ``S``.
            input_padding_mask: ``(N, S)`` bool, True at padded positions (their value is zeroed).

        Returns:
            ``(N, Lq, C)``.
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        if not torch.compiler.is_compiling() and input_spatial_shapes.device.type == "cpu":
            total = int(input_spatial_shapes.prod(1).sum())
            if total != len_in:
                raise ValueError(f"spatial shapes cover {total} positions but input_flatten has {len_in}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            n, len_q, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = F.softmax(attention_weights, -1).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights
        )
        return self.output_proj(output)
