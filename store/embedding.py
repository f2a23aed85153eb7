"""Embedding encoding of soft labels: each crop's teacher embedding, quantised.

A top-k row is tied to one vocabulary, prompt set and temperature; an embedding row is not. Two spaces:

* CLIP teachers (``space`` :data:`CLIP_SPACE`): the L2-normalised image embedding; any set of class text
  embeddings ``T`` (C, D) from the same teacher turns it back into a distribution::

      p = softmax(logit_scale * (e @ T.T) / temperature)

* classifier teachers (``space`` :data:`CLASSIFIER_SPACE`): the penultimate feature, *not* normalised (the
  head needs its scale); the store keeps the head (``W`` (L, D), ``b`` (L,), float32) and the label map
  (L,) (vocabulary index of each label-space class, -1: unmapped)::

      p_label = softmax((e @ W.T + b) / temperature),   p[c] = sum of p_label over the classes mapped to c

  (:func:`decode_classifier`); the mass of unmapped label-space classes is the residual, as in top-k rows.

``int8``: one float16 scale per row (``max |e| / 127``, rounded *up* to float16 before quantising, so that
reader and writer agree on it and no code leaves [-127, 127]) and ``round(e / scale)``; the reconstruction
error of every element is at most ``scale / 2`` (:func:`int8_error_bound`). ``float16``: the embedding itself,
no scale. Dequantised rows are not renormalised: the decoder sees exactly what the bound describes.

This module is numpy only; decoding on the training device lives in ``pipeline.data.embedding``.
"""

from __future__ import annotations

import numpy as np

from .schema import RESIDUAL_POLICIES, StoreError

EMBED_DTYPES = ("int8", "float16")
CLIP_SPACE = "joint image-text (CLIP)"
CLASSIFIER_SPACE = "classifier features"
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


def apply_residual(probs: np.ndarray, residual: str | None) -> np.ndarray:
    """(..., C) mapped probabilities summing to the mapped mass m <= 1 -> with the residual 1 - m handled by
    ``residual``: None leaves it out, ``spread`` adds (1 - m) / C to every class, ``renormalise`` divides
    by m (as the top-k decoder's policies, the vocabulary's C classes all being present)."""
    if residual is None:
        return probs
    if residual not in RESIDUAL_POLICIES:
        raise StoreError(f"residual policy must be one of {RESIDUAL_POLICIES}, got {residual!r}")
    mass = probs.sum(axis=-1, keepdims=True)
    if residual == "renormalise":
        return probs / np.maximum(mass, 1e-12)
    return probs + np.clip(1 - mass, 0, None) / probs.shape[-1]


def decode_classifier(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray, temperature: float = 1.0,
                      label_map: np.ndarray | None = None, num_classes: int | None = None,
                      residual: str | None = None) -> np.ndarray:
    """Reference decoder (numpy, float32) of classifier features: (..., D) features, head ``weight`` (L, D)
    and ``bias`` (L,) -> (..., L) label-space probabilities ``softmax((e @ W.T + b) / temperature)``, or with
    ``label_map`` (L,) int (-1: unmapped) -> (..., num_classes) probabilities summed onto the vocabulary,
    the unmapped mass handled by ``residual`` (:func:`apply_residual`)."""
    logits = (np.asarray(embeddings, np.float32) @ np.asarray(weight, np.float32).T
              + np.asarray(bias, np.float32)) / np.float32(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    if label_map is None:
        return p
    return apply_residual(p @ label_map_matrix(label_map, num_classes), residual)


def label_map_matrix(label_map: np.ndarray, num_classes: int | None) -> np.ndarray:
    """(L,) vocabulary index per label-space class (-1: unmapped) -> (L, C) float32 0/1 matrix."""
    label_map = np.asarray(label_map, np.int64)
    if num_classes is None:
        raise StoreError("a label map needs the number of vocabulary classes")
    if (label_map >= num_classes).any():
        raise StoreError(f"label map points past the vocabulary's {num_classes} classes")
    matrix = np.zeros((len(label_map), num_classes), np.float32)
    rows = np.flatnonzero(label_map >= 0)
    matrix[rows, label_map[rows]] = 1.0
    return matrix


def bytes_per_image(num_crops: int, dim: int, dtype: str) -> int:
    """Raw (uncompressed) bytes of one image's embedding rows: codes plus the float16 scales of int8."""
    per_row = dim * (1 if dtype == "int8" else 2) + (2 if dtype == "int8" else 0)
    return num_crops * per_row
