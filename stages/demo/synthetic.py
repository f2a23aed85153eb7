"""A small synthetic long-tailed detection + classification dataset (the demo's data).

Every class is a coloured shape (``red_star``, ``blue_ring`` ...) drawn on crops of scikit-image's
sample photos. The detection split is long-tailed like LVIS: classes are assigned to a frequency
group, and a class of group rare / common / frequent appears in few / some / many training images
(group sizes and image counts are scaled-down LVIS; the group, not the count, is what the LVIS
evaluator reads). The validation split is balanced so that APr, APc and APf are all measurable.
The classification split is ImageNet-like: one object per image, classes uniformly distributed,
stored as WebDataset shards whose samples carry the class's WordNet-style id (``wnid``).

Outputs under ``out_dir``::

    categories.json                     LVIS-style category list (id, name, synset, wnid, frequency,
                                        image_count, instance_count, synonyms, def)
    train.json, val.json                LVIS v1 format annotations (exhaustive: every absent class is a
                                        verified negative of the image)
    train/, val/                        JPEG images (file_name in the JSON)
    cls/cls-000000.tar ...              WebDataset shards: ``<key>.jpg``, ``<key>.cls`` (index into
                                        ``classes.txt``, ImageNet-21k style) and ``<key>.json`` ({"wnid"})
    classes.txt                         the class list of the ``.cls`` indices: one wnid per line
    synset_wnid.tsv                     synset -> wnid of every class (the taxonomy mapping that turns a
                                        sample's wnid into a class of the vocabulary)
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import ConfigError, LtDistillError

try:  # the sample photos and drawing helpers: the ``demo`` (and ``test``) extra
    from skimage import data as skdata
    from skimage import draw, transform
except ImportError:  # pragma: no cover - depends on the environment
    skdata = draw = transform = None

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 230), "yellow": (240, 220, 40),
    "magenta": (220, 40, 210), "cyan": (40, 220, 230), "orange": (250, 140, 20), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "camera", "coins", "moon", "brick", "grass", "gravel", "page", "clock")
FREQUENCIES = ("r", "c", "f")


@dataclasses.dataclass
class SyntheticConfig:
    num_classes: int = 24  # at most len(COLOURS) * len(SHAPES)
    group_fractions: tuple[float, float, float] = (0.25, 0.4, 0.35)  # rare / common / frequent
    # Training images a class of each group appears in, as fractions of train_images (min 1 image).
    group_image_fractions: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = (
        (0.01, 0.03), (0.04, 0.1), (0.15, 0.3))
    train_images: int = 240
    val_images: int = 48
    val_objects: tuple[int, int] = (1, 3)  # objects per validation image (uniform over classes)
    image_size: tuple[int, int] = (192, 256)  # height, width of detection images
    object_scale: tuple[float, float] = (0.25, 0.55)  # object side / min(image side)
    cls_shards: int = 4
    cls_images_per_shard: int = 48
    cls_image_size: int = 160
    cls_object_scale: tuple[float, float] = (0.45, 0.85)
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        if not 3 <= self.num_classes <= len(COLOURS) * len(SHAPES):
            raise ValueError(f"num_classes must be in [3, {len(COLOURS) * len(SHAPES)}]")
        if min(self.train_images, self.val_images, self.cls_shards, self.cls_images_per_shard) < 1:
            raise ValueError("image and shard counts must be >= 1")
        if abs(sum(self.group_fractions) - 1) > 1e-6:
            raise ValueError("group_fractions must sum to 1")


@dataclasses.dataclass
class SyntheticDataset:
    """Paths of a generated dataset."""

    root: Path
    categories: Path
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path
    cls_shards: str  # brace pattern, e.g. ".../cls/cls-{000000..000003}.tar"
    cls_shard_paths: list[Path]
    class_list: Path  # wnid per line: the ``.cls`` index space
    synset_wnids: Path  # synset <TAB> wnid


def class_table(num_classes: int) -> list[dict[str, Any]]:
    """The first ``num_classes`` (colour, shape) pairs in a fixed interleaved order: every shape and
    every colour is used before any repeats, so small vocabularies stay easy to tell apart."""
    pairs = []
    for offset in range(len(COLOURS)):
        for s, shape in enumerate(SHAPES):
            pairs.append((list(COLOURS)[(s + offset) % len(COLOURS)], shape))
    classes = []
    for i, (colour, shape) in enumerate(pairs[:num_classes]):
        name = f"{colour}_{shape}"
        classes.append({
            "id": i + 1, "name": name, "synonyms": [name], "synset": f"{name}.n.01",
            "wnid": f"n9{i + 1:07d}", "def": f"a {colour} {shape} drawn on a photograph",
        })
    return classes


def _backgrounds() -> list[np.ndarray]:
    out = []
    for name in BACKGROUNDS:
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.float32)
        # Lower the contrast towards mid-grey so that the objects stay the salient thing in a scene.
        out.append(0.55 * img + 0.45 * 110.0)
    return out


def _background(backgrounds: list[np.ndarray], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    src = backgrounds[rng.integers(len(backgrounds))]
    scale = rng.uniform(0.6, 1.0) * min(src.shape[0] / height, src.shape[1] / width)
    ch, cw = max(int(height * scale), 8), max(int(width * scale), 8)
    y0 = rng.integers(0, src.shape[0] - ch + 1)
    x0 = rng.integers(0, src.shape[1] - cw + 1)
    crop = transform.resize(src[y0:y0 + ch, x0:x0 + cw], (height, width), order=1, preserve_range=True,
                            anti_aliasing=False)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32)


def _shape_polygon(shape: str, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """(n, 2) (row, col) vertices of the outline of ``shape`` with circumradius ``r``."""
    def regular(n: int, radius: float, phase: float) -> np.ndarray:
        t = phase + angle + 2 * np.pi * np.arange(n) / n
        return np.stack([cy + radius * np.sin(t), cx + radius * np.cos(t)], axis=1)

    if shape in ("circle", "ring"):
        return regular(48, r, 0.0)
    if shape == "square":
        return regular(4, r, np.pi / 4)
    if shape == "diamond":
        pts = regular(4, r, 0.0)
        return np.stack([cy + (pts[:, 0] - cy), cx + 0.6 * (pts[:, 1] - cx)], axis=1)
    if shape == "triangle":
        return regular(3, r, -np.pi / 2)
    if shape == "hexagon":
        return regular(6, r, 0.0)
    if shape == "star":
        outer, inner = regular(5, r, -np.pi / 2), regular(5, 0.42 * r, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "cross":
        a, b = r, 0.33 * r
        local = np.array([[-b, -a], [-b, -b], [-a, -b], [-a, b], [-b, b], [-b, a],
                          [b, a], [b, b], [a, b], [a, -b], [b, -b], [b, -a]], dtype=np.float64)
        c, s = np.cos(angle), np.sin(angle)
        rot = local @ np.array([[c, s], [-s, c]])
        return np.stack([cy + rot[:, 0], cx + rot[:, 1]], axis=1)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(canvas: np.ndarray, colour: str, shape: str, cy: float, cx: float, r: float,
                 rng: np.random.Generator) -> tuple[list[float], list[float]] | None:
    """Paint one object; returns (bbox xywh, polygon [x0, y0, x1, y1, ...]) or None if it is off-canvas."""
    h, w = canvas.shape[:2]
    angle = rng.uniform(0, 2 * np.pi) if shape not in ("circle", "ring") else 0.0
    poly = _shape_polygon(shape, cy, cx, r, angle)
    rr, cc = draw.polygon(poly[:, 0], poly[:, 1], shape=(h, w))
    mask = np.zeros((h, w), dtype=bool)
    mask[rr, cc] = True
    if shape == "ring":
        ir, ic = draw.disk((cy, cx), 0.55 * r, shape=(h, w))
        mask[ir, ic] = False
    if mask.sum() < 16:
        return None
    base = np.asarray(COLOURS[colour], dtype=np.float32) * rng.uniform(0.85, 1.05)
    shade = rng.normal(0.0, 8.0, size=(int(mask.sum()), 3)).astype(np.float32)
    canvas[mask] = np.clip(base + shade, 0, 255)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    polygon = np.clip(poly[:, ::-1], 0, [w, h]).round(1).reshape(-1).tolist()
    return [x0, y0, x1 - x0, y1 - y0], polygon


def _iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _render_scene(classes: list[dict[str, Any]], labels: list[int], backgrounds: list[np.ndarray],
                  size: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator):
    """An image with one object per entry of ``labels`` (class indices), placed with little overlap."""
    h, w = size
    canvas = _background(backgrounds, h, w, rng)
    objects = []
    for label in labels:
        colour, shape = classes[label]["name"].split("_")
        for _ in range(30):
            r = 0.5 * rng.uniform(*scale) * min(h, w)
            cy, cx = rng.uniform(r * 0.8, h - r * 0.8), rng.uniform(r * 0.8, w - r * 0.8)
            box = [cx - r, cy - r, 2 * r, 2 * r]
            if all(_iou_xywh(box, o[1]) < 0.1 for o in objects):
                break
        drawn = _draw_object(canvas, colour, shape, cy, cx, r, rng)
        if drawn is not None:
            objects.append((label, drawn[0], drawn[1]))
    return canvas.astype(np.uint8), objects


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _train_layout(cfg: SyntheticConfig, groups: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Class indices of the objects of every training image, long-tailed by group."""
    per_image: list[list[int]] = [[] for _ in range(cfg.train_images)]
    for c, g in enumerate(groups):
        lo, hi = cfg.group_image_fractions[g]
        count = int(round(rng.uniform(lo, hi) * cfg.train_images))
        count = min(max(count, 1), cfg.train_images)
        for i in rng.choice(cfg.train_images, size=count, replace=False):
            per_image[i].append(c)
    frequent = np.flatnonzero(groups == 2) if (groups == 2).any() else np.arange(len(groups))
    for labels in per_image:
        if not labels:  # every image shows at least one object
            labels.append(int(rng.choice(frequent)))
        rng.shuffle(labels)
    return per_image


