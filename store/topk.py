"""Top-k encoding of class distributions (int16 indices, float16 probabilities) and decoding back.

The stored probabilities are the teacher's own (not renormalised), so the residual mass
``1 - sum(prob)`` is known per crop; ``encoding.residual`` in the store attributes says how a decoder
turns them back into a full distribution:

* ``renormalise``: the k kept classes are rescaled to sum to one; everything else is zero.
* ``spread``: the kept classes keep their mass; the residual is spread evenly over the other C - k
  (C minus the valid entries, for a row holding fewer than k).
"""

from __future__ import annotations

import numpy as np

from .schema import RESIDUAL_POLICIES, StoreError


def encode_topk(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(..., C) probabilities -> indices int16 (..., k) and probabilities float16 (..., k), descending."""
    probs = np.asarray(probs)
    num_classes = probs.shape[-1]
    if not 1 <= k <= num_classes:
        raise StoreError(f"top-k: k={k} must be in [1, {num_classes}]")
    if num_classes > 32767:
        raise StoreError("top-k: class indices are int16; at most 32767 classes")
    part = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(probs, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    index = np.take_along_axis(part, order, axis=-1).astype(np.int16)
    prob = np.take_along_axis(vals, order, axis=-1).astype(np.float16)
    return index, prob


def decode_topk(index: np.ndarray, prob: np.ndarray, num_classes: int, residual: str = "spread") -> np.ndarray:
    """Indices (..., k) and probabilities (..., k) -> full float32 distribution (..., C).

    Entries with index -1 (no label) decode to an all-zero row."""
    if residual not in RESIDUAL_POLICIES:
        raise StoreError(f"top-k: residual policy must be one of {RESIDUAL_POLICIES}, got {residual!r}")
    index = np.asarray(index)
    p = np.asarray(prob, dtype=np.float32)
    valid = index >= 0
    p = np.where(valid, p, 0.0)
    kept = p.sum(axis=-1, keepdims=True)
    lead = index.shape[:-1]
    full = np.zeros((*lead, num_classes), dtype=np.float32)
    if residual == "renormalise":
        values = p / np.maximum(kept, 1e-12)
    else:
        # Over the classes not kept: C minus the row's valid entries (a row may hold fewer than k).
        rest = np.clip(1.0 - kept, 0.0, None) / np.maximum(num_classes - valid.sum(axis=-1, keepdims=True), 1)
        full += rest * valid.any(axis=-1, keepdims=True)
        values = p
    where = np.nonzero(valid)  # leading coordinates of every kept entry, then its slot
    full[(*where[:-1], index[where].astype(np.int64))] = values[where]
    return full


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """KL(p || q) over the last axis, in nats."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return np.where(p > 0, p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps))), 0.0).sum(-1)


def residual_mass(prob: np.ndarray) -> np.ndarray:
    """1 - sum of the kept probabilities, per crop (clipped at 0)."""
    return np.clip(1.0 - np.asarray(prob, dtype=np.float32).sum(-1), 0.0, None)
