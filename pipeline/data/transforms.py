"""Functional transforms acting on (image, target) together, in the style of DETR's ``transforms.py``.

Images are tensors (C, H, W) of any dtype (uint8 photos; float coordinate grids in the tests).
A target is a dict:

* ``boxes`` float32 (n, 4) xyxy in pixels of the current image, plus per-box fields that follow
  the boxes when a crop drops some (:data:`PER_BOX_FIELDS`),
* ``size`` int64 (2,) (h, w) of the current image, ``orig_size`` (h, w) of the decoded image,
* for classification images also ``region``: the current image's extent as a normalised xyxy box
  in ORIGINAL-image coordinates (a tuple of 4 floats, exact), and ``flipped``: whether the current
  image is mirrored with respect to the original. Every transform keeps them up to date, so after
  any chain of flips, resizes and crops, ``region`` says which part of the original photo is visible
  (DESIGN §4: the crop-matching contract lives here).

Random transforms draw from Python's ``random`` module (seeded per DataLoader worker by PyTorch).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF

from ..images import pixel_boxes

Target = dict[str, Any]
# Fields indexed by box: a crop that drops a box drops its entry in each of them.
PER_BOX_FIELDS = ("boxes", "labels", "ann_ids", "area", "iscrowd")


def _set_size(target: Target, h: int, w: int) -> None:
    target["size"] = torch.tensor([h, w], dtype=torch.int64)


def _crop_region(target: Target, fx0: float, fy0: float, fx1: float, fy1: float) -> None:
    """Update ``region`` for a crop given as fractions of the current image (x0, y0, x1, y1)."""
    if "region" not in target:
        return
    rx0, ry0, rx1, ry1 = target["region"]
    rw, rh = rx1 - rx0, ry1 - ry0
    if target.get("flipped", False):  # current x = 0 is original x = rx1
        x0, x1 = rx1 - fx1 * rw, rx1 - fx0 * rw
    else:
        x0, x1 = rx0 + fx0 * rw, rx0 + fx1 * rw
    target["region"] = (x0, ry0 + fy0 * rh, x1, ry0 + fy1 * rh)


def _crop_pixels(image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int) -> tuple:
    cropped = TF.crop(image, top, left, height, width)
    target = dict(target)
    _set_size(target, height, width)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.minimum(boxes.reshape(-1, 2, 2), torch.tensor([width, height], dtype=torch.float32))
        boxes = boxes.clamp(min=0)
        keep = (boxes[:, 1, :] > boxes[:, 0, :]).all(dim=1)
        target["boxes"] = boxes.reshape(-1, 4)
        if "area" in target:
            target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
        for field in PER_BOX_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def crop(image: torch.Tensor, target: Target, region: Sequence[int]) -> tuple[torch.Tensor, Target]:
    """Crop ``region`` = (top, left, height, width) pixels; boxes are clipped, empty ones dropped."""
    top, left, height, width = (int(v) for v in region)
    h, w = image.shape[-2:]
    out, target = _crop_pixels(image, target, top, left, height, width)
    _crop_region(target, left / w, top / h, (left + width) / w, (top + height) / h)
    return out, target


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised xyxy box -> (top, left, height, width) whole pixels of a ``width`` x ``height`` image,
    cut exactly as the teacher cuts crops (:func:`..teacher.preprocess.pixel_boxes`: edges rounded to the
    nearest pixel boundary, at least one pixel)."""
    x0, y0, x1, y1 = (int(v) for v in pixel_boxes(np.asarray([box], dtype=np.float64), width, height)[0])
    return y0, x0, y1 - y0, x1 - x0


def crop_box(image: torch.Tensor, target: Target, box: Sequence[float]) -> tuple[torch.Tensor, Target]:
    """Crop the normalised xyxy ``box`` of the current image, cut at whole pixels (:func:`box_to_pixels`).

    ``region`` records ``box`` itself, not the rounded pixels: a grid crop keeps the exact grid box
    the label store was filled with (its pixels are the same whole-pixel cut the teacher saw)."""
    h, w = image.shape[-2:]
    out, target = _crop_pixels(image, target, *box_to_pixels(box, w, h))
    _crop_region(target, *(float(v) for v in box))
    return out, target


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    flipped = TF.hflip(image)
    w = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
    if "region" in target:
        target["flipped"] = not target.get("flipped", False)
    return flipped, target


