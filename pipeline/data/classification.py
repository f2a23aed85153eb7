"""Classification images (WebDataset shards) as RichSem mosaics with cached soft labels.

Pipeline (webdataset style, one small stage each): shard assignment (node, then worker) -> read
samples with their (shard index, position) -> shuffle buffer (encoded bytes) -> decode -> tile
augmentation (crop, flip) -> 4-image mosaic -> soft labels matched to each tile's visible region ->
normalise.

Addressing the label store: row (s, r) of the store holds sample r (0-based order inside the tar)
of source shard s (index of the shard in the expanded pattern, the order ``precompute`` used). Every
process therefore reads shards in their global numbering with the same tolerant reader precompute
uses (:func:`..shards.iter_tar_samples`), counting samples (damaged ones too) as they come out of the
tar; the shard index and position never depend on how the shards were split. The counted position is
checked against the store's ``__key__`` for that row; on a mismatch (e.g. a tar member that could
not be read shifted the count) the key is looked up in that shard's rows instead, and a sample the
store does not hold gets no soft loss and hard label -1 (counted as ``not_in_store``).

Splitting: with S shards and U = world_size x num_workers reading units, unit u reads shards
u, u + U, ... when S >= U; otherwise unit u reads shard u mod S and keeps every m-th sample (m = units
sharing that shard). Either way units see disjoint samples, and every sample is seen once per pass.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ...errors import LtDistillError
from ...store import LabelReader
from ..shards import IMAGE_EXTS, iter_tar_samples
from ..images import ImageDecodeError, as_chw_uint8, decode_image
from . import transforms as T
from .embedding import CropEmbeddings
from .labels import CropSoftLabels
from .mosaic import RandomMosaic

# A sample's source label -> (class index or -1, failure reason code or 0): pipeline.vocab.HardLabeler.
HardLabelFn = Callable[[dict[str, bytes]], tuple[int, int]]


def reading_unit(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(unit, num_units) of this process and DataLoader worker: rank-major, worker-minor. The rank and
    world size default to torch.distributed's, else the RANK / WORLD_SIZE variables torchrun sets."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def assign_shards(num_shards: int, unit: int, num_units: int) -> list[tuple[int, int, int]]:
    """Shards this unit reads as (shard, sample_stride, sample_offset): it keeps samples whose
    position p satisfies p % stride == offset."""
    if num_shards >= num_units:
        return [(s, 1, 0) for s in range(unit, num_shards, num_units)]
    shard = unit % num_shards
    sharing = [u for u in range(num_units) if u % num_shards == shard]
    return [(shard, len(sharing), sharing.index(unit))]


def decode_sample_image(fields: dict[str, bytes]) -> torch.Tensor | None:
    """uint8 (3, H, W) RGB of the sample's first image member, or None when absent or undecodable."""
    ext = next((e for e in IMAGE_EXTS if e in fields), None)
    if ext is None:
        return None
    try:
        return as_chw_uint8(decode_image(fields[ext]))
    except ImageDecodeError:
        return None


class StoreRows:
    """Maps (shard, counted position, key) to the store row, and gives its hard label. ``class_map``
    (store class -> run class, -1 = none) translates hard labels when the run's vocabulary is not the
    store's (embedding stores)."""

    def __init__(self, reader: LabelReader, class_map: np.ndarray | None = None) -> None:
        self.reader = reader
        self.class_map = class_map
        self._keys: dict[int, dict[str, int]] = {}

    def hard_label(self, shard: int, position: int) -> int:
        label = self.reader.hard_label(shard, position)
        if self.class_map is None or label < 0:
            return label
        return int(self.class_map[label])

    def locate(self, shard: int, position: int, key: str) -> int | None:
        """Position of ``key`` in ``shard`` of the store, or None when the store lacks it."""
        if shard >= self.reader.layout.num_shards:
            return None
        rows = self.reader.shard_rows(shard)
        if 0 <= position < rows.num_rows and str(rows.keys[position]) == key:
            return position
        if shard not in self._keys:
            self._keys[shard] = {str(k): i for i, k in enumerate(rows.keys[: max(rows.num_rows, 0)])}
        return self._keys[shard].get(key)


