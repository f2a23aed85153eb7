"""Image -> teacher input: decoding, cutting grid/augmentation crops, resizing, normalising.

Every path that feeds the teacher goes through :func:`cut_and_resize` (precompute's workers, the
pooled path's whole-image resize, an online teacher scoring the actual augmentation crop), so a crop
is computed identically wherever it is made: the normalised box is rounded to whole pixels of the
original image, cut out, and brought to ``size x size`` as the teacher's :class:`Preprocess` says.
For an open_clip teacher that is the model's own ``preprocess_cfg`` (:meth:`Preprocess.from_open_clip`):
``shortest`` = resize the short side to ``size`` and centre-crop (CLIP's eval transform), ``squash`` =
resize to ``size x size``; interpolation bicubic or bilinear, antialiased (torch's antialiased kernels
follow PIL's, which open_clip's transform uses). A plain int size means bilinear squash. Tensors stay
uint8 until the teacher normalises them on its device, so workers ship 4x fewer bytes; on the teacher's
device the same cut runs on float pixel values (0..255), rounded back to whole levels after resizing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ...errors import LtDistillError

# Decoding and box helpers live in pipeline.images (no open_clip import); re-exported here.
from ..images import ImageDecodeError, as_chw_uint8, decode_image, pixel_boxes  # noqa: F401


class PreprocessError(LtDistillError):
    """A teacher preprocessing setting lt-distill does not implement."""


INTERPOLATIONS = ("bilinear", "bicubic")
RESIZE_MODES = ("squash", "shortest")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a cut-out box becomes the teacher's ``size x size`` input (see the module docstring)."""

    size: int
    interpolation: str = "bilinear"
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise PreprocessError(f"preprocess size must be >= 1, got {self.size}")
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise PreprocessError(f"resize mode must be one of {RESIZE_MODES}, got {self.resize_mode!r} (open_clip's "
                                  "'longest' pads the short side; lt-distill does not implement it)")

    @classmethod
    def from_open_clip(cls, cfg: dict | None, size: int) -> "Preprocess":
        """The eval transform of an open_clip model's ``preprocess_cfg`` (its defaults where a key is
        absent: bicubic, shortest; 'random' interpolation is bicubic at inference, as open_clip does)."""
        cfg = cfg or {}
        interpolation = cfg.get("interpolation") or "bicubic"
        return cls(int(size), "bicubic" if interpolation == "random" else interpolation,
                   cfg.get("resize_mode") or "shortest")

    def with_size(self, size: int, resize_mode: str | None = None) -> "Preprocess":
        return dataclasses.replace(self, size=int(size), resize_mode=resize_mode or self.resize_mode)

    def to_dict(self) -> dict:
        """What a label store records (provenance)."""
        return {"size": self.size, "interpolation": self.interpolation, "resize_mode": self.resize_mode,
                "antialias": True}


def as_preprocess(spec: "int | Preprocess") -> Preprocess:
    """A :class:`Preprocess`; a plain int size is bilinear squash."""
    return spec if isinstance(spec, Preprocess) else Preprocess(int(spec))


def resized_shape(h: int, w: int, pre: Preprocess) -> tuple[int, int]:
    """(h, w) after the resize, before any centre crop (torchvision's ``Resize(int)`` rule for shortest)."""
    s = pre.size
    if pre.resize_mode == "squash":
        return s, s
    if h <= w:
        return s, int(s * w / h)
    return int(s * h / w), s


