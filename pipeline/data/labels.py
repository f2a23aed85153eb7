"""Cached soft labels for stage 2: grid-crop labels matched to augmentation regions, object labels
by annotation id, and the store compatibility check."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...store import LabelReader, check_compatible, flip_labels, vocabulary_sha256
from ..grid import MATCH_MODES, GridSpec, match_crops
from ..vocab import class_list_sha256, load_class_list


def check_label_store(reader: LabelReader, *, vocabulary: Sequence[str] | None = None, grid: str | None = None,
                      topk: int | None = None, residual: str | None = None, teacher_model: str | None = None,
                      class_list: str | None = None) -> None:
    """Refuse a store whose vocabulary, grid, encoding or teacher differs from what the run expects:
    raises :class:`StoreMismatchError` naming every differing field with both values. Only the
    arguments given are checked."""
    expected: dict = {}
    if vocabulary is not None:
        expected["vocabulary.sha256"] = vocabulary_sha256(list(vocabulary))
    if grid is not None:
        expected["grid.spec"] = GridSpec.parse(grid).spec
    if topk is not None:
        expected["encoding.topk"] = topk
    if residual is not None:
        expected["encoding.residual"] = residual
    if teacher_model is not None:
        expected["teacher.model"] = teacher_model
    if class_list is not None:  # the store's hard labels were mapped through this list (by its SHA-256)
        expected["precompute.class_list_sha256"] = class_list_sha256(load_class_list(class_list))
    check_compatible(reader.attrs, expected, store_name=f"label store {reader.path}")


class CropSoftLabels:
    """Soft label of a visible region of a stored classification image.

    ``__call__(shard, position, regions)`` with ``regions`` (n, 4) normalised xyxy in the image's
    original coordinates returns ``soft`` float32 (n, C) (decoded with the store's residual policy)
    and ``mask`` bool (n,): False when the row is not done or the match is below the IoU threshold
    (or, in ``exact`` mode, the region is not a grid box). ``exact`` and ``nearest`` return the
    stored label of one grid crop, decoded, bit for bit; ``interp`` the IoU-weighted mixture of
    the best ``top_n`` crops.

    ``flipped`` (n,) bool, optional: which regions are shown mirrored. On a store with mirror rows
    (``grid.flip_labels``: row K + j is grid box j mirrored) a flipped region reads the mirror rows, with the
    weights matching gives over the K boxes; a store without them ignores it (the unflipped label)."""

    def __init__(self, reader: LabelReader, mode: str = "nearest", iou_threshold: float = 0.5,
                 top_n: int = 4) -> None:
        if mode not in MATCH_MODES:
            raise ValueError(f"crop match mode must be one of {MATCH_MODES}, got {mode!r}")
        self.reader = reader
        self.mode = mode
        self.iou_threshold = iou_threshold
        self.top_n = top_n
        self.grid_boxes = np.asarray(reader.attrs["grid"]["boxes"], dtype=np.float64)
        self.num_classes = reader.layout.num_classes
        # Row offset of a flipped region's labels: K on a store with mirror rows, else 0 (no flip labels).
        self.mirror_offset = len(self.grid_boxes) if flip_labels(reader.attrs) else 0

    def __call__(self, shard: int, position: int, regions: np.ndarray,
                 flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        regions = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
        offset = np.zeros(len(regions), dtype=np.int64)
        if flipped is not None:
            offset = np.where(np.asarray(flipped, dtype=bool).reshape(-1), self.mirror_offset, 0)
        soft = np.zeros((len(regions), self.num_classes), dtype=np.float32)
        index, prob, valid = self.reader.labels(shard, position)
        if not valid:
            return soft, np.zeros(len(regions), dtype=bool)
        weights, ok = match_crops(regions, self.grid_boxes, self.mode, self.iou_threshold, self.top_n)
        for i in np.nonzero(ok)[0]:
            cols = np.nonzero(weights[i])[0]
            rows = cols + offset[i]
            full = self.reader.decode(index[rows], prob[rows])  # (m, C) float32
            soft[i] = full[0] if len(cols) == 1 else (weights[i, cols, None] * full).sum(0)
        return soft, ok


class ObjectSoftLabels:
    """Object-level soft labels by annotation id: ``__call__(ann_ids)`` -> soft float32 (n, C) and
    mask bool (n,), False for annotations the store has no label for (or when it has no objects)."""

    def __init__(self, reader: LabelReader) -> None:
        self.reader = reader
        self.num_classes = reader.layout.num_classes
        self.available = reader.has_objects()

    def __call__(self, ann_ids) -> tuple[np.ndarray, np.ndarray]:
        ann_ids = np.asarray(ann_ids, dtype=np.int64).reshape(-1)
        if not self.available or len(ann_ids) == 0:
            return np.zeros((len(ann_ids), self.num_classes), np.float32), np.zeros(len(ann_ids), bool)
        index, prob, valid = self.reader.objects(ann_ids)
        soft = self.reader.decode(index, prob)
        soft[~valid] = 0.0
        return soft.astype(np.float32, copy=False), valid
