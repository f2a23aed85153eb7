"""Stage-2 data: LVIS/COCO detection images and WebDataset classification mosaics, with soft labels
from the label store (or from an online teacher), batched 1:1 by source.

Main entry points::

    reader = open_label_store(cfg, vocabulary)            # checked against the run's grid/vocabulary
    loader = build_train_loader(cfg, reader)              # detection, classification, detection, ...
    for epoch in ...: loader.set_epoch(epoch); for batch in loader: ...
"""

from .classification import ClassificationDataset, StoreRows, assign_shards
from .collate import Collate, pad_images
from .config import ClassificationAugConfig, DataConfig, DetectionAugConfig, data_config
from .detection import DetectionDataset, ImageRecord, load_detection_annotations
from .labels import CropSoftLabels, ObjectSoftLabels, check_label_store
from .loader import (
    AlternatingLoader,
    build_classification_dataset,
    build_classification_loader,
    build_detection_dataset,
    build_detection_loader,
    build_train_loader,
    move_batch,
    open_label_store,
)
from .mosaic import RandomMosaic, mosaic_tiles
from .sampler import RepeatFactorSampler, category_repeat_factors, repeat_factors

__all__ = [
    "AlternatingLoader", "ClassificationAugConfig", "ClassificationDataset", "Collate", "CropSoftLabels",
    "DataConfig", "DetectionAugConfig", "DetectionDataset", "ImageRecord", "ObjectSoftLabels", "RandomMosaic",
    "RepeatFactorSampler", "StoreRows", "assign_shards", "build_classification_dataset",
    "build_classification_loader", "build_detection_dataset", "build_detection_loader", "build_train_loader",
    "category_repeat_factors", "check_label_store", "data_config",
    "load_detection_annotations", "move_batch", "mosaic_tiles", "open_label_store", "pad_images", "repeat_factors",
]
