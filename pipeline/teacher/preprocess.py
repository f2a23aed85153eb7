"""Image -> teacher input: decoding, cutting grid/augmentation crops, resizing, normalising.

Every path that feeds the teacher goes through :func:`crop_and_resize` (precompute's workers, the
pooled path's whole-image resize, an online teacher scoring the actual augmentation crop), so a crop
is computed identically wherever it is made: the normalised box is rounded to whole pixels of the
original image, cut out, and resized to ``size x size`` (bilinear with antialiasing, on uint8, no aspect
preservation: the teacher sees all of the box). Tensors stay uint8 until the teacher normalises them on
its device, so workers ship 4x fewer bytes.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from ...errors import LtDistillError


class ImageDecodeError(LtDistillError):
    """Bytes that no image decoder accepts (or a truncated image stream)."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB. Raises :class:`ImageDecodeError`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return np.array(rgb)  # writable copy: torch tensors over it are safe


def as_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor (no copy when possible)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    return image


def pixel_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised (K, 4) xyxy boxes -> integer pixel boxes (K, 4) x0, y0, x1, y1 (exclusive ends),
    rounded to the nearest pixel edge, clipped to the image and at least one pixel wide and high."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    px = np.rint(b * scale).astype(np.int64)
    px[:, 0] = np.clip(px[:, 0], 0, width - 1)
    px[:, 1] = np.clip(px[:, 1], 0, height - 1)
    px[:, 2] = np.clip(np.maximum(px[:, 2], px[:, 0] + 1), 1, width)
    px[:, 3] = np.clip(np.maximum(px[:, 3], px[:, 1] + 1), 1, height)
    return px


def crop_and_resize(image: np.ndarray | torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Cut each normalised xyxy box (K, 4) out of ``image`` and resize it to ``size x size``.

    Returns (K, 3, size, size) uint8."""
    chw = as_chw_uint8(image)
    _, h, w = chw.shape
    px = pixel_boxes(boxes, w, h)
    out = torch.empty((len(px), 3, size, size), dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(px.tolist()):
        crop = chw[:, y0:y1, x0:x1].unsqueeze(0)
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out


def resize_image(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to ``size x size`` -> (3, size, size) uint8 (the pooled path's input)."""
    return crop_and_resize(image, np.array([[0.0, 0.0, 1.0, 1.0]]), size)[0]


class Normalize(torch.nn.Module):
    """uint8 (N, 3, H, W) -> float, CLIP mean/std normalised, in ``dtype``."""

    def __init__(self, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (x.to(self.scale.dtype) * self.scale - self.shift).to(dtype)


class GridCrops:
    """``image -> (K, 3, size, size)`` uint8: every grid box cut and resized (a picklable worker transform)."""

    def __init__(self, boxes: np.ndarray, size: int) -> None:
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.size = int(size)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        return crop_and_resize(image, self.boxes, self.size)


class WholeImage:
    """``image -> (1, 3, size, size)`` uint8: the whole image resized (the pooled path's worker transform)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        return resize_image(image, self.size)[None]