def _shuffle(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle within a buffer of ``size`` items (webdataset's ``shuffle`` stage); size <= 1 keeps order."""
    if size <= 1:
        yield from stream
        return
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ClassificationDataset(IterableDataset):
    """Yields (image float32 (3, H, W) normalised, target) mosaics; target keys: ``boxes`` (n, 4) cxcywh
    normalised (one whole-image box per visible tile, clipped to the canvas), ``labels`` (n,) int64
    (hard label, -1 = none), ``soft_labels`` (n, C) float32, ``soft_mask`` (n,) bool, ``regions`` (n, 4)
    float64 (visible region, normalised xyxy in the tile's original image), ``flipped`` (n,) bool,
    ``rows`` (n, 2) int64 (store shard, position; -1 when not in the store), ``orig_size``/``size``
    (2,) int64, ``image_id`` int (negative: classification) and ``skipped`` (reason -> count).

    ``labels``: cached soft labels (None: soft labels left empty, e.g. for the online teacher).
    ``rows``: store rows for hard labels and addressing; without a store, ``hard_labeler(fields)`` (a
    :class:`..vocab.HardLabeler`) maps the sample's source label. ``repeat``: loop over the shards
    forever (a new shard order each pass). ``rank``/``world_size``: this process's place (default:
    torch.distributed, else torchrun's environment). ``skip_unlabelled``: samples with hard label -1
    never reach a mosaic (counted as skipped ``unlabelled``, or ``not_in_store``)."""

    def __init__(self, urls: Sequence[str], *, num_classes: int, tile_transforms: Callable,
                 mosaic: RandomMosaic | None, mosaic_prob: float = 1.0, single_transforms: Callable | None = None,
                 labels: CropSoftLabels | CropEmbeddings | None = None, rows: StoreRows | None = None,
                 hard_labeler: HardLabelFn | None = None,
                 pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225),
                 shuffle_buffer: int = 1000, seed: int = 0, repeat: bool = True,
                 rank: int | None = None, world_size: int | None = None, skip_unlabelled: bool = False) -> None:
        super().__init__()
        self.skip_unlabelled = skip_unlabelled
        self.urls = list(urls)
        self.num_classes = num_classes
        self.tile_transforms = tile_transforms
        self.mosaic = mosaic
        self.mosaic_prob = mosaic_prob if mosaic is not None else 0.0
        self.single_transforms = single_transforms
        self.labels = labels
        self.rows = rows
        self.hard_labeler = hard_labeler
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.repeat = repeat
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ stages
    def raw_samples(self, unit: int, num_units: int, epoch: int) -> Iterator[tuple[int, int, Any]]:
        """(shard, position, RawSample) of this unit's share for one pass, undecoded (cheap to buffer)."""
        order = list(range(len(self.urls)))
        random.Random(self.seed + epoch).shuffle(order)  # same permutation in every process
        for slot, stride, offset in assign_shards(len(order), unit, num_units):
            shard = order[slot]
            for position, raw in enumerate(iter_tar_samples(self.urls[shard])):
                if position % stride == offset:
                    yield shard, position, raw

    def decode(self, shard: int, position: int, raw: Any) -> dict[str, Any]:
        """A sample as a dict with ``image`` uint8 (3, H, W), ``key``, ``shard``, ``position`` (store row,
        -1 when the store lacks it), ``label`` and ``not_in_store``; or ``{"skipped": reason}``."""
        if raw.error is not None:
            return {"skipped": raw.error}
        image = decode_sample_image(raw.fields)
        if image is None:
            return {"skipped": "undecodable"}
        row = self.rows.locate(shard, position, raw.key) if self.rows is not None else position
        if self.rows is not None:
            label = self.rows.hard_label(shard, row) if row is not None else -1
        else:
            label = self.hard_labeler(raw.fields)[0] if self.hard_labeler is not None else -1
        return {"image": image, "key": raw.key, "shard": shard, "position": -1 if row is None else row,
                "label": int(label), "not_in_store": row is None}

    def tile(self, sample: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample -> augmented (tile image, tile target) with its region tracked."""
        image = sample["image"]
        h, w = image.shape[-2:]
        target = {
            "boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]]),
            "labels": torch.tensor([sample["label"]], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "region": (0.0, 0.0, 1.0, 1.0),
            "flipped": False,
            "info": {"shard": sample["shard"], "position": sample["position"], "key": sample["key"]},
        }
        return self.tile_transforms(image, target)

    def combine(self, tiles: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Tiles -> one image with per-tile boxes: a mosaic of four, or a single tile (resized)."""
        if len(tiles) > 1:
            return self.mosaic(tiles)
        image, t = tiles[0]
        if self.single_transforms is not None:
            image, t = self.single_transforms(image, t)
        h, w = image.shape[-2:]
        target = {"boxes": t["boxes"][:1], "labels": t["labels"][:1],
                  "regions": np.asarray([t["region"]], dtype=np.float64),
                  "flipped": np.asarray([t["flipped"]], dtype=bool), "tiles": torch.zeros(1, dtype=torch.int64),
                  "tile_info": [t["info"]], "size": torch.tensor([h, w]), "orig_size": torch.tensor([h, w])}
        return image, target

    def finish(self, image: torch.Tensor, target: dict[str, Any], image_id: int) -> tuple[torch.Tensor, dict]:
        """Soft labels for each tile, then normalise; drop the bookkeeping keys."""
        n = len(target["labels"])
        soft = np.zeros((n, self.num_classes), dtype=np.float32)
        mask = np.zeros(n, dtype=bool)
        rows = np.full((n, 2), -1, dtype=np.int64)
        for i, info in enumerate(target["tile_info"]):
            if info["position"] < 0:
                continue
            rows[i] = (info["shard"], info["position"])
            if isinstance(self.labels, CropSoftLabels):
                s, m = self.labels(info["shard"], info["position"], target["regions"][i:i + 1],
                                   target["flipped"][i:i + 1])
                soft[i], mask[i] = s[0], m[0]
        image, target = T.normalize(image, target, self.pixel_mean, self.pixel_std)
        out = {
            "boxes": target["boxes"], "labels": target["labels"],
            "soft_labels": torch.from_numpy(soft), "soft_mask": torch.from_numpy(mask),
            "regions": torch.from_numpy(target["regions"]), "flipped": torch.from_numpy(target["flipped"]),
            "rows": torch.from_numpy(rows), "orig_size": target["orig_size"].long(), "size": target["size"].long(),
            "image_id": image_id,
        }
        if isinstance(self.labels, CropEmbeddings):  # decoded on the training device (pipeline.data.embedding)
            del out["soft_labels"]
            out.update(self.labels.tiles(rows, target["regions"], target["flipped"]))
        return image, out

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        unit, num_units = reading_unit(self.rank, self.world_size)
        rng = random.Random(self.seed * 1_000_003 + unit)
        count, epoch = 0, 0
        skipped: collections.Counter = collections.Counter()

        def emit(group):
            nonlocal count
            image, target = self.finish(*self.combine(group), image_id=-(1 + unit + num_units * count))
            target["skipped"] = {k: v for k, v in skipped.items() if v}
            skipped.clear()
            count += 1
            return image, target

        while True:
            yielded = 0
            group: list[tuple[torch.Tensor, dict[str, Any]]] = []
            wanted = self._tiles_wanted()
            for shard, position, raw in _shuffle(self.raw_samples(unit, num_units, epoch), self.shuffle_buffer, rng):
                sample = self.decode(shard, position, raw)
                if "skipped" in sample:
                    skipped[sample["skipped"]] += 1
                    continue
                skipped["not_in_store"] += int(sample["not_in_store"])
                if self.skip_unlabelled and sample["label"] < 0:
                    skipped["unlabelled"] += int(not sample["not_in_store"])
                    continue
                group.append(self.tile(sample))
                if len(group) == wanted:
                    yield emit(group)
                    yielded += 1
                    group, wanted = [], self._tiles_wanted()
            if not self.repeat:
                if group:  # the last, partial group of a single pass: a mosaic of fewer tiles
                    yield emit(group)
                return
            if yielded == 0:
                raise LtDistillError(f"reading unit {unit}/{num_units} got no usable classification image in a "
                                     f"whole pass over its shards ({dict(skipped)})")
            epoch += 1

    def _tiles_wanted(self) -> int:
        return 4 if self.mosaic is not None and random.random() < self.mosaic_prob else 1
