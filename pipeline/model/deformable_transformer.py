"""Deformable transformer of DINO: encoder, encoder proposals for two-stage query selection, and a
decoder with iterative box refinement and look-forward-twice.

Shapes: B batch, S flattened tokens of all levels, L levels, Q decoder queries, D hidden size.
Boxes are normalised cxcywh relative to the unpadded image; reference points are scaled by each
level's valid ratio before sampling, because the flattened maps include the padding.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...cuda_ops import MSDeformAttn
from .box_ops import inverse_sigmoid


class MLP(nn.Module):
    """A few Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """``(B, Q, 4)`` cxcywh in [0, 1] -> ``(B, Q, 4 * num_feats)`` sine encoding ordered (y, x, w, h)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    parts = []
    for coord in (1, 0, 2, 3):
        pos = boxes[..., coord, None] * 2 * math.pi / dim_t
        parts.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


@dataclasses.dataclass
class EncoderMemory:
    """The encoder output and the geometry every later step needs."""

    memory: torch.Tensor  # (B, S, D)
    padding_mask: torch.Tensor  # (B, S) bool, True on padding
    spatial_shapes: torch.Tensor  # (L, 2) int64 (h, w)
    level_start_index: torch.Tensor  # (L,) int64
    valid_ratios: torch.Tensor  # (B, L, 2) valid fraction (x, y) of each level


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos, reference_points, mem: EncoderMemory, self_attn_mask=None):
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        attn = self.cross_attn(
            tgt + query_pos, reference_points, mem.memory, mem.spatial_shapes, mem.level_start_index, mem.padding_mask
        )
        tgt = self.norm2(tgt + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class DeformableDecoder(nn.Module):
    """Decoder layers with iterative box refinement (one box head shared by all layers).

    Look-forward-twice (DINO): layer i refines from the *detached* box of layer i-1, but its
    prediction is re-applied to the *undetached* box of layer i-1, so layer i's loss also trains
    the box head output of layer i-1.

    ``box_refine="dino"`` follows DINO exactly (models/dino/deformable_transformer.py, decoder
    ``iter update``, and dino.py's output boxes): the next reference comes from the box head of the
    layer's *un-normalised* output, the layer's predicted box from the box head of the normalised
    output (the hidden state the class heads see). ``"normalised"`` uses the normalised output for
    both (pre-issue-10).
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int, bbox_head: MLP,
                 box_refine: str = "dino", eps: float = 1e-3):
        super().__init__()
        if box_refine not in ("dino", "normalised"):
            raise ValueError(f"box_refine must be 'dino' or 'normalised', got {box_refine!r}")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_head = bbox_head
        self.d_model = d_model
        self.box_refine = box_refine
        self.eps = eps

    def forward(self, tgt: torch.Tensor, ref_unsig: torch.Tensor, mem: EncoderMemory, self_attn_mask=None):
        """tgt ``(B, Q, D)`` content queries, ref_unsig ``(B, Q, 4)`` initial boxes before sigmoid (no grad).

        Returns per layer the normalised hidden states ``(B, Q, D)`` and predicted boxes ``(B, Q, 4)``.
        """
        ref = ref_unsig.sigmoid()
        ref_undetached = ref
        ratios = torch.cat([mem.valid_ratios, mem.valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        hidden, boxes = [], []
        out = tgt
        for layer in self.layers:
            ref_input = ref[:, :, None] * ratios  # (B, Q, L, 4) in padded-map coordinates
            query_pos = self.ref_point_head(box_sine_embedding(ref_input[:, :, 0], self.d_model // 2))
            out = layer(out, query_pos, ref_input, mem, self_attn_mask)
            h = self.norm(out)
            delta = self.bbox_head(h)
            boxes.append((delta + inverse_sigmoid(ref_undetached, self.eps)).sigmoid())
            delta_ref = self.bbox_head(out) if self.box_refine == "dino" else delta
            ref_undetached = (delta_ref + inverse_sigmoid(ref, self.eps)).sigmoid()
            ref = ref_undetached.detach()
            hidden.append(h)
        return hidden, boxes


class DeformableTransformer(nn.Module):
    """Deformable encoder + encoder proposals + decoder. The two-stage query selection itself needs
    the class head and lives in :class:`~.dino.DINO`."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        decoder_bbox_head: MLP | None = None,
        box_refine: str = "dino",
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        self.d_model = d_model
        enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc_layer) for _ in range(num_encoder_layers))
        dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points)
        bbox_head = decoder_bbox_head if decoder_bbox_head is not None else MLP(d_model, d_model, 4, 3)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers, d_model, bbox_head, box_refine,
                                         inverse_sigmoid_eps)
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    # -- encoder ----------------------------------------------------------------------------------
    @staticmethod
    def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """``(B, h, w)`` padding mask -> ``(B, 2)`` fraction of valid columns and rows."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack([valid_w / w, valid_h / h], -1)

    @staticmethod
    def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Token centres of every level, normalised by the valid area -> ``(B, S, L, 2)`` for sampling."""
        refs = []
        device = valid_ratios.device
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, device=device),
                torch.linspace(0.5, w - 0.5, w, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def encode(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos: list[torch.Tensor]) -> EncoderMemory:
        """Per-level features ``(B, D, h, w)``, masks ``(B, h, w)`` and encodings -> :class:`EncoderMemory`."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([(p.flatten(2).transpose(1, 2) + self.level_embed[lvl]) for lvl, p in enumerate(pos)], 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)
        reference_points = self.encoder_reference_points(shapes, valid_ratios)
        out = src_flat
        for layer in self.encoder_layers:
            out = layer(out, pos_flat, reference_points, spatial_shapes, level_start_index, mask_flat)
        return EncoderMemory(out, mask_flat, spatial_shapes, level_start_index, valid_ratios)

    # -- two-stage proposals ----------------------------------------------------------------------
    def proposals(self, mem: EncoderMemory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One proposal per token: a box centred on it, side 0.05 * 2**level (Deformable DETR two-stage).

        Returns the projected memory ``(B, S, D)``, proposal boxes before sigmoid ``(B, S, 4)`` and a
        bool ``(B, S)`` that is False for padding tokens and proposals touching the border; those get
        zero features and a neutral (0) box so nothing downstream sees inf, and must not be selected.
        """
        b = mem.memory.shape[0]
        boxes, start = [], 0
        for lvl, (h, w) in enumerate(mem.spatial_shapes.tolist()):
            mask = mem.padding_mask[:, start : start + h * w].view(b, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=mask.device),
                torch.arange(w, dtype=torch.float32, device=mask.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)[None] + 0.5
            grid = grid / torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2).float()
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            boxes.append(torch.cat([grid, wh], -1).view(b, -1, 4))
            start += h * w
        boxes = torch.cat(boxes, 1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~mem.padding_mask
        boxes_unsig = inverse_sigmoid(boxes, self.inverse_sigmoid_eps).masked_fill(~valid[..., None], 0.0)
        memory = mem.memory.masked_fill(~valid[..., None], 0.0)
        return self.enc_output_norm(self.enc_output(memory)), boxes_unsig, valid
