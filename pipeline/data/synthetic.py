"""Small synthetic inputs for tests, benchmarks and demos: WebDataset shards of generated photos, a
matching label store, and an LVIS-format detection set. Deterministic for a given seed."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ...store import LabelStore, ObjectBlock, ShardResult, StoreLayout, encode_topk
from ...store.schema import STATUS_DONE
from ..grid import GridSpec


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour blobs plus a little noise (compresses like a photo)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.15, 0.5) * max(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        image += blob[..., None] * rng.uniform(0, 255, size=3)
    image = image / max(image.max(), 1e-6) * 230 + rng.normal(0, 6, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str | Path, num_shards: int, per_shard: int, *, seed: int = 0,
                 size_range: tuple[int, int] = (48, 96), num_classes: int = 10,
                 broken: Sequence[tuple[int, int]] = ()) -> tuple[str, list[list[str]], list[list[int]]]:
    """Write ``num_shards`` tar shards of ``per_shard`` samples (``.jpg`` + ``.cls``). Samples listed in
    ``broken`` as (shard, position) get undecodable image bytes. Returns (brace pattern, keys per
    shard, class per sample)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    broken = set(broken)
    keys, classes = [], []
    for s in range(num_shards):
        shard_keys, shard_classes = [], []
        with tarfile.open(out_dir / f"shard-{s:04d}.tar", "w") as tar:
            for p in range(per_shard):
                key = f"s{s:04d}_{p:05d}"
                h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
                data = b"not a jpeg" if (s, p) in broken else encode_jpeg(synthetic_photo(rng, h, w))
                cls = int(rng.integers(num_classes))
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", str(cls).encode())
                shard_keys.append(key)
                shard_classes.append(cls)
        keys.append(shard_keys)
        classes.append(shard_classes)
    pattern = str(out_dir / f"shard-{{0000..{num_shards - 1:04d}}}.tar")
    return pattern, keys, classes


def random_distributions(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int,
                         temperature: float = 0.3) -> np.ndarray:
    """Peaked random distributions (..., C) float32: softmax of Gaussian logits / temperature."""
    logits = rng.normal(size=(*shape, num_classes)) / temperature
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def class_names(num_classes: int) -> list[str]:
    return [f"class_{i:04d}" for i in range(num_classes)]


def write_label_store(path: str | Path, keys: list[list[str]], *, num_classes: int = 10, grid: str = "default",
                      topk: int = 5, seed: int = 0, hard_labels: list[list[int]] | None = None,
                      residual: str = "spread", vocabulary: list[str] | None = None,
                      sizes: list[list[tuple[int, int]]] | None = None, objects: Sequence[int] = (),
                      capacity: int | None = None) -> LabelStore:
    """A label store holding random (but valid) labels for the given keys, shard by shard, and object
    labels for annotation ids ``objects``."""
    spec = GridSpec.parse(grid)
    rng = np.random.default_rng(seed)
    cap = capacity or max(len(k) for k in keys)
    layout = StoreLayout(num_shards=len(keys), shard_capacity=cap, num_crops=spec.num_boxes, topk=topk,
                         num_classes=num_classes)
    store = LabelStore.create(
        path, layout, teacher={"model": "synthetic", "weights_sha256": "", "engine": "none", "precision": "fp32",
                               "input_size": 224, "logit_scale": 100.0, "temperature": 1.0,
                               "prompt_templates": ["a {}"], "mode": "crops"},
        vocabulary=vocabulary or class_names(num_classes), grid_spec=spec.spec, grid_boxes=spec.boxes(),
        residual=residual, source={"pattern": "synthetic", "num_shards": len(keys)})
    for s, shard_keys in enumerate(keys):
        n = len(shard_keys)
        index, prob = encode_topk(random_distributions(rng, (n, spec.num_boxes), num_classes), topk)
        hard = np.asarray(hard_labels[s] if hard_labels is not None else rng.integers(-1, num_classes, n))
        size = np.asarray(sizes[s] if sizes is not None else np.full((n, 2), 64), dtype=np.int32).reshape(n, 2)
        store.write_shard(s, ShardResult(keys=list(shard_keys), sizes=size, hard_labels=hard,
                                         status=np.full(n, STATUS_DONE, np.uint8), reasons=np.zeros(n, np.uint8),
                                         index=index, prob=prob))
    if len(objects):
        ann_ids = np.asarray(objects, dtype=np.int64)
        store.create_objects(len(ann_ids), block_size=max(len(ann_ids), 1), source="synthetic")
        index, prob = encode_topk(random_distributions(rng, (len(ann_ids),), num_classes), topk)
        store.write_objects_block(0, ObjectBlock(
            ann_ids=ann_ids, image_ids=np.zeros(len(ann_ids), np.int64), boxes=np.zeros((len(ann_ids), 4), np.float32),
            index=index, prob=prob, status=np.full(len(ann_ids), STATUS_DONE, np.uint8)))
    return store


def write_detection_set(out_dir: str | Path, num_images: int, *, num_classes: int = 10, seed: int = 0,
                        size_range: tuple[int, int] = (64, 128), max_boxes: int = 4,
                        class_weights: Sequence[float] | None = None) -> tuple[Path, Path]:
    """LVIS-format JSON (``annotations.json``, LVIS v1 style: images addressed by ``coco_url``) and an
    image folder ``train2017/``. Returns (json path, image root)."""
    out_dir = Path(out_dir)
    (out_dir / "train2017").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = np.asarray(class_weights if class_weights is not None else np.ones(num_classes), np.float64)
    weights = weights / weights.sum()
    images, anns = [], []
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(synthetic_photo(rng, h, w)).save(out_dir / "train2017" / name, quality=90)
        images.append({"id": i + 1, "height": h, "width": w,
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}"})
        for _ in range(int(rng.integers(1, max_boxes + 1))):
            bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.choice(num_classes, p=weights)) + 1,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": bw * bh})
    cats = [{"id": c + 1, "name": name, "frequency": "f"} for c, name in enumerate(class_names(num_classes))]
    path = out_dir / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, out_dir
