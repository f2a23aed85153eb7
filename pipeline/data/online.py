"""Online soft labels (``--soft-labels online``): the CLIP teacher scores each batch as it comes, the
way RichSem trains — kept to compare against the cached labels.

Classification batches: every tile's box (its visible pixels on the mosaic canvas) is cut and resized
exactly as precompute cuts grid crops (:func:`..teacher.preprocess.crop_and_resize`) and scored by the
``crops`` path. Detection batches: the ground-truth boxes are scored by the ``pooled`` path (RoIAlign
on the whole image + attention pool, DESIGN §4: detection boxes always use pooled) when the teacher
supports it, else by cutting crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..teacher.model import Teacher
from ..teacher.preprocess import crop_and_resize
from .config import IMAGENET_MEAN, IMAGENET_STD


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class OnlineSoftLabeler:
    """``labeler(batch)`` fills every target's ``soft_labels`` (n, C) float32 and ``soft_mask`` (n,)
    (all True) from ``teacher``; the batch is a collated CPU batch of either source (its images
    normalised with ``pixel_mean``/``pixel_std``). Returns the same batch dict."""

    def __init__(self, teacher: Teacher, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD) -> None:
        self.teacher = teacher
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)

    def image_uint8(self, image: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Normalised (3, H, W) padded float image -> the unpadded (3, h, w) uint8 pixels."""
        h, w = (int(v) for v in size)
        pixels = image[:, :h, :w].detach().float().cpu() * self.std + self.mean
        return (pixels * 255.0).round_().clamp_(0, 255).to(torch.uint8)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [self.image_uint8(im, t["size"]) for im, t in zip(batch["images"], batch["targets"])]
        boxes = [cxcywh_to_xyxy(t["boxes"].float()).clamp(0, 1).numpy() for t in batch["targets"]]
        pooled = batch["source"] == "detection" and self.teacher.supports_pooled
        probs: list[torch.Tensor] = []
        if pooled:
            for image, b in zip(images, boxes):
                probs.append(self.teacher.score_pooled(image, b).float().cpu() if len(b) else None)
        else:
            crops = [crop_and_resize(image, b, self.teacher.input_size) for image, b in zip(images, boxes)]
            flat = torch.cat(crops) if crops else torch.empty(0)
            scored = self.teacher.score_crop_batch(flat).float().cpu() if len(flat) else flat
            probs = list(torch.split(scored, [len(b) for b in boxes])) if len(flat) else [None] * len(boxes)
        for target, p, b in zip(batch["targets"], probs, boxes):
            n = len(b)
            if n == 0:
                continue
            target["soft_labels"] = p.to(torch.float32)
            target["soft_mask"] = torch.ones(n, dtype=torch.bool)
        return batch
