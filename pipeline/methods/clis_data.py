"""CLIS data: pre-defined regions, tile-query anchors, region paste and mixed batches (METHODS.md §CLIS).

* :class:`PredefinedRegions` – per classification row (store shard, position) the box of highest score
  for the row's labelled class from a trained detector (``lt-distill clis-regions``), normalised xyxy
  in the original image; NaN rows have none and fall back to the whole tile.
* :func:`region_on_canvas` – a region of the original image -> its place in a mosaic tile, through the
  tile's visible region and flip (the crop-matching contract of ``pipeline.data.transforms``).
* :func:`paste_region` – copy-paste (Ghiasi et al.) of a tile region into a detection image: the patch
  becomes a ground truth with class loss only (``box_mask`` False, ``paste_tile`` = source tile), and
  boxes it occludes are updated as copy-paste updates masks (a box is its own mask here): fully
  covered -> dropped, a side strip covered -> shrunk, a hole in the middle -> unchanged.
* :class:`MixedLoader` – one batch per step with detection images and classification mosaics together
  (CLR needs both scenes in one forward), replacing the 1:1 alternation.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ...errors import LtDistillError
from ..data.collate import pad_images
from ..data.loader import AlternatingLoader
from ..model.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

REGIONS_FORMAT = "lt-distill-clis-regions"

# Per-box keys of a detection target, and the value a pasted region gets in each.
_PASTE_DEFAULTS = {"soft_mask": False, "ann_ids": -1}


class PredefinedRegions:
    """``regions`` float32 ``(S, R, 4)`` normalised xyxy in the original image (NaN = none), ``scores``
    float32 ``(S, R)``, addressed like the label store's rows (S shards x R rows per shard)."""

    def __init__(self, regions: np.ndarray, scores: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
        if regions.ndim != 3 or regions.shape[-1] != 4 or scores.shape != regions.shape[:2]:
            raise LtDistillError(f"pre-defined regions must be (S, R, 4) with scores (S, R), got "
                                 f"{regions.shape} and {scores.shape}")
        self.regions = regions.astype(np.float32)
        self.scores = scores.astype(np.float32)
        self.attrs = dict(attrs or {})

    @classmethod
    def empty(cls, num_shards: int, rows_per_shard: int, **attrs: Any) -> PredefinedRegions:
        return cls(np.full((num_shards, rows_per_shard, 4), np.nan, np.float32),
                   np.full((num_shards, rows_per_shard), np.nan, np.float32), attrs)

    def get(self, shard: int, position: int) -> np.ndarray | None:
        """The row's region ``(4,)`` or None (no row, or no region for it)."""
        if not (0 <= shard < self.regions.shape[0] and 0 <= position < self.regions.shape[1]):
            return None
        box = self.regions[shard, position]
        return None if np.isnan(box).any() else box

    def save(self, path: str | Path) -> None:
        attrs = json.dumps({"format": REGIONS_FORMAT, **self.attrs})
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to other names
            np.savez(f, regions=self.regions, scores=self.scores, attrs=np.asarray(attrs))

    @classmethod
    def load(cls, path: str | Path) -> PredefinedRegions:
        path = Path(path)
        if not path.is_file():
            raise LtDistillError(f"pre-defined regions file not found: {path} (made by lt-distill clis-regions)")
        try:
            with np.load(path, allow_pickle=False) as data:
                attrs = json.loads(str(data["attrs"]))
                regions, scores = data["regions"], data["scores"]
        except (OSError, ValueError, KeyError) as exc:
            raise LtDistillError(f"cannot read pre-defined regions {path}: {exc}") from exc
        if attrs.get("format") != REGIONS_FORMAT:
            raise LtDistillError(f"{path} is not a pre-defined regions file (format {attrs.get('format')!r})")
        return cls(regions, scores, attrs)


def region_on_canvas(region: np.ndarray, visible: np.ndarray, flipped: bool, tile_box: np.ndarray) -> np.ndarray | None:
    """Map ``region`` (normalised xyxy, original image) into the mosaic: ``visible`` is the tile's visible
    part of the original image (normalised xyxy), shown at ``tile_box`` (xyxy, any unit) and mirrored
    when ``flipped``. Returns xyxy in ``tile_box``'s unit, clipped to it, or None when the region lies
    outside the visible part."""
    vx0, vy0, vx1, vy1 = (float(v) for v in visible)
    x0, y0, x1, y1 = max(region[0], vx0), max(region[1], vy0), min(region[2], vx1), min(region[3], vy1)
    if x1 <= x0 or y1 <= y0:
        return None
    fx0, fx1 = (x0 - vx0) / (vx1 - vx0), (x1 - vx0) / (vx1 - vx0)
    if flipped:  # the tile's left edge is the visible part's right edge
        fx0, fx1 = 1 - fx1, 1 - fx0
    fy0, fy1 = (y0 - vy0) / (vy1 - vy0), (y1 - vy0) / (vy1 - vy0)
    bx0, by0, bx1, by1 = (float(v) for v in tile_box)
    bw, bh = bx1 - bx0, by1 - by0
    return np.array([bx0 + fx0 * bw, by0 + fy0 * bh, bx0 + fx1 * bw, by0 + fy1 * bh])


def tile_query_boxes(target: dict[str, Any], regions: PredefinedRegions | None) -> torch.Tensor:
    """Anchors of a mosaic's tile queries ``(n, 4)`` cxcywh normalised: each tile's pre-defined region
    on the canvas, or its whole-tile box (RichSem's coarse location) when there is none."""
    boxes = target["boxes"].clone().float()
    if regions is None:
        return boxes
    tile_xyxy = box_cxcywh_to_xyxy(boxes).numpy()
    for i, (shard, position) in enumerate(target["rows"].tolist()):
        region = regions.get(shard, position)
        if region is None:
            continue
        placed = region_on_canvas(region, target["regions"][i].numpy(), bool(target["flipped"][i]), tile_xyxy[i])
        if placed is not None:
            boxes[i] = box_xyxy_to_cxcywh(torch.as_tensor(placed, dtype=torch.float32)[None])[0]
    return boxes


def occlude_boxes(boxes: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy-paste update of xyxy ``boxes`` ``(n, 4)`` under an opaque ``patch`` ``(4,)`` (same unit):
    returns the updated boxes and a keep mask ``(n,)`` (False = fully covered). A box is updated to the
    bounding box of its uncovered part."""
    out = boxes.clone()
    px0, py0, px1, py1 = patch.tolist()
    covers_x = (px0 <= boxes[:, 0]) & (px1 >= boxes[:, 2])
    covers_y = (py0 <= boxes[:, 1]) & (py1 >= boxes[:, 3])
    keep = ~(covers_x & covers_y)
    # Full-height strip: cut from the left or the right side.
    left = covers_y & (px0 <= boxes[:, 0]) & (px1 > boxes[:, 0])
    right = covers_y & (px1 >= boxes[:, 2]) & (px0 < boxes[:, 2])
    out[:, 0] = torch.where(left & ~right, torch.full_like(out[:, 0], px1), out[:, 0])
    out[:, 2] = torch.where(right & ~left, torch.full_like(out[:, 2], px0), out[:, 2])
    top = covers_x & (py0 <= boxes[:, 1]) & (py1 > boxes[:, 1])
    bottom = covers_x & (py1 >= boxes[:, 3]) & (py0 < boxes[:, 3])
    out[:, 1] = torch.where(top & ~bottom, torch.full_like(out[:, 1], py1), out[:, 1])
    out[:, 3] = torch.where(bottom & ~top, torch.full_like(out[:, 3], py0), out[:, 3])
    return out, keep


def paste_region(image: torch.Tensor, target: dict[str, Any], patch: torch.Tensor, label: int, tile: int,
                 xy: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Paste ``patch`` ``(3, h, w)`` at pixel ``xy`` (left, top) of ``image`` ``(3, H, W)`` (fits inside)
    and add it to the detection ``target`` as a ground truth of class ``label`` with class loss only.

    Per-box keys updated: ``boxes`` (cxcywh normalised), ``labels``, ``box_mask`` (False for the paste),
    ``paste_tile`` (``tile`` for the paste, -1 otherwise) and, when present, ``soft_labels`` (zeros),
    ``soft_mask`` (False), ``ann_ids`` (-1), ``area`` (patch area)."""
    _, big_h, big_w = image.shape
    _, h, w = patch.shape
    x, y = xy
    if not (0 <= x and 0 <= y and x + w <= big_w and y + h <= big_h):
        raise ValueError(f"patch {w}x{h} at {xy} does not fit a {big_w}x{big_h} image")
    image = image.clone()
    image[:, y:y + h, x:x + w] = patch
    scale = torch.tensor([big_w, big_h, big_w, big_h], dtype=torch.float32)
    n = len(target["boxes"])
    xyxy = box_cxcywh_to_xyxy(target["boxes"].float()) * scale
    patch_box = torch.tensor([x, y, x + w, y + h], dtype=torch.float32)
    xyxy, keep = occlude_boxes(xyxy, patch_box)
    target = dict(target)
    target.setdefault("box_mask", torch.ones(n, dtype=torch.bool))
    target.setdefault("paste_tile", torch.full((n,), -1, dtype=torch.int64))
    for key, value in list(target.items()):  # drop the fully covered boxes from every per-box entry
        if key in ("labels", "box_mask", "paste_tile", "soft_labels", "soft_mask", "ann_ids", "area"):
            target[key] = value[keep]
    new_boxes = torch.cat([xyxy[keep], patch_box[None]]) / scale
    target["boxes"] = box_xyxy_to_cxcywh(new_boxes).to(torch.float32)
    target["labels"] = torch.cat([target["labels"], torch.tensor([label], dtype=target["labels"].dtype)])
    target["box_mask"] = torch.cat([target["box_mask"], torch.tensor([False])])
    target["paste_tile"] = torch.cat([target["paste_tile"], torch.tensor([tile], dtype=torch.int64)])
    if "soft_labels" in target:
        target["soft_labels"] = torch.cat([target["soft_labels"], target["soft_labels"].new_zeros(1, target["soft_labels"].shape[1])])
    for key, default in _PASTE_DEFAULTS.items():
        if key in target:
            target[key] = torch.cat([target[key], torch.tensor([default], dtype=target[key].dtype)])
    if "area" in target:
        target["area"] = torch.cat([target["area"], torch.tensor([float(w * h)], dtype=target["area"].dtype)])
    return image, target


def _unpad(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's images without their padding (extent from ``pixel_mask``)."""
    out = []
    for image, mask in zip(batch["images"], batch["pixel_mask"]):
        valid = ~mask
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        out.append(image[:, :h, :w])
    return out


class CLISBatchMixer:
    """Detection batch + mosaic batch -> one CLIS batch: tile-query anchors and labels on the mosaics,
    ``paste_tiles`` labelled tile regions pasted into random detection images (when > 0), then one padded
    batch (detection images first). The mosaics keep their whole-tile boxes and hard labels as detection
    targets (the baseline's coarse locations), so CLIS adds to the baseline rather than replacing it. Draws from its own ``random.Random(seed)``, so a replayed stream is
    the same stream."""

    def __init__(self, regions: PredefinedRegions | None, paste_tiles: int, paste_scale: tuple[float, float],
                 seed: int = 0) -> None:
        self.regions = regions
        self.paste_tiles = paste_tiles
        self.paste_scale = tuple(paste_scale)
        self.rng = random.Random(seed)

    def __call__(self, det: dict[str, Any], cls: dict[str, Any]) -> dict[str, Any]:
        det_images, cls_images = _unpad(det), _unpad(cls)
        det_targets = [dict(t) for t in det["targets"]]
        cls_targets, tiles = [], []  # tiles: (mosaic index, tile index in mosaic, flat index, label)
        for m, t in enumerate(cls["targets"]):
            t = dict(t)
            t["tile_boxes"] = tile_query_boxes(t, self.regions)
            t["tile_labels"] = t["labels"].clone()
            for j, label in enumerate(t["tile_labels"].tolist()):
                tiles.append((m, j, len(tiles), label))
            cls_targets.append(t)
        labelled = [tile for tile in tiles if tile[3] >= 0]
        if det_images and self.paste_tiles > 0:
            for m, j, flat, label in self.rng.sample(labelled, min(self.paste_tiles, len(labelled))):
                d = self.rng.randrange(len(det_images))
                patch = self._crop(cls_images[m], cls_targets[m]["tile_boxes"][j], det_images[d])
                _, h, w = det_images[d].shape
                xy = (self.rng.randint(0, w - patch.shape[2]), self.rng.randint(0, h - patch.shape[1]))
                det_images[d], det_targets[d] = paste_region(det_images[d], det_targets[d], patch, label, flat, xy)
        if self.paste_tiles > 0:  # every detection target carries the keys (the criterion needs all or none)
            for t in det_targets:
                t.setdefault("box_mask", torch.ones(len(t["boxes"]), dtype=torch.bool))
                t.setdefault("paste_tile", torch.full((len(t["boxes"]),), -1, dtype=torch.int64))
            for t in cls_targets:
                t["box_mask"] = torch.ones(len(t["boxes"]), dtype=torch.bool)
                t["paste_tile"] = torch.full((len(t["boxes"]),), -1, dtype=torch.int64)
        images, mask = pad_images(det_images + cls_images)
        skipped = collections.Counter(det.get("skipped", {}))
        skipped.update(cls.get("skipped", {}))
        return {"images": images, "pixel_mask": mask, "targets": det_targets + cls_targets, "source": "mixed",
                "skipped": dict(skipped)}

    def _crop(self, mosaic: torch.Tensor, box: torch.Tensor, det_image: torch.Tensor) -> torch.Tensor:
        """The tile region (cxcywh normalised) cut from the mosaic and resized so its longer side is
        ``U(paste_scale)`` x the detection image's shorter side (aspect kept, fits inside)."""
        _, mh, mw = mosaic.shape
        x0, y0, x1, y1 = (box_cxcywh_to_xyxy(box[None])[0] * torch.tensor([mw, mh, mw, mh])).tolist()
        x0, y0 = min(int(x0), mw - 1), min(int(y0), mh - 1)
        x1, y1 = max(int(round(x1)), x0 + 1), max(int(round(y1)), y0 + 1)
        patch = mosaic[:, y0:y1, x0:x1]
        _, h, w = det_image.shape
        side = self.rng.uniform(*self.paste_scale) * min(h, w)
        scale = side / max(patch.shape[1:])
        size = (max(1, min(h, round(patch.shape[1] * scale))), max(1, min(w, round(patch.shape[2] * scale))))
        return F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]


class MixedLoader(AlternatingLoader):
    """One mixed batch per step (:class:`CLISBatchMixer`): each detection batch with the next
    ``mosaics_per_batch`` batches of mosaics. Same interface as :class:`AlternatingLoader` (``set_epoch``;
    ``len`` = batches per epoch, here the detection batches)."""

    def __init__(self, detection: DataLoader, classification: DataLoader, mixer: CLISBatchMixer,
                 mosaics_per_batch: int = 1) -> None:
        super().__init__(detection, classification)
        self.mixer = mixer
        self.mosaics_per_batch = mosaics_per_batch

    def __len__(self) -> int:
        return len(self.detection)

    def _mosaics(self) -> dict[str, Any]:
        parts = [self._next_classification() for _ in range(self.mosaics_per_batch)]
        if len(parts) == 1:
            return parts[0]
        images, mask = pad_images([im for p in parts for im in _unpad(p)])
        skipped: collections.Counter = collections.Counter()
        for p in parts:
            skipped.update(p.get("skipped", {}))
        return {"images": images, "pixel_mask": mask, "targets": [t for p in parts for t in p["targets"]],
                "skipped": dict(skipped)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.detection:
            yield self.mixer(batch, self._mosaics())
