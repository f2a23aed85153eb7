"""Embedding encoding of soft labels: each crop's L2-normalised teacher image embedding, quantised.

A top-k row is tied to one vocabulary, prompt set and temperature; an embedding row is not. Any set of
class text embeddings ``T`` (C, D) from the same teacher turns it back into a distribution::

    p = softmax(logit_scale * (e @ T.T) / temperature)

``int8``: one float16 scale per row (``max |e| / 127``, rounded *up* to float16 before quantising, so that
reader and writer agree on it and no code leaves [-127, 127]) and ``round(e / scale)``; the reconstruction
error of every element is at most ``scale / 2`` (:func:`int8_error_bound`). ``float16``: the embedding itself,
no scale. Dequantised rows are not renormalised: the decoder sees exactly what the bound describes.

This module is numpy only; decoding on the training device lives in ``pipeline.data.embedding``.
"""

from __future__ import annotations

import numpy as np

from .schema import StoreError

EMBED_DTYPES = ("int8", "float16")
ENCODINGS = ("topk", "embedding", "both")
INT8_MAX = 127


def quantise(embeddings: np.ndarray, dtype: str = "int8") -> tuple[np.ndarray, np.ndarray | None]:
    """(..., D) float embeddings -> (codes (..., D) int8 or float16, scale (...,) float16 or None).

    An all-zero row gets scale 0 and codes 0 (it decodes to zeros)."""
    if dtype not in EMBED_DTYPES:
        raise StoreError(f"embedding dtype must be one of {EMBED_DTYPES}, got {dtype!r}")
    e = np.asarray(embeddings, dtype=np.float32)
    if dtype == "float16":
        return e.astype(np.float16), None
    peak = np.abs(e).max(axis=-1) / INT8_MAX
    scale = peak.astype(np.float16)
    low = scale.astype(np.float32) < peak  # rounded down: the peak would need a code above 127
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    s32 = scale.astype(np.float32)[..., None]
    codes = np.rint(np.divide(e, s32, out=np.zeros_like(e), where=s32 > 0))
    return np.clip(codes, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantise(codes: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Codes (..., D) and scale (...,) (None for float16 codes) -> (..., D) float32 embeddings."""
    e = np.asarray(codes).astype(np.float32)
    if scale is None:
        return e
    return e * np.asarray(scale, dtype=np.float32)[..., None]


def int8_error_bound(scale: np.ndarray) -> np.ndarray:
    """Largest per-element |e - dequantise(quantise(e))| for rows with these (float16) scales: half a step
    (the scale is rounded up, so every value is in range and only rounding to the nearest code is lost)."""
    return np.asarray(scale, dtype=np.float32) / 2


def decode_embeddings(embeddings: np.ndarray, text: np.ndarray, logit_scale: float,
                      temperature: float = 1.0) -> np.ndarray:
    """Reference decoder (numpy, float32): (..., D) embeddings and (C, D) class text embeddings ->
    (..., C) probabilities ``softmax(logit_scale * e @ text.T / temperature)``."""
    logits = (np.asarray(embeddings, np.float32) @ np.asarray(text, np.float32).T) * np.float32(
        logit_scale / temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def bytes_per_image(num_crops: int, dim: int, dtype: str) -> int:
    """Raw (uncompressed) bytes of one image's embedding rows: codes plus the float16 scales of int8."""
    per_row = dim * (1 if dtype == "int8" else 2) + (2 if dtype == "int8" else 0)
    return num_crops * per_row
