"""RichSem's 4-image mosaic for classification images (mmdet's ``Mosaic`` as used by RichSem).

The canvas is ``2 * tile_size`` square, filled with ``pad_value``; its centre is drawn in
``center_ratio_range * tile_size``. Tile i goes to quadrant i (top-left, top-right, bottom-left,
bottom-right) with one corner on the centre. Each tile keeps its aspect ratio and is scaled to fit
a ``tile_size`` square (``fit="tile"``, RichSem) and cut by its quadrant, or scaled to fit its
quadrant (``fit="quadrant"``: never cut, so an exact grid crop stays exact).

Each tile contributes one box: its whole-image box clipped to the canvas (= the pasted rectangle),
with the tile's hard label, and its visible region in original-image coordinates, tracked through
the cut by :func:`..transforms.crop`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .transforms import Target, crop, resize

QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
FITS = ("tile", "quadrant")


def _quadrant(loc: str, cx: int, cy: int, canvas: int) -> tuple[int, int]:
    """(width, height) available to a tile in quadrant ``loc``."""
    qw = cx if loc in ("top_left", "bottom_left") else canvas - cx
    qh = cy if loc in ("top_left", "top_right") else canvas - cy
    return qw, qh


def _paste_coords(loc: str, cx: int, cy: int, w: int, h: int, canvas: int):
    """Paste rectangle (x0, y0, x1, y1) on the canvas and crop rectangle of the (w, h) tile."""
    if loc == "top_left":
        x0, y0, x1, y1 = max(cx - w, 0), max(cy - h, 0), cx, cy
        tile_crop = (w - (x1 - x0), h - (y1 - y0), w, h)
    elif loc == "top_right":
        x0, y0, x1, y1 = cx, max(cy - h, 0), min(cx + w, canvas), cy
        tile_crop = (0, h - (y1 - y0), x1 - x0, h)
    elif loc == "bottom_left":
        x0, y0, x1, y1 = max(cx - w, 0), cy, cx, min(cy + h, canvas)
        tile_crop = (w - (x1 - x0), 0, w, y1 - y0)
    else:
        x0, y0, x1, y1 = cx, cy, min(cx + w, canvas), min(cy + h, canvas)
        tile_crop = (0, 0, x1 - x0, y1 - y0)
    return (x0, y0, x1, y1), tile_crop


def mosaic_tiles(tiles: list[tuple[torch.Tensor, Target]], tile_size: int, center: tuple[int, int],
           pad_value: float = 114, fit: str = "tile") -> tuple[torch.Tensor, Target]:
    """Combine up to four (image, target) tiles into one canvas.

    Tile targets must carry one box each (the tile's whole-image box, xyxy pixels), ``labels`` (1,),
    ``region`` and ``flipped``, and may carry an ``info`` dict (e.g. the sample's store row), which is
    passed through. Returns the canvas (C, 2T, 2T) and a target with, per visible tile:
    ``boxes`` (n, 4) float32 xyxy canvas pixels, ``labels`` (n,) int64, ``regions`` (n, 4) float64
    normalised xyxy in the tile's original image, ``flipped`` (n,) bool, ``tiles`` (n,) int64 index of
    the tile in ``tiles``, and ``tile_info``: the ``info`` dict of each visible tile.
    """
    if fit not in FITS:
        raise ValueError(f"mosaic fit must be one of {FITS}, got {fit!r}")
    if not 1 <= len(tiles) <= 4:
        raise ValueError(f"a mosaic takes 1 to 4 tiles, got {len(tiles)}")
    canvas_size = 2 * tile_size
    cx, cy = int(center[0]), int(center[1])
    channels, dtype = tiles[0][0].shape[0], tiles[0][0].dtype
    canvas = torch.full((channels, canvas_size, canvas_size), pad_value, dtype=dtype)
    boxes, labels, regions, flipped, index, info = [], [], [], [], [], []
    for i, ((image, target), loc) in enumerate(zip(tiles, QUADRANTS)):
        qw, qh = _quadrant(loc, cx, cy, canvas_size)
        if qw <= 0 or qh <= 0:
            continue
        h, w = image.shape[-2:]
        bw, bh = (tile_size, tile_size) if fit == "tile" else (qw, qh)
        scale = min(bw / w, bh / h)
        image, target = resize(image, target, (max(1, int(round(h * scale))), max(1, int(round(w * scale)))))
        h, w = image.shape[-2:]
        (x0, y0, x1, y1), (tx0, ty0, tx1, ty1) = _paste_coords(loc, cx, cy, w, h, canvas_size)
        if (tx0, ty0, tx1, ty1) != (0, 0, w, h):
            image, target = crop(image, target, (ty0, tx0, ty1 - ty0, tx1 - tx0))
        if len(target["boxes"]) == 0:
            continue  # the whole-image box fell outside the canvas
        canvas[:, y0:y1, x0:x1] = image
        box = target["boxes"][0] + torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        boxes.append(box.clamp(min=0, max=canvas_size))
        labels.append(int(target["labels"][0]))
        regions.append(target["region"])
        flipped.append(bool(target.get("flipped", False)))
        index.append(i)
        info.append(target.get("info", {}))
    out: dict[str, Any] = {
        "boxes": torch.stack(boxes) if boxes else torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "regions": np.asarray(regions, dtype=np.float64).reshape(-1, 4),
        "flipped": np.asarray(flipped, dtype=bool),
        "tiles": torch.tensor(index, dtype=torch.int64),
        "tile_info": info,
        "size": torch.tensor([canvas_size, canvas_size], dtype=torch.int64),
        "orig_size": torch.tensor([canvas_size, canvas_size], dtype=torch.int64),
    }
    return canvas, out


class RandomMosaic:
    """Draws the mosaic centre uniformly in ``center_ratio_range * tile_size`` (both axes)."""

    def __init__(self, tile_size: int, center_ratio_range: tuple[float, float] = (0.5, 1.5),
                 pad_value: float = 114, fit: str = "tile") -> None:
        self.tile_size = tile_size
        self.center_ratio_range = tuple(center_ratio_range)
        self.pad_value = pad_value
        self.fit = fit

    def __call__(self, tiles):
        cx = int(random.uniform(*self.center_ratio_range) * self.tile_size)
        cy = int(random.uniform(*self.center_ratio_range) * self.tile_size)
        return mosaic_tiles(tiles, self.tile_size, (cx, cy), self.pad_value, self.fit)

    def __repr__(self) -> str:
        return (f"RandomMosaic(tile_size={self.tile_size}, center_ratio_range={self.center_ratio_range}, "
                f"fit={self.fit!r})")
