"""Test data for precompute: WebDataset shards of real photos (scikit-image) and synthetic images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")
TINY = ["--model", "lt-tiny-rn", "--random-init", "--templates", "single", "--no-progress"]


def photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def sample_image(rng: np.random.Generator, index: int) -> np.ndarray:
    """Even indices: a random crop of a real photo; odd: a synthetic image (gradient + shapes + noise)."""
    h, w = int(rng.integers(48, 160)), int(rng.integers(48, 160))
    if index % 2 == 0:
        src = photo(PHOTOS[(index // 2) % len(PHOTOS)])
        y = int(rng.integers(0, src.shape[0] - 64))
        x = int(rng.integers(0, src.shape[1] - 64))
        crop = src[y:y + int(rng.integers(64, src.shape[0] - y + 1)), x:x + int(rng.integers(64, src.shape[1] - x + 1))]
        return np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, rng.integers(0, 256))], -1)
    for _ in range(3):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, num_shards: int = 3, per_shard: int = 5, seed: int = 0,
                class_indices: list[int] | None = None, wnids: list[str] | None = None) -> str:
    """Write ``num_shards`` tar shards of ``per_shard`` samples (``.jpg``, ``.cls``, ``.json``) and return
    their brace pattern. Labels cycle through ``class_indices`` (``.cls``) and ``wnids`` (``.json``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    class_indices = class_indices or [0]
    wnids = wnids or ["n00000000"]
    n = 0
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s:03d}_{i:04d}"
            members += [(f"{key}.jpg", jpeg(sample_image(rng, n))),
                        (f"{key}.cls", str(class_indices[n % len(class_indices)]).encode()),
                        (f"{key}.json", json.dumps({"wnid": wnids[n % len(wnids)]}).encode())]
            n += 1
        write_tar(root / f"shard-{s:06d}.tar", members)
    return str(root / f"shard-{{000000..{num_shards - 1:06d}}}.tar")


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a label store, by name (to compare stores array by array)."""
    import zarr

    out = {}

    def walk(group, prefix=""):
        for name, member in sorted(group.members()):
            if isinstance(member, zarr.Array):
                out[prefix + name] = member[:]
            else:
                walk(member, prefix + name + "/")

    walk(zarr.open_group(str(path), mode="r"))
    return out
