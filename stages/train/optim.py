"""AdamW with DINO's (or Deformable DETR's) parameter groups, and the step-decay schedule."""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig


def _matches(name: str, patterns: list[str]) -> bool:
    return any(p in name for p in patterns)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups, each with a ``"name"`` for logging. ``cfg.param_groups``:

    * ``"dino"`` (DINO / RichSem ``param_dict_type='default'``, util/get_param_dicts.py): two groups,
      the backbone (``backbone_names``) at ``lr_backbone`` and everything else at ``lr``;
    * ``"deformable_detr"`` (Deformable DETR; RichSem's ``ddetr_in_mmdet``): a third group, the
      deformable attention's sampling offsets and reference points (``linear_proj_names``), at
      ``lr * lr_linear_proj_mult``.

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped."""
    split_linear_proj = cfg.param_groups == "deformable_detr"
    groups: dict[str, list[nn.Parameter]] = {"default": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, cfg.backbone_names):
            groups["backbone"].append(p)
        elif split_linear_proj and _matches(name, cfg.linear_proj_names):
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    lrs = {"default": cfg.lr, "backbone": cfg.lr_backbone, "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, cfg: OptimConfig) -> float:
    """Multiplier of every group's base lr at ``iteration`` (0-based step index): linear warm-up from
    ``warmup_factor`` over ``warmup_iters``, times ``lr_gamma`` per milestone of ``lr_drop`` reached."""
    factor = cfg.lr_gamma ** sum(iteration >= m for m in cfg.lr_drop)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step; its state (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
