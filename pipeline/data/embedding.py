"""Soft labels from an embedding store: looked up in the loader, decoded on the training device.

An embedding store keeps each grid crop's (and object box's) teacher image embedding instead of a top-k
distribution (``store/embedding.py``). The loader only looks rows up: each target gets the matched crops'
stored codes, nothing depends on the vocabulary. The training step then turns a whole batch into
distributions over the *run's* classes in one matrix product on the device::

    soft = sum_m w_m softmax(logit_scale * (codes_m * scale_m) @ T.T / temperature)     (B.n x M x D) @ (D x C)

with ``T`` (C, D) the run's class text embeddings from the store's teacher (a classifier store: its head,
``softmax((e @ W.T + b) / temperature)`` over the label space, mapped onto the run's classes), ``M`` matched crops per tile
(1 for ``exact``/``nearest``; every IoU-weighted crop for ``interp``, as :class:`.labels.CropSoftLabels`
mixes decoded top-k rows).

Target keys written by the datasets: ``soft_embed`` (n, M, D) int8/float16 codes, ``soft_embed_scale``
(n, M) float32 (1 for float16 codes), ``soft_embed_weight`` (n, M) float32 (0 for padding), ``soft_mask``
(n,) bool. :class:`EmbeddingDecoder` adds ``soft_labels`` (n, C) float32 on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...store import LabelReader, flip_labels
from ..grid import MATCH_MODES, match_crops

EMBED_KEYS = ("soft_embed", "soft_embed_scale", "soft_embed_weight")


def _empty(n: int, m: int, dim: int, dtype: str) -> dict[str, np.ndarray]:
    return {"soft_embed": np.zeros((n, m, dim), dtype), "soft_embed_scale": np.ones((n, m), np.float32),
            "soft_embed_weight": np.zeros((n, m), np.float32), "soft_mask": np.zeros(n, bool)}


def _as_tensors(fields: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fields.items()}


class CropEmbeddings:
    """Embedding-store counterpart of :class:`.labels.CropSoftLabels`.

    ``tiles(rows, regions)`` with ``rows`` (n, 2) int (store shard, position; -1 = not in the store) and
    ``regions`` (n, 4) normalised xyxy in each tile's original image returns the target fields above as
    tensors (M = 1, or every weighted crop of a tile for ``interp``; shorter rows padded with weight 0).
    ``exact``/``nearest`` give the one matched crop's codes
    (bit for bit as stored); a row that is not done or a match below ``iou_threshold`` is masked.
    ``flipped`` (n,) bool: on a store with mirror rows a flipped tile gets the mirror rows' codes."""

    def __init__(self, reader: LabelReader, num_classes: int, mode: str = "nearest", iou_threshold: float = 0.5,
                 top_n: int = 4) -> None:
        if mode not in MATCH_MODES:
            raise ValueError(f"crop match mode must be one of {MATCH_MODES}, got {mode!r}")
        self.reader = reader
        self.num_classes = num_classes
        self.mode, self.iou_threshold, self.top_n = mode, iou_threshold, top_n
        self.grid_boxes = np.asarray(reader.attrs["grid"]["boxes"], dtype=np.float64)
        self.dim, self.dtype = reader.layout.embed_dim, reader.layout.embed_dtype
        # A flipped tile reads the mirror rows (row K + j: box j mirrored) of a store that has them.
        self.mirror_offset = len(self.grid_boxes) if flip_labels(reader.attrs) else 0

    def tiles(self, rows: np.ndarray, regions: np.ndarray, flipped: np.ndarray | None = None
              ) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        flipped = np.zeros(len(rows), bool) if flipped is None else np.asarray(flipped, dtype=bool).reshape(-1)
        regions = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
        found = []
        for i, (shard, position) in enumerate(rows):
            if position < 0:
                continue
            codes, scale, valid = self.reader.embeddings(int(shard), int(position))
            if not valid:
                continue
            weights, ok = match_crops(regions[i:i + 1], self.grid_boxes, self.mode, self.iou_threshold, self.top_n)
            if ok[0]:
                # Every crop with weight (interp includes ties with the n-th best, so maybe more than top_n).
                cols = np.nonzero(weights[0])[0]
                found.append((i, codes, scale, weights[0], cols[np.argsort(-weights[0, cols], kind="stable")]))
        out = _empty(len(rows), max([len(f[4]) for f in found] + [1]), self.dim, self.dtype)
        for i, codes, scale, weights, cols in found:
            m = len(cols)
            stored = cols + (self.mirror_offset if flipped[i] else 0)
            out["soft_embed"][i, :m] = codes[stored]
            if scale is not None:
                out["soft_embed_scale"][i, :m] = scale[stored]
            out["soft_embed_weight"][i, :m] = weights[cols]
            out["soft_mask"][i] = True
        return _as_tensors(out)


class ObjectEmbeddings:
    """Embedding-store counterpart of :class:`.labels.ObjectSoftLabels`: ``fields(ann_ids)`` -> the target
    fields above (M = 1) for detection boxes, masked where the store has no embedding for the annotation."""

    def __init__(self, reader: LabelReader, num_classes: int) -> None:
        self.reader = reader
        self.num_classes = num_classes
        self.available = reader.has_objects()
        self.dim, self.dtype = reader.layout.embed_dim, reader.layout.embed_dtype

    def fields(self, ann_ids) -> dict[str, torch.Tensor]:
        ann_ids = np.asarray(ann_ids, dtype=np.int64).reshape(-1)
        out = _empty(len(ann_ids), 1, self.dim, self.dtype)
        if self.available and len(ann_ids):
            codes, scale, valid = self.reader.object_embeddings(ann_ids)
            out["soft_embed"][:, 0] = np.where(valid[:, None], codes, 0)
            if scale is not None:
                out["soft_embed_scale"][:, 0] = np.where(valid, scale.astype(np.float32), 1.0)
            out["soft_embed_weight"][:, 0] = valid
            out["soft_mask"] = valid
        return _as_tensors(out)


def _widen(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """(n, M, ...) -> (n, width, ...), padded with ``value`` (padding rows carry weight 0)."""
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1], *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


class EmbeddingDecoder(torch.nn.Module):
    """Stored embeddings -> soft labels over a vocabulary, on whatever device the module is on.

    CLIP stores: ``weight`` (C, D) unit-norm class text embeddings of the store's teacher for the run's
    vocabulary and prompts, no bias: ``softmax(logit_scale * e @ T.T / temperature)``.
    Classifier stores: ``weight`` (L, D) and ``bias`` (L,) the stored head, ``logit_scale`` 1, and ``mapping``
    (L, C) 0/1 onto the run's vocabulary (None: the label space itself):
    ``softmax((e @ W.T + b) / temperature) @ mapping``, the mass of unmapped label-space classes handled by
    ``residual`` (as :func:`~lt_distill.store.embedding.apply_residual`: None leaves it out, ``spread`` adds
    it evenly to the C classes, ``renormalise`` rescales to sum 1)."""

    def __init__(self, weight: torch.Tensor, logit_scale: float, temperature: float, bias: torch.Tensor | None = None,
                 mapping: torch.Tensor | None = None, residual: str | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"soft-label temperature must be > 0, got {temperature}")
        if residual not in (None, "spread", "renormalise"):
            raise ValueError(f"residual must be None, spread or renormalise, got {residual!r}")
        self.residual = residual if mapping is not None else None
        weight = torch.as_tensor(weight, dtype=torch.float32).contiguous()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", None if bias is None else torch.as_tensor(bias, dtype=torch.float32).contiguous(),
                             persistent=False)
        if mapping is not None and tuple(mapping.shape[:1]) != (len(weight),):
            raise ValueError(f"mapping must be ({len(weight)}, C), got {tuple(mapping.shape)}")
        self.register_buffer("mapping", None if mapping is None else torch.as_tensor(mapping, dtype=torch.float32),
                             persistent=False)
        self.logit_scale = float(logit_scale)
        self.temperature = float(temperature)

    @property
    def num_classes(self) -> int:
        return len(self.weight) if self.mapping is None else self.mapping.shape[1]

    @torch.no_grad()
    def forward(self, codes: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """codes (N, M, D), scale (N, M), weight (N, M) -> (N, C) float32 mixtures of decoded rows."""
        n, m, d = codes.shape
        device = self.weight.device
        emb = codes.to(device, torch.float32) * scale.to(device, torch.float32)[..., None]
        logits = emb.view(n * m, d) @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        probs = torch.softmax(logits * (self.logit_scale / self.temperature), dim=-1)
        if self.mapping is not None:
            probs = probs @ self.mapping
            mass = probs.sum(-1, keepdim=True)
            if self.residual == "renormalise":
                probs = probs / mass.clamp_min(1e-12)
            elif self.residual == "spread":
                probs = probs + (1 - mass).clamp_min(0) / probs.shape[-1]
        return (probs.view(n, m, -1) * weight.to(device, torch.float32)[..., None]).sum(1)

    @torch.no_grad()
    def fill(self, targets: Sequence[dict[str, Any]]) -> None:
        """Decode every target's stored embeddings in one batch: sets ``soft_labels`` (n, C) float32 (zeros
        where ``soft_mask`` is False) and drops the ``soft_embed*`` keys. Targets without them are left as
        they are."""
        holders = [t for t in targets if "soft_embed" in t]
        if not holders:
            return
        sizes = [len(t["soft_embed"]) for t in holders]
        width = max(t["soft_embed"].shape[1] for t in holders)  # crops per row differ between targets (interp)
        fields = [torch.cat([_widen(t.pop(k), width, 1.0 if k == "soft_embed_scale" else 0.0) for t in holders])
                  for k in EMBED_KEYS]
        soft = self(*fields) if sum(sizes) else torch.zeros((0, self.num_classes), device=self.weight.device)
        for t, part in zip(holders, torch.split(soft, sizes)):
            t["soft_labels"] = part * t["soft_mask"].to(part.device)[:, None]