def resize_to_input(crop: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(N, 3, h, w) uint8 or float (0..255) -> (N, 3, S, S), same dtype and device. Float results are
    rounded to whole levels and clamped to [0, 255], as the uint8 kernels saturate."""
    h, w = crop.shape[-2:]
    out_h, out_w = resized_shape(h, w, pre)
    x = crop
    if (out_h, out_w) != (h, w):  # torchvision leaves an image of the target size untouched
        if x.is_floating_point():
            # As the uint8 kernels (and PIL) do: width first, then height, each pass rounded and
            # saturated, so bicubic overshoot is clipped between the passes as it is there.
            for size in ((h, out_w), (out_h, out_w)):
                x = F.interpolate(x, size=size, mode=pre.interpolation, antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255)
        else:
            x = F.interpolate(x, size=(out_h, out_w), mode=pre.interpolation, antialias=True, align_corners=False)
    if pre.resize_mode == "shortest":
        top, left = int(round((out_h - pre.size) / 2.0)), int(round((out_w - pre.size) / 2.0))
        x = x[..., top:top + pre.size, left:left + pre.size]
    return x


def cut_and_resize(chw: torch.Tensor, boxes: np.ndarray, size: "int | Preprocess") -> torch.Tensor:
    """Cut each normalised xyxy box (K, 4) out of a (3, H, W) image tensor (uint8, or float pixel values
    0..255 on any device) and bring it to the teacher's input (:func:`resize_to_input`).

    Returns (K, 3, S, S) in the image's dtype, on its device."""
    pre = as_preprocess(size)
    _, h, w = chw.shape
    px = pixel_boxes(boxes, w, h)
    out = chw.new_empty((len(px), 3, pre.size, pre.size))
    for i, (x0, y0, x1, y1) in enumerate(px.tolist()):
        out[i] = resize_to_input(chw[:, y0:y1, x0:x1].unsqueeze(0), pre)[0]
    return out


def crop_and_resize(image: np.ndarray | torch.Tensor, boxes: np.ndarray, size: "int | Preprocess") -> torch.Tensor:
    """Cut each normalised xyxy box (K, 4) out of a uint8 ``image`` and resize it (:func:`cut_and_resize`).

    Returns (K, 3, S, S) uint8."""
    return cut_and_resize(as_chw_uint8(image), boxes, size)


def resize_image(image: np.ndarray | torch.Tensor, size: "int | Preprocess") -> torch.Tensor:
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
    """``image -> (K, 3, size, size)`` uint8: every grid box cut and resized (a picklable worker transform).

    ``mirror``: (2K, 3, size, size), rows K..2K-1 box j cut, mirrored, then resized: the teacher's view of a
    horizontally flipped tile of box j (the augmentation flips the tile before it is resized, so the
    mirror comes first here too)."""

    def __init__(self, boxes: np.ndarray, size: "int | Preprocess", mirror: bool = False) -> None:
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.pre = as_preprocess(size)
        self.size = self.pre.size
        self.mirror = mirror

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.mirror:
            return crop_and_resize(image, self.boxes, self.pre)
        return mirrored_crops(as_chw_uint8(image), self.boxes, self.pre)


def mirrored_crops(chw: torch.Tensor, boxes: np.ndarray, size: "int | Preprocess") -> torch.Tensor:
    """(3, H, W) image, (K, 4) normalised boxes -> (2K, 3, S, S): the K crops of :func:`cut_and_resize`, then
    each box's pixels mirrored left-right before the resize (the same whole-pixel box, flipped)."""
    pre = as_preprocess(size)
    _, h, w = chw.shape
    px = pixel_boxes(boxes, w, h)
    out = chw.new_empty((2 * len(px), 3, pre.size, pre.size))
    for i, (x0, y0, x1, y1) in enumerate(px.tolist()):
        cut = chw[:, y0:y1, x0:x1].unsqueeze(0)
        out[i] = resize_to_input(cut, pre)[0]
        out[len(px) + i] = resize_to_input(cut.flip(-1), pre)[0]
    return out


class WholeImage:
    """``image -> (1, 3, size, size)`` uint8: the whole image resized (the pooled path's worker transform);
    ``mirror``: (2, 3, size, size), then the mirrored image resized (its boxes are mirrored too)."""

    def __init__(self, size: "int | Preprocess", mirror: bool = False) -> None:
        self.pre = as_preprocess(size)
        self.size = self.pre.size
        self.mirror = mirror

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.mirror:
            return resize_image(image, self.pre)[None]
        chw = as_chw_uint8(image)
        return torch.stack([resize_image(chw, self.pre), resize_image(chw.flip(-1), self.pre)])
