"""The crop grid: which boxes of every classification image get a cached soft label, and how an
augmentation crop is matched back to them (DESIGN §4).

A grid spec is a comma-separated list of ``scale:n`` items: ``n x n`` square-in-normalised-coordinates
boxes of side ``scale`` (a fraction of the image width and height), evenly spaced from edge to edge.
Boxes are ``(x0, y0, x1, y1)`` in normalised coordinates of the original image, listed scale by scale,
row by row. The first box of every named grid is the whole image.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ConfigError

NAMED_GRIDS: dict[str, str] = {
    "default": "1.0:1,0.75:2,0.5:3,0.35:4",  # K = 30 (DESIGN §4)
    "coarse": "1.0:1,0.6:2,0.4:3",            # K = 14
    "whole": "1.0:1",                          # K = 1: image-level labels only
}

MATCH_MODES = ("exact", "nearest", "interp", "interp_topn")
EXACT_IOU = 1.0 - 1e-6  # a region at least this close to a grid box *is* that box


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """A parsed grid: ``levels`` is a tuple of (scale, n) pairs; ``boxes`` gives the K boxes."""

    levels: tuple[tuple[float, int], ...]

    @classmethod
    def parse(cls, spec: str) -> "GridSpec":
        """A named grid (``default``, ``coarse``, ``whole``) or a spec string like ``"1.0:1,0.5:3"``."""
        text = NAMED_GRIDS.get(spec, spec)
        levels = []
        for item in text.split(","):
            try:
                scale_text, n_text = item.split(":")
                scale, n = float(scale_text), int(n_text)
            except ValueError as exc:
                raise ConfigError(
                    f"grid spec {spec!r}: item {item!r} is not scale:n (named grids: {', '.join(NAMED_GRIDS)})"
                ) from exc
            if not 0 < scale <= 1 or n < 1:
                raise ConfigError(f"grid spec {spec!r}: scale must be in (0, 1] and n >= 1, got {item!r}")
            if n > 1 and scale * n < 1 - 1e-9:
                raise ConfigError(f"grid spec {spec!r}: {n} boxes of side {scale} leave gaps (need scale*n >= 1)")
            levels.append((scale, n))
        return cls(tuple(levels))

    @property
    def spec(self) -> str:
        """Canonical spec string (what the store records)."""
        return ",".join(f"{s:g}:{n}" for s, n in self.levels)

    @property
    def num_boxes(self) -> int:
        return sum(n * n for _, n in self.levels)

    def boxes(self) -> np.ndarray:
        """(K, 4) float64 boxes (x0, y0, x1, y1), normalised."""
        out = []
        for scale, n in self.levels:
            starts = np.linspace(0.0, 1.0 - scale, n) if n > 1 else np.array([(1.0 - scale) / 2])
            for y0 in starts:
                for x0 in starts:
                    out.append((x0, y0, x0 + scale, y0 + scale))
        return np.asarray(out, dtype=np.float64)

    def pixel_boxes(self, width: int, height: int) -> np.ndarray:
        """(K, 4) boxes in pixels of a ``width`` x ``height`` image."""
        return self.boxes() * np.array([width, height, width, height], dtype=np.float64)


def mirror_boxes(boxes: np.ndarray) -> np.ndarray:
    """Normalised xyxy boxes (K, 4) -> the same boxes in the left-right mirrored image, (1 - x1, y0, 1 - x0, y1)."""
    b = np.asarray(boxes)
    return np.stack([1 - b[..., 2], b[..., 1], 1 - b[..., 0], b[..., 3]], axis=-1).astype(b.dtype, copy=False)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (n, 4) against (m, 4) xyxy boxes -> (n, m)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_crops(
    regions: np.ndarray,
    grid_boxes: np.ndarray,
    mode: str = "nearest",
    iou_threshold: float = 0.5,
    top_n: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Match visible regions (n, 4), normalised xyxy in original-image coordinates, to grid boxes.

    Returns ``weights`` (n, K) — the soft label of region i is ``sum_j weights[i, j] * label_j`` — and
    ``valid`` (n,) bool; rows with ``valid`` False get no soft loss (no invented labels).

    * ``exact``: the region must be a grid box (to 1e-6); weight 1 on it. Other regions are invalid.
    * ``nearest``: weight 1 on the grid box of highest IoU; invalid below ``iou_threshold``.
    * ``interp``: mixture of the grid boxes with IoU >= ``iou_threshold``, weight proportional to IoU
      (p = 1 in IoU^p), at most the ``top_n`` best of them, all boxes tied with the n-th best included so
      that mirror-image regions get mirror-image weights; a region equal to a grid box gets weight 1 on
      it. Invalid when the best IoU is below ``iou_threshold``.
    * ``interp_topn`` (pre-issue-10 ``interp``): IoU-weighted mixture of the ``top_n`` boxes of highest
      IoU whatever their IoU, ties broken by grid order; an exact match gets only part of its own label.

    Horizontal flips need no special case *here*: the region is given in original-image coordinates, so a
    flipped crop matches the box it was cut from. Its label does: a real teacher's label of a mirrored crop
    is not that of the crop (EfficientNet-Lite0: 77% top-1 agreement). A store made with ``flip_labels``
    keeps a mirror row per box (row K + j: box j mirrored), and readers apply these same weights to the
    mirror rows for a flipped tile (:class:`.data.labels.CropSoftLabels`).
    """
    if mode not in MATCH_MODES:
        raise ConfigError(f"crop match mode must be one of {MATCH_MODES}, got {mode!r}")
    iou = box_iou(regions, grid_boxes)
    n, k = iou.shape
    weights = np.zeros((n, k), dtype=np.float64)
    if n == 0:
        return weights, np.zeros(0, dtype=bool)
    best = iou.argmax(axis=1)
    best_iou = iou[np.arange(n), best]
    if mode == "exact":
        valid = best_iou >= EXACT_IOU
        weights[np.arange(n), best] = 1.0
    elif mode == "nearest":
        valid = best_iou >= iou_threshold
        weights[np.arange(n), best] = 1.0
    elif mode == "interp_topn":
        top = np.argsort(-iou, axis=1, kind="stable")[:, : max(1, min(top_n, k))]
        top_iou = np.take_along_axis(iou, top, axis=1)
        np.put_along_axis(weights, top, top_iou, axis=1)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        valid = best_iou >= iou_threshold
    else:
        nth_best = -np.sort(-iou, axis=1)[:, max(1, min(top_n, k)) - 1 : max(1, min(top_n, k))]
        keep = (iou >= iou_threshold) & (iou >= nth_best - 1e-12)  # ties with the n-th best stay in
        weights = np.where(keep, iou, 0.0)
        exact = iou >= EXACT_IOU
        weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64), weights)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        valid = best_iou >= iou_threshold
    weights[~valid] = 0.0
    return weights, valid