def _write_split(out_dir: Path, split: str, layout: list[list[int]], classes: list[dict[str, Any]],
                 backgrounds: list[np.ndarray], cfg: SyntheticConfig, rng: np.random.Generator,
                 first_image_id: int, first_ann_id: int) -> tuple[dict[str, Any], list[set[int]]]:
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    present: list[set[int]] = []
    h, w = cfg.image_size
    all_ids = {c["id"] for c in classes}
    for i, labels in enumerate(layout):
        image_id = first_image_id + i
        img, objects = _render_scene(classes, labels, backgrounds, cfg.image_size, cfg.object_scale, rng)
        file_name = f"{image_id:012d}.jpg"
        (image_dir / file_name).write_bytes(_jpeg(img, cfg.jpeg_quality))
        cats = {classes[label]["id"] for label, _, _ in objects}
        present.append(cats)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w,
                       "coco_url": f"synthetic://{split}/{file_name}",
                       "neg_category_ids": sorted(all_ids - cats), "not_exhaustive_category_ids": []})
        for label, bbox, polygon in objects:
            annotations.append({"id": first_ann_id + len(annotations), "image_id": image_id,
                                "category_id": classes[label]["id"], "bbox": [round(v, 2) for v in bbox],
                                "area": round(bbox[2] * bbox[3], 2), "segmentation": [polygon]})
    return {"images": images, "annotations": annotations}, present


