"""Real photos for the real-teacher benchmarks (fidelity, grid study, store KL), written as WebDataset shards.

Sources (comma-separated in one spec):

* ``skimage``: scikit-image's bundled sample photos (no download): :data:`SKIMAGE_PHOTOS`;
* ``coco8``: ``../shared/refdata/coco8/images`` next to the repository, when present (8 COCO photos);
* any folder: its ``.jpg`` / ``.jpeg`` / ``.png`` files, sorted by name.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError

# scikit-image's bundled photographs of real scenes (the microscopy, text and synthetic images left out);
# grey ones are given three equal channels.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "moon")
COCO8 = Path(__file__).resolve().parents[1].parent / "shared" / "refdata" / "coco8" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _rgb(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def load_photos(spec: str = "skimage") -> list[tuple[str, bytes]]:
    """(key, encoded image bytes) for every photo of ``spec`` (see the module docstring)."""
    out: list[tuple[str, bytes]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "skimage":
            import skimage.data

            out += [(f"skimage_{name}", _jpeg(_rgb(getattr(skimage.data, name)()))) for name in SKIMAGE_PHOTOS]
            continue
        folder = COCO8 if part == "coco8" else Path(part)
        if not folder.is_dir():
            raise ConfigError(f"photo source {part!r}: no folder {folder}" + (
                " (coco8 is ../shared/refdata/coco8 next to the repository)" if part == "coco8" else ""))
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"photo source {part!r}: no .jpg/.png files in {folder}")
        out += [(f"{folder.name}_{f.stem}".replace(".", "_"), f.read_bytes()) for f in files]
    if not out:
        raise ConfigError(f"photo source {spec!r} gives no photos")
    return out


def coco8_available() -> bool:
    return COCO8.is_dir()


def write_photo_shards(photos: list[tuple[str, bytes]], out_dir: str | Path, per_shard: int = 8) -> str:
    """Write ``photos`` as tar shards of ``per_shard`` samples (``.jpg`` + ``.cls`` 0) -> brace pattern."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num = -(-len(photos) // per_shard)
    for s in range(num):
        with tarfile.open(out_dir / f"photos-{s:04d}.tar", "w") as tar:
            for key, data in photos[s * per_shard:(s + 1) * per_shard]:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(out_dir / (f"photos-{{0000..{num - 1:04d}}}.tar" if num > 1 else "photos-0000.tar"))
