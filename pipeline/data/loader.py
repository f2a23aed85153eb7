"""Builders for the stage-2 datasets and the 1:1 alternating detection / classification loader."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

from ...errors import LtDistillError
from ...store import LabelReader
from ..grid import GridSpec
from ..shards import expand_shards
from . import transforms as T
from .classification import ClassificationDataset, HardLabelFn, StoreRows
from .collate import Collate
from .config import DataConfig
from .detection import DetectionDataset, load_detection_annotations
from .embedding import CropEmbeddings
from .labels import CropSoftLabels, ObjectSoftLabels, check_label_store
from .mosaic import RandomMosaic
from .sampler import RepeatFactorSampler, dist_info, repeat_factors


def open_label_store(cfg: DataConfig, vocabulary: Sequence[str] | None = None) -> LabelReader | None:
    """The run's label store (None when ``cfg.label_store`` is empty and labels come online), checked
    against the run's grid and, when given, its class vocabulary (refused by name on a mismatch)."""
    if not cfg.label_store:
        if cfg.soft_labels == "cached":
            raise LtDistillError("soft_labels = cached needs a label store (data.label_store)")
        return None
    reader = LabelReader(cfg.label_store)
    check_label_store(reader, vocabulary=vocabulary, grid=cfg.grid)
    return reader


def build_detection_dataset(cfg: DataConfig, reader: LabelReader | None = None,
                            train: bool = True) -> DetectionDataset:
    """LVIS/COCO detection dataset with DETR augmentation (``train``) or a plain resize to the
    largest scale (evaluation); object soft labels from ``reader`` in cached mode."""
    if not cfg.det_annotations or not cfg.det_images:
        raise LtDistillError("the detection dataset needs data.det_annotations and data.det_images")
    records, categories, skipped = load_detection_annotations(cfg.det_annotations)
    transforms = T.make_detection_transforms(cfg.det_aug) if train else \
        T.RandomResize([max(cfg.det_aug.scales)], max_size=cfg.det_aug.max_size)
    objects = ObjectSoftLabels(reader) if reader is not None and cfg.soft_labels == "cached" else None
    return DetectionDataset(records, cfg.det_images, categories, transforms=transforms, objects=objects,
                            pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std, skipped=skipped)


def build_classification_dataset(cfg: DataConfig, reader: LabelReader | None = None, *,
                                 num_classes: int | None = None,
                                 hard_labeler: HardLabelFn | None = None,
                                 repeat: bool = True, num_replicas: int | None = None,
                                 rank: int | None = None, class_map=None) -> ClassificationDataset:
    """Mosaics of WebDataset classification images. With ``reader`` the store gives hard labels and,
    in cached mode, soft labels matched to each tile (``cfg.cls_aug.crop_match``); without it (online
    mode) ``hard_labeler(fields)`` (:class:`..vocab.HardLabeler`) gives hard labels and ``num_classes``
    the label width. ``class_map`` (store class -> run class, an embedding store read with another
    vocabulary; ``num_classes`` is then the run's) makes tiles carry stored embeddings, decoded on the
    training device (:mod:`.embedding`), and translates the store's hard labels."""
    if not cfg.cls_shards:
        raise LtDistillError("the classification dataset needs data.cls_shards")
    aug = cfg.cls_aug
    if reader is not None:
        grid_boxes = reader.attrs["grid"]["boxes"]
        if class_map is None:
            num_classes = reader.layout.num_classes
    else:
        grid_boxes = GridSpec.parse(cfg.grid).boxes()
        if num_classes is None:
            raise LtDistillError("without a label store the classification dataset needs num_classes")
    labels = None
    if cfg.soft_labels == "cached":
        if reader is None:
            raise LtDistillError("soft_labels = cached needs a label store (data.label_store)")
        labels = CropSoftLabels(reader, aug.crop_match, aug.iou_threshold, aug.interp_top_n) if class_map is None \
            else CropEmbeddings(reader, num_classes, aug.crop_match, aug.iou_threshold, aug.interp_top_n)
    fit = "quadrant" if aug.crop_match == "exact" else "tile"
    mosaic = RandomMosaic(aug.tile_size, aug.center_ratio_range, aug.pad_value, fit) if aug.mosaic_prob > 0 else None
    return ClassificationDataset(
        expand_shards(cfg.cls_shards), num_classes=num_classes,
        tile_transforms=T.make_tile_transforms(aug, grid_boxes), mosaic=mosaic, mosaic_prob=aug.mosaic_prob,
        single_transforms=T.RandomResize(aug.scales, max_size=aug.max_size), labels=labels,
        rows=StoreRows(reader, class_map) if reader is not None else None, hard_labeler=hard_labeler,
        pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std, shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed, repeat=repeat, rank=rank, world_size=num_replicas,
        skip_unlabelled=cfg.cls_unlabelled == "skip" and not _pseudo_labels_later(hard_labeler))


