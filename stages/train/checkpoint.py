"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint is a model checkpoint (``"model"`` state_dict + ``"config"``, so ``lt-distill
eval`` and ``export`` read it) plus the training state::

    {"model", "config" (resolved TrainConfig), "categories" [{"id", "name"}, ...] (class order),
     "iteration" (optimizer steps done), "optimizer", "scheduler", "scaler",
     "data" (loader position: epoch, batch_in_epoch, epoch_length, world_size),
     "rng" [per-rank RNG states], "criterion" (the method's state: the criterion hooks' buffers),
     "lt_distill_version"}

The loaders are not pickled: their position follows from the iteration, and resuming replays them
to it (see ``loop.batches``).

Files: ``<output_dir>/checkpoints/iter_0005000.pt`` and ``<output_dir>/checkpoints/last`` (the file
name of the newest), ``<output_dir>/model_final.pt`` (model, config and categories) at the end.
Everything is read back with ``torch.load(weights_only=True)``: RNG states are stored as tensors and
plain Python values.
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import LtDistillError
from ...pipeline.model.checkpoint import load_checkpoint

CHECKPOINT_DIR = "checkpoints"
LAST_POINTER = "last"
FINAL_MODEL = "model_final.pt"
# Buffers that define this run's class vocabulary: never taken from a fine-tuning source.
VOCABULARY_KEYS = ("text_embeddings",)


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and CUDA generator states, in weights_only-loadable form."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` through ``path.tmp`` (renamed when whole). A failed write removes the
    ``.tmp`` and raises :class:`LtDistillError` (a full disk says so)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        # Through a Python file: torch's own file writer turns ENOSPC into an opaque RuntimeError.
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise LtDistillError(f"cannot write checkpoint {path}: {reason} (removed the partial {tmp.name})") from exc


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def save_training_checkpoint(output_dir: str | Path, state: dict[str, Any], keep: int = 0) -> Path:
    """Write ``state`` as ``iter_<iteration>.pt``, point ``last`` at it, prune to the ``keep`` newest."""
    directory = checkpoint_dir(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"iter_{state['iteration']:07d}.pt"
    _atomic_save(state, path)
    pointer = directory / LAST_POINTER
    tmp = pointer.with_name(LAST_POINTER + ".tmp")
    tmp.write_text(path.name + "\n")
    os.replace(tmp, pointer)
    if keep > 0:
        for old in sorted(directory.glob("iter_*.pt"))[:-keep]:
            if old != path:
                old.unlink()
    return path


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest training checkpoint of a run (None if it has none)."""
    directory = checkpoint_dir(output_dir)
    pointer = directory / LAST_POINTER
    if pointer.is_file():
        path = directory / pointer.read_text().strip()
        if path.is_file():
            return path
    found = sorted(directory.glob("iter_*.pt"))
    return found[-1] if found else None


def load_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest intact training checkpoint of a run: (path, state, notes). A newest checkpoint that cannot
    be read (cut short by a crash or a full disk) is passed over for the one before, and ``notes`` say so."""
    directory = checkpoint_dir(output_dir)
    newest = last_checkpoint(output_dir)
    candidates = ([newest] if newest is not None else []) + sorted(directory.glob("iter_*.pt"), reverse=True)
    notes: list[str] = []
    for path in dict.fromkeys(candidates):
        try:
            state = load_training_checkpoint(path)
        except LtDistillError as exc:
            notes.append(f"skipping {path.name}: {exc}")
            continue
        if notes:
            notes.append(f"resuming from the previous intact checkpoint {path.name}")
        return path, state, notes
    if not notes:
        raise LtDistillError(f"--resume: {output_dir} has no checkpoint to resume from")
    raise LtDistillError(f"--resume: no intact checkpoint in {directory} ({'; '.join(notes)})")


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint that ``--resume`` can continue from (read with ``weights_only=True``)."""
    state = load_checkpoint(path)
    missing = [k for k in ("iteration", "optimizer", "scheduler") if k not in state]
    if missing:
        raise LtDistillError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                             "to start from its weights use --finetune-from")
    return state


def save_final_model(output_dir: str | Path, model: nn.Module, config: dict[str, Any],
                     categories: list[dict[str, Any]], iteration: int) -> Path:
    path = Path(output_dir) / FINAL_MODEL
    _atomic_save({"model": model.state_dict(), "config": config, "categories": categories,
                  "iteration": iteration}, path)
    return path


def load_finetune_weights(model: nn.Module, source: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every tensor of ``source`` whose name and shape match into ``model``.

    The run's vocabulary buffers (:data:`VOCABULARY_KEYS`) are always kept. Returns the names
    ``loaded``, ``mismatched`` (shape differs or vocabulary), ``missing`` (in the model only) and
    ``unexpected`` (in the source only)."""
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "mismatched": [], "missing": [], "unexpected": []}
    take = {}
    for name, tensor in source.items():
        if name not in own:
            report["unexpected"].append(name)
        elif name.split(".")[-1] in VOCABULARY_KEYS or tensor.shape != own[name].shape:
            report["mismatched"].append(f"{name} {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
        else:
            take[name] = tensor
            report["loaded"].append(name)
    report["missing"] = sorted(set(own) - set(source))
    model.load_state_dict(take, strict=False)
    return report


RESUME_CHANGES = "resume_changes.jsonl"


def record_resume_changes(output_dir: str | Path, iteration: int, changes: list[str]) -> Path:
    """Append the config changes a ``--resume --allow-config-changes`` applied at ``iteration`` to
    ``<output_dir>/resume_changes.jsonl`` (config.json and later checkpoints hold the new values)."""
    path = Path(output_dir) / RESUME_CHANGES
    with open(path, "a") as f:
        f.write(json.dumps({"iteration": int(iteration), "changes": changes}) + "\n")
    return path
