"""CLIS pre-defined regions (``lt-distill clis-regions``): a trained detector, run once over the
classification shards, gives each classification row the box of highest score *for its labelled
class* (METHODS.md §CLIS). Rows are the label store's (shard index in the expanded pattern, position
in the tar), found the way training finds them (``pipeline.data.classification.StoreRows``); rows
without a hard label, not in the store or undecodable get none (training then anchors their tile
query at the whole tile).

Each image is resized (short side ``image_size``, long side at most ``max_size``) without cropping,
so the detector's normalised boxes are already normalised coordinates of the original image.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ...store import LabelReader
from ..data import transforms as T
from ..data.classification import StoreRows, decode_sample_image
from ..model.box_ops import box_cxcywh_to_xyxy
from ..model.dino import DINO
from ..shards import iter_tar_samples
from .clis_data import PredefinedRegions


def _labelled_images(urls: Sequence[str], rows: StoreRows, counts: Counter) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(shard, row, hard label, uint8 image) of every labelled classification image in store order."""
    reader = rows.reader
    for shard, url in enumerate(urls):
        for position, raw in enumerate(iter_tar_samples(url)):
            if raw.error is not None:
                counts["unreadable"] += 1
                continue
            row = rows.locate(shard, position, raw.key)
            if row is None:
                counts["not_in_store"] += 1
                continue
            label = int(reader.hard_label(shard, row))
            if label < 0:
                counts["no_label"] += 1
                continue
            image = decode_sample_image(raw.fields)
            if image is None:
                counts["undecodable"] += 1
                continue
            yield shard, row, label, image


@torch.no_grad()
def compute_predefined_regions(model: DINO, urls: Sequence[str], reader: LabelReader, *, image_size: int = 800,
                               max_size: int = 1333, batch_size: int = 4, pixel_mean=(0.485, 0.456, 0.406),
                               pixel_std=(0.229, 0.224, 0.225), device: str | torch.device = "cpu",
                               source: str = "") -> tuple[PredefinedRegions, dict[str, int]]:
    """Regions ``(S, R, 4)`` for the store's rows and counts (``regions``, ``unreadable``,
    ``not_in_store``, ``no_label``, ``undecodable``). ``model`` must have the store's classes in order."""
    if model.num_classes != reader.layout.num_classes:
        raise ValueError(f"the detector has {model.num_classes} classes, the label store {reader.layout.num_classes}")
    layout = reader.layout
    regions = PredefinedRegions.empty(layout.num_shards, layout.shard_capacity, detector=source,
                                      image_size=image_size, max_size=max_size)
    model = model.to(device).eval()
    counts: Counter = Counter()
    pending: list[tuple[int, int, int, torch.Tensor]] = []

    def flush() -> None:
        # One forward per image size, without padding: padding changes the backbone's features near the
        # border and with them which query scores best, so an image's region would depend on its batch.
        by_size: dict[tuple[int, ...], list[tuple[int, int, int, torch.Tensor]]] = {}
        for item in pending:
            by_size.setdefault(tuple(item[-1].shape), []).append(item)
        for group in by_size.values():
            run(group)
        pending.clear()

    def run(group: list[tuple[int, int, int, torch.Tensor]]) -> None:
        images = torch.stack([im for *_, im in group])
        out = model(images.to(device))
        for i, (shard, row, label, _) in enumerate(group):
            scores = out["pred_logits"][i, :, label].float().sigmoid()
            best = int(scores.argmax())
            # Boxes are normalised by the unpadded image, which is the whole original image resized.
            box = box_cxcywh_to_xyxy(out["pred_boxes"][i, best].float()).clamp(0, 1).cpu().numpy()
            regions.regions[shard, row] = box
            regions.scores[shard, row] = float(scores[best])
            counts["regions"] += 1

    for shard, row, label, image in _labelled_images(urls, StoreRows(reader), counts):
        image, _ = T.resize(image, {}, image_size, max_size)
        image, _ = T.normalize(image, {}, pixel_mean, pixel_std)
        pending.append((shard, row, label, image))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return regions, dict(counts)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
