"""Hungarian matching between predictions and ground truth (DETR), with DINO's focal class cost."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment for a ``(num_queries, num_targets)`` cost matrix.

    Returns int64 ``(query_indices, target_indices)``, each of length ``min(num_queries, num_targets)``,
    sorted by query index.
    """
    if not torch.isfinite(cost).all():
        raise ValueError("matching cost contains NaN or inf (diverged predictions?)")
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``(Q, C)`` logits, ``(n,)`` labels -> ``(Q, n)`` cost: focal loss of "positive" minus "negative".

    A label of -1 (class unknown) costs 0, so such boxes are matched on geometry alone.
    """
    prob = logits[:, labels.clamp(min=0)].sigmoid()  # only the target classes: C may be 1203
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return (pos - neg) * (labels >= 0)[None].to(prob.dtype)


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth box of an image to one query (costs: focal class, L1 box, GIoU)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: dict) -> torch.Tensor:
        """One image: logits ``(Q, C)``, boxes ``(Q, 4)`` cxcywh, target dict -> cost ``(Q, n)``."""
        tgt_boxes, labels = target["boxes"], target["labels"]
        cost_class = focal_class_cost(logits.float(), labels, self.focal_alpha, self.focal_gamma)
        cost_bbox = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes.float()), box_cxcywh_to_xyxy(tgt_boxes.float()))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """outputs: "pred_logits" ``(B, Q, C)``, "pred_boxes" ``(B, Q, 4)``; targets: list of B dicts with
        "boxes" ``(n, 4)`` cxcywh and "labels" ``(n,)``. Returns per image (query indices, target indices)."""
        indices = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            if len(target["boxes"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            indices.append(hungarian_match(self.cost_matrix(logits, boxes, target)))
        return indices
