"""Typed configuration of the stage-2 data pipeline and its presets.

Defaults are the DETR/DINO detection recipe (multi-scale resize of the short side 480-800 in steps
of 32, longest side <= 1333, random size crop half the time) and RichSem's classification recipe
(4-image mosaic on a 2 x 640 canvas, centre drawn in 0.5-1.5 x 640). Presets are overrides::

    cfg = data_config("tiny", {"batch_size": 1})
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...config import from_preset
from ..grid import MATCH_MODES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scales(lo: int, hi: int, step: int) -> list[int]:
    return list(range(lo, hi + 1, step))


@dataclasses.dataclass
class DetectionAugConfig:
    """DETR augmentation: flip, then either a multi-scale resize, or resize -> random size crop ->
    multi-scale resize (each with probability 1 - crop_prob / crop_prob)."""

    hflip_prob: float = 0.5
    scales: list[int] = dataclasses.field(default_factory=lambda: _scales(480, 800, 32))  # short side
    max_size: int = 1333  # longest side after resizing
    crop_prob: float = 0.5
    crop_resize_scales: list[int] = dataclasses.field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384  # random size crop: side in [min, min(image side, max)] pixels
    crop_max_size: int = 600

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) < 1 or self.max_size < max(self.scales):
            raise ValueError("det_aug.scales must be non-empty positive sizes <= det_aug.max_size")
        if not self.crop_resize_scales or min(self.crop_resize_scales) < 1:
            raise ValueError("det_aug.crop_resize_scales must be non-empty positive sizes")
        if not 1 <= self.crop_min_size <= self.crop_max_size:
            raise ValueError("det_aug: need 1 <= crop_min_size <= crop_max_size")
        for name in ("hflip_prob", "crop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"det_aug.{name} must be in [0, 1]")


@dataclasses.dataclass
class ClassificationAugConfig:
    """Per-tile crop (+ flip), then a 4-image mosaic (RichSem). The crop depends on ``crop_match``:
    ``exact`` cuts a random grid box, ``nearest``/``interp`` a random box whose sides are fractions
    ``crop_scale`` of the image's sides. Soft labels come from matching the tile's visible region
    (original-image coordinates) to the store's grid; below ``iou_threshold`` the soft loss is masked."""

    # exact: lowest KL(online teacher || cached label) of the three with a real teacher on real photos, on
    # every grid measured (README "Real-teacher figures": 0.37 nats vs interp 0.51, nearest 0.62 on default).
    crop_match: str = "exact"
    iou_threshold: float = 0.5
    interp_top_n: int = 4
    hflip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.5, 1.0)
    mosaic_prob: float = 1.0
    tile_size: int = 640  # each tile fits a tile_size square; the canvas is 2 * tile_size square
    center_ratio_range: tuple[float, float] = (0.5, 1.5)  # mosaic centre = ratio * tile_size
    pad_value: int = 114
    # Without a mosaic (mosaic_prob < 1) an image is resized like a detection image:
    scales: list[int] = dataclasses.field(default_factory=lambda: _scales(480, 800, 32))
    max_size: int = 1333

    def __post_init__(self) -> None:
        if self.crop_match not in MATCH_MODES:
            raise ValueError(f"cls_aug.crop_match must be one of {list(MATCH_MODES)}, got {self.crop_match!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("cls_aug.crop_scale must satisfy 0 < min <= max <= 1")
        clo, chi = self.center_ratio_range
        if not 0.0 <= clo <= chi <= 2.0:
            raise ValueError("cls_aug.center_ratio_range must satisfy 0 <= min <= max <= 2")
        if self.tile_size < 8:
            raise ValueError("cls_aug.tile_size must be >= 8")
        if self.interp_top_n < 1:
            raise ValueError("cls_aug.interp_top_n must be >= 1")
        for name in ("hflip_prob", "crop_prob", "mosaic_prob", "iou_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"cls_aug.{name} must be in [0, 1]")


@dataclasses.dataclass
class DataConfig:
    """Where the data lives and how batches are made.

    ``det_annotations``/``det_images``: LVIS- or COCO-format JSON and its image folder.
    ``cls_shards``: WebDataset shard pattern (brace notation) of the classification images, in the
    same order as the label store's source shards. ``soft_labels``: ``cached`` reads the label store,
    ``online`` lets the teacher score the actual tiles and boxes during training (RichSem)."""

    det_annotations: str = ""
    det_images: str = ""
    cls_shards: str = ""
    label_store: str = ""
    soft_labels: Literal["cached", "online"] = "cached"
    # Cached mode: which encoding of the store to read ("auto": embeddings when the store has them), and the
    # temperature embeddings are decoded at (0: the store teacher's; a top-k store's temperature is fixed).
    soft_encoding: Literal["auto", "topk", "embedding"] = "auto"
    soft_temperature: float = 0.0
    grid: str = "default"  # crop grid the store must have been filled with (exact crops are cut from it)
    # Classification images whose hard label is -1 (their class has no vocabulary class, pseudo label
    # below threshold, or not in the store): "skip" drops them before the mosaic, counted as skipped
    # "unlabelled" (RichSem trains on ImageNet-LVIS, the mapped images only); "keep" trains on them with
    # box and soft-label losses only (pre-issue-10). Online pseudo labels (hard_labels.source = "none")
    # are made after the mosaic, so there every image is kept.
    cls_unlabelled: Literal["skip", "keep"] = "skip"
    batch_size: int = 2  # images per batch, per process; detection and classification alike
    num_workers: int = 2  # DataLoader workers per process, per source
    rfs_threshold: float = 0.001  # repeat-factor sampling (LVIS); 0 disables it
    shuffle_buffer: int = 1000  # classification samples shuffled in a buffer (WebDataset)
    seed: int = 0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    det_aug: DetectionAugConfig = dataclasses.field(default_factory=DetectionAugConfig)
    cls_aug: ClassificationAugConfig = dataclasses.field(default_factory=ClassificationAugConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("batch_size must be >= 1, num_workers and shuffle_buffer >= 0")
        if self.soft_temperature < 0:
            raise ValueError(f"soft_temperature must be >= 0 (0: the store's), got {self.soft_temperature}")
        if not 0.0 <= self.rfs_threshold < 1.0:
            raise ValueError("rfs_threshold must be in [0, 1)")


# name -> overrides on DataConfig() defaults
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {  # ~256 px images: trains on 2 CPU cores in the test suite
        "batch_size": 2,
        "num_workers": 0,
        "shuffle_buffer": 16,
        "det_aug": {"scales": _scales(192, 256, 32), "max_size": 320, "crop_resize_scales": [160, 200, 240],
                    "crop_min_size": 128, "crop_max_size": 240},
        "cls_aug": {"tile_size": 128, "scales": _scales(192, 256, 32), "max_size": 320},
    },
}


def data_config(preset: str = "default", overrides: dict[str, Any] | None = None) -> DataConfig:
    """The named preset with optional nested ``overrides`` applied, validated into a DataConfig."""
    return from_preset(DataConfig, PRESETS, preset, overrides, "data")