def size_with_aspect_ratio(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) with the short side ``size`` and the long side at most ``max_size`` (DETR)."""
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return max(int(size * h / w), 1), size
    return size, max(int(size * w / h), 1)


def resize(image: torch.Tensor, target: Target, size: int | tuple[int, int],
           max_size: int | None = None) -> tuple[torch.Tensor, Target]:
    """Resize to short side ``size`` (long side <= ``max_size``) or to exactly ``size`` = (h, w)."""
    h, w = image.shape[-2:]
    if isinstance(size, (tuple, list)):
        oh, ow = int(size[0]), int(size[1])
    else:
        oh, ow = size_with_aspect_ratio(h, w, int(size), max_size)
    out = image if (oh, ow) == (h, w) else TF.resize(image, [oh, ow], antialias=True)
    target = dict(target)
    rw, rh = ow / w, oh / h
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    if "area" in target:
        target["area"] = target["area"] * (rw * rh)
    _set_size(target, oh, ow)
    return out, target


# ---------------------------------------------------------------------------------- random transforms
class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(t) for t in self.transforms)})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Short side drawn from ``sizes``, long side at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """DETR's random size crop: width and height uniform in [min_size, min(side, max_size)] pixels."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        cw = random.randint(min(self.min_size, w), min(w, self.max_size))
        ch = random.randint(min(self.min_size, h), min(h, self.max_size))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        return crop(image, target, (top, left, ch, cw))

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomRelativeCrop:
    """Width and height drawn independently as fractions ``scale`` of the image's; random position."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = tuple(scale)

    def __call__(self, image, target):
        h, w = image.shape[-2:]
        cw = max(1, int(round(random.uniform(*self.scale) * w)))
        ch = max(1, int(round(random.uniform(*self.scale) * h)))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        return crop(image, target, (top, left, ch, cw))

    def __repr__(self) -> str:
        return f"RandomRelativeCrop({self.scale})"


class RandomGridCrop:
    """Crop one of the grid boxes (normalised xyxy, original-image coordinates), chosen uniformly.

    Must come before any other geometric transform: the box is cut from the original image, so the
    tracked ``region`` is exactly that grid box (``exact`` crop matching)."""

    def __init__(self, boxes) -> None:
        self.boxes = [tuple(float(v) for v in b) for b in boxes]

    def __call__(self, image, target):
        if target.get("region", (0.0, 0.0, 1.0, 1.0)) != (0.0, 0.0, 1.0, 1.0) or target.get("flipped", False):
            raise ValueError("RandomGridCrop must be applied to the untransformed original image")
        return crop_box(image, target, random.choice(self.boxes))

    def __repr__(self) -> str:
        return f"RandomGridCrop({len(self.boxes)} boxes)"


class RandomSelect:
    """``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Callable, second: Callable, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class Identity:
    def __call__(self, image, target):
        return image, target

    def __repr__(self) -> str:
        return "Identity()"


# ---------------------------------------------------------------------------------- to model input
def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def normalize(image: torch.Tensor, target: Target, mean: Sequence[float], std: Sequence[float]
              ) -> tuple[torch.Tensor, Target]:
    """uint8 (or [0, 1] float) image -> float32 standardised; boxes -> cxcywh normalised by (w, h)."""
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    image = TF.normalize(image, mean=list(mean), std=list(std))
    target = dict(target)
    h, w = image.shape[-2:]
    if "boxes" in target:
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
    return image, target


def make_detection_transforms(aug) -> Compose:
    """DETR/DINO training augmentation from a :class:`DetectionAugConfig`."""
    return Compose([
        RandomHorizontalFlip(aug.hflip_prob),
        RandomSelect(
            Compose([
                RandomResize(aug.crop_resize_scales),
                RandomSizeCrop(aug.crop_min_size, aug.crop_max_size),
                RandomResize(aug.scales, max_size=aug.max_size),
            ]),
            RandomResize(aug.scales, max_size=aug.max_size),
            p=aug.crop_prob,
        ),
    ])


def make_tile_transforms(aug, grid_boxes=None) -> Compose:
    """Classification tile augmentation from a :class:`ClassificationAugConfig`: crop (a grid box in
    ``exact`` mode, a random relative crop otherwise) with probability ``crop_prob``, then flip.
    Resizing is left to the mosaic (or to the caller)."""
    if aug.crop_match == "exact":
        if grid_boxes is None:
            raise ValueError("exact crop matching needs the grid boxes")
        cropper = RandomGridCrop(grid_boxes)
    else:
        cropper = RandomRelativeCrop(aug.crop_scale)
    return Compose([RandomSelect(cropper, Identity(), p=aug.crop_prob), RandomHorizontalFlip(aug.hflip_prob)])
