"""Batching: pad images to a common size with a padding mask (DETR's NestedTensor, as plain tensors)."""

from __future__ import annotations

import collections
from typing import Any

import torch

SOURCES = ("detection", "classification")


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H_i, W_i) images -> images (B, C, H, W) zero-padded at the bottom/right and pixel_mask
    (B, H, W) bool, True on padding."""
    if not images:
        raise ValueError("cannot batch zero images")
    c = images[0].shape[0]
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask


class Collate:
    """``collate(samples)`` -> {"images", "pixel_mask", "targets", "source", "skipped"} for one source.

    ``skipped`` sums the samples' ``skipped`` counts (reason -> count) so the loop can report them."""

    def __init__(self, source: str) -> None:
        if source not in SOURCES:
            raise ValueError(f"batch source must be one of {SOURCES}, got {source!r}")
        self.source = source

    def __call__(self, samples: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
        images, targets = zip(*samples)
        batch_images, mask = pad_images(list(images))
        skipped: collections.Counter = collections.Counter()
        out_targets = []
        for t in targets:
            t = dict(t)
            skipped.update(t.pop("skipped", {}))
            out_targets.append(t)
        return {"images": batch_images, "pixel_mask": mask, "targets": out_targets, "source": self.source,
                "skipped": dict(skipped)}
