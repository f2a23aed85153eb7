"""LVIS / COCO detection dataset with object-level soft labels from the label store.

The annotation file is LVIS- or COCO-format JSON (``images``, ``annotations``, ``categories``);
class index = rank of the category id among the sorted category ids (LVIS v1: id - 1). Broken
entries never stop a run: annotations without a usable box, category or image are dropped when the
file is read, and images that are missing, undecodable or not the size the JSON says are replaced
by the next image when loaded; both are counted by reason (``dataset.skipped``, and the per-sample
``skipped`` entry that the collate function sums per batch: each unreadable image is counted once by
the process that finds it, and not tried again there).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...errors import LtDistillError
from . import transforms as T
from .embedding import ObjectEmbeddings
from .labels import ObjectSoftLabels

log = logging.getLogger("lt_distill.data")

# Give up (a clear error, not a silent loop) after this many unreadable images in a row.
MAX_CONSECUTIVE_FAILURES = 50


@dataclasses.dataclass
class ImageRecord:
    """One image of the annotation file: boxes (n, 4) float32 xyxy pixels, labels (n,) int64 class
    indices, ann_ids (n,) int64 annotation ids, area (n,) float32."""

    image_id: int
    paths: tuple[str, ...]  # candidate file paths relative to the image folder, tried in order
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ann_ids: np.ndarray
    area: np.ndarray


def _candidate_paths(img: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(img.get("file_name"), str) and img["file_name"]:
        return (img["file_name"],)
    url = img.get("coco_url") or img.get("flickr_url")
    if isinstance(url, str) and "/" in url:
        split, name = url.rstrip("/").split("/")[-2:]
        return (f"{split}/{name}", name)  # LVIS v1: <root>/train2017/<name>, or <root>/<name>
    return ()


def load_detection_annotations(path: str | Path, require_boxes: bool = True
                               ) -> tuple[list[ImageRecord], list[dict[str, Any]], dict[str, int]]:
    """Read LVIS/COCO JSON -> (records sorted by image id, categories sorted by id, skipped counts).

    Every skipped annotation or image is counted by reason, and the counts are logged as a warning (a
    file whose boxes are silently dropped would train with every detection loss 0). ``require_boxes``:
    refuse a file in which no annotation is usable."""
    path = Path(path)
    if not path.is_file():
        raise LtDistillError(f"detection annotations not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LtDistillError(f"cannot parse detection annotations {path}: {exc}") from exc
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise LtDistillError(f"{path} is not LVIS/COCO-format JSON: no list {', '.join(missing)}")
    categories = sorted((c for c in data["categories"] if isinstance(c.get("id"), int)), key=lambda c: c["id"])
    if not categories:
        raise LtDistillError(f"{path} lists no categories")
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    skipped: collections.Counter = collections.Counter()

    images: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        paths = _candidate_paths(img)
        h, w = img.get("height"), img.get("width")
        if not isinstance(img.get("id"), int) or not paths or not isinstance(h, int) or not isinstance(w, int) \
                or h < 1 or w < 1:
            skipped["bad_image_entry"] += 1
            continue
        images[img["id"]] = {"paths": paths, "h": h, "w": w, "anns": []}

    usable = 0
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            skipped["bad_annotation"] += 1
            continue
        image_id, box = ann.get("image_id"), ann.get("bbox")
        img = images.get(image_id) if isinstance(image_id, int) else None
        if not isinstance(ann.get("id"), int):
            skipped["bad_annotation"] += 1
        elif img is None:
            skipped["unknown_image"] += 1
        elif "category_id" not in ann:
            skipped["missing_category_id"] += 1
        elif not isinstance(ann["category_id"], int) or ann["category_id"] not in cat_index:
            skipped["unknown_category"] += 1
        elif ann.get("iscrowd", 0):
            skipped["crowd"] += 1
        elif box is None:
            skipped["missing_bbox"] += 1
        elif not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            skipped["bad_bbox"] += 1
        else:
            x0, y0 = min(max(box[0], 0.0), img["w"]), min(max(box[1], 0.0), img["h"])
            x1, y1 = min(max(box[0] + box[2], 0.0), img["w"]), min(max(box[1] + box[3], 0.0), img["h"])
            if x1 <= x0 or y1 <= y0:
                skipped["empty_box"] += 1
                continue
            area = ann.get("area")
            area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else (x1 - x0) * (y1 - y0)
            img["anns"].append((x0, y0, x1, y1, cat_index[ann["category_id"]], ann["id"], area))
            usable += 1
    if skipped:
        log.warning("%s: skipped %s", path, ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if require_boxes and not usable:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "the file has none"
        raise LtDistillError(f"{path}: no usable box among {len(data['annotations'])} annotations ({detail}); "
                             "each needs an integer id, a known image_id and category_id, and bbox [x, y, w, h]")

    records = []
    for image_id in sorted(images):
        img = images[image_id]
        anns = np.asarray(img["anns"], dtype=np.float64).reshape(-1, 7)
        records.append(ImageRecord(
            image_id=image_id, paths=img["paths"], height=img["h"], width=img["w"],
            boxes=anns[:, :4].astype(np.float32), labels=anns[:, 4].astype(np.int64),
            ann_ids=anns[:, 5].astype(np.int64), area=anns[:, 6].astype(np.float32)))
    return records, categories, dict(skipped)


def read_image(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB; raises OSError / ValueError / SyntaxError for a broken file (PIL's errors)."""
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class DetectionDataset(Dataset):
    """``dataset[i]`` -> (image float32 (3, H, W) normalised, target) with target keys ``boxes``
    (n, 4) cxcywh normalised, ``labels`` (n,) int64, ``ann_ids`` (n,) int64, ``soft_labels`` (n, C)
    float32, ``soft_mask`` (n,) bool, ``orig_size``/``size`` (2,) int64 (h, w), ``image_id`` int and
    ``skipped`` (reason -> count of images replaced on the way)."""

    def __init__(self, records: list[ImageRecord], image_root: str | Path, categories: list[dict[str, Any]],
                 transforms=None, objects: ObjectSoftLabels | ObjectEmbeddings | None = None,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225),
                 skipped: dict[str, int] | None = None) -> None:
        if not records:
            raise LtDistillError("the detection dataset has no images")
        self.records = records
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise LtDistillError(f"detection image folder not found: {self.image_root}")
        self.categories = categories
        self.num_classes = len(categories)
        if objects is not None and objects.num_classes != self.num_classes:
            raise LtDistillError(f"the label store has {objects.num_classes} classes but the detection "
                                 f"annotations list {self.num_classes} categories")
        self.transforms = transforms
        self.objects = objects
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.skipped = dict(skipped or {})  # annotation-level problems found while reading the file
        self._bad: set[int] = set()  # indices of unreadable images, per process (each counted once)

    def __len__(self) -> int:
        return len(self.records)

    def image_categories(self) -> list[np.ndarray]:
        """Class indices present in each image (for repeat-factor sampling)."""
        return [np.unique(r.labels) for r in self.records]

    def _load(self, record: ImageRecord) -> tuple[torch.Tensor | None, str]:
        for rel in record.paths:
            path = self.image_root / rel
            if path.is_file():
                break
        else:
            return None, "missing_image"
        try:
            image = read_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, "undecodable_image"
        if tuple(image.shape[-2:]) != (record.height, record.width):
            return None, "size_mismatch"
        return image, ""

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        skipped: collections.Counter = collections.Counter()
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            i = (idx + attempt) % len(self.records)
            if i in self._bad:  # known bad in this process: counted when first found
                continue
            record = self.records[i]
            image, reason = self._load(record)
            if image is not None:
                break
            self._bad.add(i)
            skipped[reason] += 1
        else:
            raise LtDistillError(f"{MAX_CONSECUTIVE_FAILURES} images in a row could not be read under "
                                 f"{self.image_root} ({dict(skipped)}); check the image folder")
        target = {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "ann_ids": torch.from_numpy(record.ann_ids.copy()),
            "area": torch.from_numpy(record.area.copy()),
            "orig_size": torch.tensor([record.height, record.width], dtype=torch.int64),
            "size": torch.tensor([record.height, record.width], dtype=torch.int64),
            "image_id": record.image_id,
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image, target = T.normalize(image, target, self.pixel_mean, self.pixel_std)
        if isinstance(self.objects, ObjectEmbeddings):  # decoded on the training device
            target.update(self.objects.fields(target["ann_ids"].numpy()))
        elif self.objects is not None:
            soft, mask = self.objects(target["ann_ids"].numpy())
            target["soft_labels"], target["soft_mask"] = torch.from_numpy(soft), torch.from_numpy(mask)
        else:
            n = len(target["labels"])
            target["soft_labels"] = torch.zeros((n, self.num_classes), dtype=torch.float32)
            target["soft_mask"] = torch.zeros(n, dtype=torch.bool)
        target.pop("area", None)
        target["skipped"] = dict(skipped)
        return image, target
