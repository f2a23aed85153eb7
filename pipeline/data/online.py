"""Online soft labels (``--soft-labels online``): the teacher scores each batch as it comes, the way
RichSem trains — kept to compare against the cached labels.

Everything runs on the teacher's device: the batch's normalised images are moved there once and turned
back into pixel values (0..255, whole levels); classification tiles (each box = its visible pixels on
the mosaic canvas) are cut and resized as precompute cuts grid crops (:func:`..teacher.preprocess.cut_and_resize`,
the teacher's own preprocessing; on a GPU in float, within one grey level of precompute's uint8
kernels, on the CPU those very kernels) and scored by the ``crops`` path in one engine call. Detection batches: the ground-truth boxes are
scored by the ``pooled`` path (RoIAlign on the whole image + attention pool, DESIGN §4: detection boxes
always use pooled) when the teacher supports it — all images of the batch in one call — else by cutting
crops. With ``profile=True`` the time of each phase (preprocess, forward, probs = logits + softmax + copy
to the CPU) is kept in ``timings`` (the device is synchronised between phases, so only for benches).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..teacher.model import Teacher
from ..teacher.preprocess import as_preprocess, cut_and_resize
from .config import IMAGENET_MEAN, IMAGENET_STD

PHASES = ("preprocess", "forward", "probs")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def teacher_preprocess(teacher: Teacher, pooled: bool = False):
    """The teacher's crop preprocessing (``pooled``: the whole-image resize of the pooled path, always
    squashed so every box stays in view); a teacher without one gets bilinear squash of its input size."""
    pre = getattr(teacher, "preprocess", None) or as_preprocess(teacher.input_size)
    return pre.with_size(teacher.pooled_size, "squash") if pooled else pre


class OnlineSoftLabeler:
    """``labeler(batch)`` fills every target's ``soft_labels`` (n, C) float32 (CPU) and ``soft_mask`` (n,)
    (all True) from ``teacher``; the batch is a collated batch of either source (its images (B, 3, H, W)
    normalised with ``pixel_mean``/``pixel_std``, padded; ``targets[i]["size"]`` the unpadded (h, w)).
    Returns the same batch dict."""

    def __init__(self, teacher: Teacher, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD, profile: bool = False) -> None:
        self.teacher = teacher
        # A scorer without a device (bench fidelity's stand-ins use only image_uint8) works on the CPU.
        self.device = torch.device(getattr(teacher, "device", "cpu"))
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.profile = profile
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.calls = 0

    @contextlib.contextmanager
    def _phase(self, name: str):
        if not self.profile:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.timings[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) images -> pixel values 0..255 (whole levels) on the teacher's device:
        uint8 on the CPU (the very kernels precompute's workers run: bit-identical crops), float on a GPU
        (whose antialiased resize kernels are float-only; within one level of the uint8 ones)."""
        x = images.to(self.device, torch.float32, non_blocking=True)
        x = ((x * self.std + self.mean) * 255.0).round_().clamp_(0, 255)
        return x.to(torch.uint8) if x.device.type == "cpu" else x

    def image_uint8(self, image: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """One normalised (3, H, W) padded image -> its unpadded (3, h, w) uint8 pixels, on the CPU."""
        h, w = (int(v) for v in size)
        return self.pixels(image[None, :, :h, :w])[0].to(torch.uint8).cpu()

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        t = self.teacher
        targets = batch["targets"]
        boxes = [cxcywh_to_xyxy(tg["boxes"].float()).clamp(0, 1).numpy() for tg in targets]
        counts = [len(b) for b in boxes]
        self.calls += 1
        if sum(counts) == 0:
            return batch
        pooled = batch["source"] == "detection" and t.supports_pooled
        with self._phase("preprocess"):
            pixels = self.pixels(batch["images"])
            sizes = [tuple(int(v) for v in tg["size"]) for tg in targets]
            if pooled:
                pre = teacher_preprocess(t, pooled=True)
                keep = [i for i, n in enumerate(counts) if n]
                whole = torch.cat([cut_and_resize(pixels[i, :, :sizes[i][0], :sizes[i][1]],
                                                  np.array([[0.0, 0.0, 1.0, 1.0]]), pre) for i in keep])
                padded = np.zeros((len(keep), max(counts), 4), dtype=np.float32)  # pad rows: dropped below
                for row, i in enumerate(keep):
                    padded[row, :counts[i]] = boxes[i]
            else:
                pre = teacher_preprocess(t)
                crops = torch.cat([cut_and_resize(pixels[i, :, :h, :w], b, pre)
                                   for i, (b, (h, w)) in enumerate(zip(boxes, sizes)) if len(b)])
        with self._phase("forward"):
            feats = t.pooled_features(whole, torch.from_numpy(padded)) if pooled else t.crop_features(crops)
        with self._phase("probs"):
            probs = t.probs_from_features(feats).float().cpu()
        if pooled:
            per_image = {i: probs[row, :counts[i]] for row, i in enumerate(keep)}
        else:
            split = torch.split(probs, [n for n in counts if n])
            per_image = dict(zip([i for i, n in enumerate(counts) if n], split))
        for i, target in enumerate(targets):
            if counts[i]:
                target["soft_labels"] = per_image[i]
                target["soft_mask"] = torch.ones(counts[i], dtype=torch.bool)
        return batch

    def mean_timings_ms(self) -> dict[str, float]:
        """Mean milliseconds per call of each phase (``profile=True``)."""
        return {k: v * 1e3 / max(self.calls, 1) for k, v in self.timings.items()}

    def reset_timings(self) -> None:
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.calls = 0
