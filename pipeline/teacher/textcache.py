"""Class text embeddings computed once: a disk cache beside the engine cache.

Encoding the vocabulary is most of a small precompute job (1203 LVIS classes x 80 templates took 103 s
of a 125 s run with the tiny teacher on a CPU; a real RN50 text tower takes tens of minutes there), and
every rerun, resume, torchrun rank, ``bench fidelity`` and online-training process needs the same
embeddings. They are stored as float32 ``.npy`` files named by the SHA-256 of everything they depend on
(:func:`text_cache_key`): model, weights, the exact prompt list (vocabulary, templates, synonyms),
precision, device type and library versions. Under torch.distributed, rank 0 computes and writes while
the other ranks wait at a barrier and then read.

Bump :data:`TEXT_EMBEDDING_VERSION` whenever the way embeddings are computed changes
(:func:`~lt_distill.pipeline.teacher.model.encode_class_texts`): old entries then stop matching.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

TEXT_EMBEDDING_VERSION = 1
OFF = "off"


def text_cache_key(*, model: str, weights_id: str, prompts: list[list[str]], precision: str, device: torch.device,
                   ) -> dict[str, Any]:
    """What a vocabulary's text embeddings depend on; ``key["sha256"]`` names the cache entry."""
    import open_clip

    key = {
        "version": TEXT_EMBEDDING_VERSION,
        "model": model,
        "weights_sha256": weights_id,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),  # vocabulary, templates, synonyms
        "num_classes": len(prompts),
        "precision": precision,
        "device_type": device.type,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
    }
    key["sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def resolve_text_cache(spec: str, engine_cache: str | Path | None) -> Path | None:
    """The cache folder: ``spec``; "" = ``text/`` inside the engine cache folder; ``"off"`` = no cache."""
    if spec == OFF:
        return None
    if spec:
        return Path(spec)
    from .engines import default_engine_cache

    return Path(engine_cache or default_engine_cache()) / "text"


def _load(folder: Path, key: dict[str, Any]) -> np.ndarray | None:
    path = folder / f"{key['sha256']}.npy"
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if meta != key or emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != key["num_classes"]:
        return None  # a damaged or foreign entry: compute again (and overwrite it)
    return emb


def _save(folder: Path, key: dict[str, Any], emb: np.ndarray) -> None:
    """Write atomically (temp file + rename): concurrent jobs may share the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key['sha256']}.npy"
        tmp = folder / f".{key['sha256']}.{os.getpid()}.npy"
        np.save(tmp, emb, allow_pickle=False)
        os.replace(tmp, path)
        tmp_meta = folder / f".{key['sha256']}.{os.getpid()}.json"
        tmp_meta.write_text(json.dumps(key, sort_keys=True))
        os.replace(tmp_meta, path.with_suffix(".json"))
    except OSError:
        pass  # a read-only or full cache only costs the next run the encoding


def cached_text_embeddings(key: dict[str, Any], compute: Callable[[], torch.Tensor], folder: Path | None,
                           device: torch.device) -> tuple[torch.Tensor, bool]:
    """(C, D) float32 embeddings on ``device`` and whether they came from the cache. ``compute`` runs only
    on a miss, and under torch.distributed only on rank 0 (the others wait, then read what it wrote)."""
    distributed = folder is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        dist.barrier()  # rank 0 has written the entry (or failed: then this rank computes it too)
        emb = _load(folder, key)
        return (torch.from_numpy(emb).to(device), True) if emb is not None else (compute(), False)
    try:
        emb = _load(folder, key) if folder is not None else None
        if emb is not None:
            return torch.from_numpy(emb).to(device), True
        out = compute()
        if folder is not None:
            _save(folder, key, out.detach().float().cpu().numpy())
        return out, False
    finally:
        if distributed:
            dist.barrier()