def _pseudo_labels_later(hard_labeler: Any) -> bool:
    """Online pseudo labels: every sample decodes with label -1 and gets its label after the mosaic."""
    source = getattr(hard_labeler, "source", None)
    return source is not None and source.kind == "none"


def build_detection_loader(cfg: DataConfig, dataset: DetectionDataset, num_replicas: int | None = None,
                           rank: int | None = None) -> DataLoader:
    """Repeat-factor sampled (``cfg.rfs_threshold``), split across processes, batches of
    ``cfg.batch_size`` (last partial batch dropped). Call ``loader.batch_sampler.sampler.set_epoch``."""
    factors = repeat_factors(dataset.image_categories(), cfg.rfs_threshold)
    sampler = RepeatFactorSampler(factors, num_replicas=num_replicas, rank=rank, seed=cfg.seed)
    batches = BatchSampler(sampler, cfg.batch_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=Collate("detection"),
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)


def build_classification_loader(cfg: DataConfig, dataset: ClassificationDataset) -> DataLoader:
    """Batches of ``cfg.batch_size`` mosaics; the dataset splits shards by node and worker itself."""
    return DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=Collate("classification"),
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)


class AlternatingLoader:
    """1:1 same-source batches: detection, classification, detection, ... One epoch is one pass of
    the detection sampler (``2 * len(detection)`` batches); the classification stream runs on across
    epochs. Each batch is a dict with ``images`` (B, 3, H, W), ``pixel_mask`` (B, H, W), ``targets``,
    ``source`` ("detection" | "classification") and ``skipped`` (reason -> count)."""

    def __init__(self, detection: DataLoader, classification: DataLoader | None) -> None:
        self.detection = detection
        self.classification = classification
        self._cls_iter: Iterator | None = None

    def set_epoch(self, epoch: int) -> None:
        self.detection.batch_sampler.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.detection) * (2 if self.classification is not None else 1)

    def _next_classification(self) -> dict[str, Any]:
        if self._cls_iter is None:
            self._cls_iter = iter(self.classification)
        try:
            return next(self._cls_iter)
        except StopIteration:  # a finite classification dataset: start it again
            self._cls_iter = iter(self.classification)
            return next(self._cls_iter)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.detection:
            yield batch
            if self.classification is not None:
                yield self._next_classification()


def build_train_loader(cfg: DataConfig, reader: LabelReader | None = None, *,
                       hard_labeler: HardLabelFn | None = None,
                       num_replicas: int | None = None, rank: int | None = None) -> AlternatingLoader:
    """Detection and (when ``cfg.cls_shards`` is set) classification batches, alternating 1:1.
    ``reader`` comes from :func:`open_label_store` (None in online mode without a store)."""
    num_replicas, rank = dist_info(num_replicas, rank)
    det = build_detection_dataset(cfg, reader)
    det_loader = build_detection_loader(cfg, det, num_replicas, rank)
    cls_loader = None
    if cfg.cls_shards:
        cls = build_classification_dataset(cfg, reader, num_classes=det.num_classes, hard_labeler=hard_labeler,
                                           num_replicas=num_replicas, rank=rank)
        if cls.num_classes != det.num_classes:
            raise LtDistillError(f"classification labels have {cls.num_classes} classes, detection {det.num_classes}")
        cls_loader = build_classification_loader(cfg, cls)
    return AlternatingLoader(det_loader, cls_loader)


def move_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Batch with its tensors on ``device`` (targets' tensors too)."""
    def move(v):
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    out = {k: move(v) for k, v in batch.items() if k != "targets"}
    out["targets"] = [{k: move(v) for k, v in t.items()} for t in batch["targets"]]
    return out