def make_synthetic_dataset(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> SyntheticDataset:
    """Write the dataset described in the module docstring under ``out_dir`` (deterministic in ``cfg``)."""
    cfg = cfg or SyntheticConfig()
    if skdata is None:
        raise LtDistillError("the synthetic dataset draws on scikit-image's sample photos: "
                             "pip install 'lt-distill[demo]' (or scikit-image)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"synthetic dataset directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    classes = class_table(cfg.num_classes)
    backgrounds = _backgrounds()

    # Frequency groups: a random (seeded) assignment, so colour or shape does not predict the group.
    counts = np.floor(np.asarray(cfg.group_fractions) * cfg.num_classes).astype(int)
    counts[2] += cfg.num_classes - counts.sum()
    groups = rng.permutation(np.repeat(np.arange(3), counts))

    train_layout = _train_layout(cfg, groups, rng)
    train, train_present = _write_split(out, "train", train_layout, classes, backgrounds, cfg, rng, 1, 1)
    val_layout = [list(rng.choice(cfg.num_classes, size=rng.integers(cfg.val_objects[0], cfg.val_objects[1] + 1),
                                  replace=False)) for _ in range(cfg.val_images)]
    val, _ = _write_split(out, "val", val_layout, classes, backgrounds, cfg, rng, 1 + cfg.train_images,
                          1 + len(train["annotations"]))

    categories = []
    for c, cls in enumerate(classes):
        image_count = sum(cls["id"] in p for p in train_present)
        instance_count = sum(a["category_id"] == cls["id"] for a in train["annotations"])
        categories.append({**cls, "frequency": FREQUENCIES[groups[c]], "image_count": image_count,
                           "instance_count": instance_count})
    for split, payload in (("train", train), ("val", val)):
        payload["categories"] = categories
        payload["info"] = {"description": f"lt-distill synthetic long-tailed dataset ({split})",
                           "seed": cfg.seed}
        (out / f"{split}.json").write_text(json.dumps(payload))
    (out / "categories.json").write_text(json.dumps(categories, indent=1))
    (out / "classes.txt").write_text("".join(c["wnid"] + "\n" for c in classes))
    (out / "synset_wnid.tsv").write_text("".join(f"{c['synset']}\t{c['wnid']}\n" for c in classes))

    shard_paths = _write_classification_shards(out / "cls", classes, backgrounds, cfg, rng)
    last = len(shard_paths) - 1
    return SyntheticDataset(
        root=out, categories=out / "categories.json",
        train_annotations=out / "train.json", train_images=out / "train",
        val_annotations=out / "val.json", val_images=out / "val",
        cls_shards=str(out / "cls" / f"cls-{{000000..{last:06d}}}.tar"), cls_shard_paths=shard_paths,
        class_list=out / "classes.txt", synset_wnids=out / "synset_wnid.tsv",
    )


def _write_classification_shards(out_dir: Path, classes: list[dict[str, Any]], backgrounds: list[np.ndarray],
                                 cfg: SyntheticConfig, rng: np.random.Generator) -> list[Path]:
    """ImageNet-like shards: one centred-ish object per image, classes cycled then shuffled."""
    out_dir.mkdir(parents=True, exist_ok=True)
    total = cfg.cls_shards * cfg.cls_images_per_shard
    labels = rng.permutation(np.fromiter(itertools.islice(itertools.cycle(range(len(classes))), total), int))
    size = (cfg.cls_image_size, cfg.cls_image_size)
    paths = []
    for s in range(cfg.cls_shards):
        path = out_dir / f"cls-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(cfg.cls_images_per_shard):
                label = int(labels[s * cfg.cls_images_per_shard + j])
                img, _ = _render_scene(classes, [label], backgrounds, size, cfg.cls_object_scale, rng)
                key = f"{classes[label]['wnid']}_{s:06d}_{j:05d}"
                members = (("jpg", _jpeg(img, cfg.jpeg_quality)), ("cls", str(label).encode()),
                           ("json", json.dumps({"wnid": classes[label]["wnid"]}).encode()))
                for ext, payload in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths
