"""Checkpoints of the detector and the inference export.

A checkpoint is a dict with ``"model"`` (state_dict) and ``"config"``: either a :class:`ModelConfig`
as plain data (``lt_distill.config.to_dict``) or a larger config whose ``"model"`` section is one
(the training config). Everything is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from ...config import from_dict, to_dict
from ...errors import LtDistillError
from .build import build_detector
from .config import ModelConfig, with_legacy_values
from .dino import DINO

SEMANTIC_PREFIX = "semantic_head."
BRANCH_PREFIX = "branch."  # a method's training-only branch (CLIS tile queries, key encoder, queue)


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: ModelConfig, **extra: Any) -> None:
    """Write ``{"model": state_dict, "config": to_dict(cfg), **extra}``."""
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), **extra}, Path(path))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LtDistillError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, which would run arbitrary code: never pass it on.
        raise LtDistillError(f"{path} is not an lt-distill checkpoint: it holds Python objects other than "
                             "tensors and plain values, and checkpoints are only read as weights") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LtDistillError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({first})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise LtDistillError(f"{path} is not an lt-distill checkpoint (needs 'model' and 'config' entries)")
    return ckpt


def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    return config["model"] if isinstance(config.get("model"), dict) else config


def model_config_from_checkpoint(ckpt: dict[str, Any]) -> ModelConfig:
    """The checkpoint's model config; keys it predates take their old values (``LEGACY_VALUES``), so an
    older checkpoint is rebuilt as it was trained."""
    return from_dict(ModelConfig, with_legacy_values(_model_section(ckpt["config"])), "model")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DINO:
    """Rebuild the detector of a checkpoint (text embeddings come from its state_dict), in eval mode, with
    the extension modules of the checkpoint's method (``config["method"]``; none: RichSem)."""
    from ..methods import method_from_config  # methods build on the model package

    ckpt = load_checkpoint(path)
    cfg = model_config_from_checkpoint(ckpt)
    # The state_dict holds the backbone weights: don't require the original weights file.
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights=None))
    state = ckpt["model"]
    if "text_embeddings" not in state:
        raise LtDistillError(f"checkpoint {path} has no text_embeddings in its model state")
    model = build_detector(cfg, torch.zeros_like(state["text_embeddings"]), method_from_config(ckpt["config"]))
    state = {k: v for k, v in state.items() if not k.startswith(BRANCH_PREFIX)}  # training only
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LtDistillError(f"checkpoint {path} does not fit its config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def export_inference_model(ckpt_path: str | Path, out_path: str | Path) -> list[str]:
    """Write an inference checkpoint without the semantic branch and any method's training branch
    (``branch.*``: CLIS's tile queries, projection W, momentum copies and queue); returns the dropped
    state_dict keys.

    Both only feed the training loss, so predictions are unchanged. Optimizer and other training
    state are not copied.
    """
    ckpt = load_checkpoint(ckpt_path)
    cfg = model_config_from_checkpoint(ckpt)  # validates the config before anything is written
    semantic = sorted(k for k in ckpt["model"] if k.startswith(SEMANTIC_PREFIX))
    if not cfg.head.semantic_branch and semantic:
        raise LtDistillError(f"{ckpt_path}: config says no semantic branch but the state has {semantic[:3]}")
    dropped = semantic + sorted(k for k in ckpt["model"] if k.startswith(BRANCH_PREFIX))
    config = copy.deepcopy(ckpt["config"])
    _model_section(config).setdefault("head", {})["semantic_branch"] = False
    model_state = {k: v for k, v in ckpt["model"].items() if not k.startswith((SEMANTIC_PREFIX, BRANCH_PREFIX))}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model_state, "config": config}, out_path)
    return dropped
