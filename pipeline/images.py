"""Image helpers shared by the teacher and the training data: decoding and normalised -> pixel boxes.

They live outside :mod:`lt_distill.pipeline.teacher` so that the training data pipeline can decode
images without importing open_clip (which costs seconds per process, in every DataLoader worker too).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..errors import LtDistillError


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
