"""Set criterion: named losses of the detector, weighted in one place (DETR's ``SetCriterion``).

Losses, each normalised by the number of ground-truth boxes in the batch (averaged over ranks):

* ``loss_ce``: sigmoid focal loss (alpha 0.25, gamma 2) on the language-classifier logits. With the
  federated loss it only covers the batch's classes plus classes sampled with weights
  ``image_count ** 0.5`` (50 in total), drawn anew for every classification loss of the step
  (``fed_sample="per_call"``, Detic / RichSem) or once per step (``"per_step"``); a matched box with
  label -1 (class unknown) contributes no classification loss at all, unmatched queries are negatives.
* ``loss_bbox`` (L1) and ``loss_giou`` on the matched pairs, whatever the label.
* ``loss_semantic``: KL(soft label || semantic prediction) summed over classes, over matched queries
  whose target has a soft label (``soft_mask``).

They are computed for the last decoder layer (``loss_ce``), each earlier decoder layer (``loss_ce_0``,
...), the encoder proposals (``loss_ce_enc``; no semantic loss) and the denoising queries
(``loss_ce_dn``, ``loss_ce_dn_0``, ...; positives are matched to their own box, normalised by
``num_boxes * num_groups``). ``loss_semantic`` exists wherever the outputs carry ``pred_semantic``:
by default the last decoder layer and the last denoising layer only (``loss_semantic``,
``loss_semantic_dn``; RichSem ``distill_aux_layers=False``). :meth:`SetCriterion.weighted_total`
applies :attr:`weight_dict`.

A method adds its own terms through ``hooks`` (``pipeline.methods.CriterionHook``): offsets and weights
inside the focal class loss, and extra named losses from the final layer (their weights join
``weight_dict``; their buffers are part of ``state_dict()``, saved with training checkpoints).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .config import LossConfig
from .matcher import HungarianMatcher

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise focal loss (Lin et al. 2017) of logits against {0, 1} targets, no reduction."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def federated_classes(
    present: torch.Tensor,
    num_classes: int,
    num_sample: int,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Classes the classification loss covers this step (Detic's federated loss), sorted int64.

    All classes in ``present`` (labels >= 0 of the batch), topped up to ``num_sample`` by sampling
    without replacement with probability proportional to ``weights`` (uniform if None); classes with
    weight 0 are never sampled.
    """
    present = torch.unique(present[present >= 0]).cpu()
    prob = torch.ones(num_classes) if weights is None else weights.detach().float().cpu().clone()
    prob[present] = 0
    extra = min(num_sample - len(present), int((prob > 0).sum()))
    if extra > 0:
        sampled = torch.multinomial(prob, extra, replacement=False, generator=generator)
        present = torch.cat([present, sampled])
    return torch.sort(present).values


def semantic_kl(log_pred: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """KL(soft || pred) per row: ``sum_c soft_c * (log soft_c - log_pred_c)`` with 0 log 0 = 0."""
    return (torch.special.xlogy(soft, soft) - soft * log_pred).sum(-1)


def _num_boxes(targets: list[dict], device: torch.device) -> float:
    num = torch.tensor([float(sum(len(t["boxes"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


def _flat_indices(indices: Indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


def _gather_targets(targets: list[dict], indices: Indices, key: str, device: torch.device) -> torch.Tensor:
    return torch.cat([t[key][tgt.to(t[key].device)] for t, (_, tgt) in zip(targets, indices)]).to(device)


def dn_indices(targets: list[dict], num_groups: int, group_size: int) -> Indices:
    """Positive denoising query of target j in group g sits at ``g * group_size + j`` (see denoising.py)."""
    indices = []
    for t in targets:
        n = len(t["boxes"])
        tgt = torch.arange(n).repeat(num_groups)
        src = (torch.arange(num_groups) * group_size).repeat_interleave(n) + tgt
        indices.append((src, tgt))
    return indices


class _FederatedClasses:
    """The class subset of each classification loss of one step (None without the federated loss).

    Per call, every subset is drawn from a generator seeded by one draw from the global RNG at the
    start of the step: the step consumes the same amount of global randomness however many losses
    it has, and a resumed run (global RNG restored) draws the same subsets."""

    def __init__(self, criterion: "SetCriterion", targets: list[dict]) -> None:
        self.num_sample = criterion.fed_num_classes
        self.num_classes, self.weights = criterion.num_classes, criterion.fed_class_weights
        self.generator, self.shared = None, None
        if self.num_sample is None:
            return
        self.present = torch.cat([t["labels"].cpu() for t in targets]) if targets else torch.zeros(0, dtype=torch.int64)
        if criterion.fed_per_call:
            seed = int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator().manual_seed(seed)
        else:
            self.shared = self._draw()

    def _draw(self) -> torch.Tensor:
        return federated_classes(self.present, self.num_classes, self.num_sample, self.weights, self.generator)

    def __call__(self) -> torch.Tensor | None:
        if self.num_sample is None:
            return None
        return self.shared if self.shared is not None else self._draw()


class SetCriterion(nn.Module):
    """Computes the loss dict of :class:`DINO` outputs against targets (see module docstring)."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        fed_num_classes: int | None = 50,
        fed_class_weights: torch.Tensor | None = None,
        hooks: dict[str, nn.Module] | None = None,
        fed_per_call: bool = True,
    ):
        super().__init__()
        self.hooks = nn.ModuleDict(hooks or {})
        weight_dict = dict(weight_dict)
        for hook in self.hooks.values():
            weight_dict.update(hook.weights)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.fed_num_classes = fed_num_classes
        self.fed_per_call = fed_per_call
        if fed_class_weights is not None and fed_class_weights.shape != (num_classes,):
            raise ValueError(f"fed_class_weights has shape {tuple(fed_class_weights.shape)}, expected ({num_classes},)")
        self.register_buffer("fed_class_weights", fed_class_weights, persistent=False)

    # -- single losses ----------------------------------------------------------------------------
    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                    classes: torch.Tensor | None, suffix: str = "") -> torch.Tensor:
        logits = outputs["pred_logits"]
        batch, src = _flat_indices(indices, logits.device)
        labels = _gather_targets(targets, indices, "labels", logits.device)
        weight = None
        for hook in self.hooks.values():  # a method's margins / element weights (e.g. BACL's FCBL)
            offset, w = hook.adjust_class_loss(outputs, batch, src, labels, suffix)
            if offset is not None:
                logits = logits + offset
            if w is not None:
                weight = w if weight is None else weight * w
        known = labels >= 0
        onehot = torch.zeros_like(logits)
        onehot[batch[known], src[known], labels[known]] = 1
        row_weight = torch.ones(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        row_weight[batch[~known], src[~known]] = 0  # class unknown: no classification loss
        element_weight = row_weight[..., None] if weight is None else row_weight[..., None] * weight
        if classes is not None:
            classes = classes.to(logits.device)
            logits, onehot = logits[..., classes], onehot[..., classes]
            if weight is not None:
                element_weight = element_weight[..., classes]
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)
        return (loss * element_weight).sum() / num_boxes

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        pred = outputs["pred_boxes"]
        batch, src = _flat_indices(indices, pred.device)
        src_boxes = pred[batch, src]
        tgt_boxes = _gather_targets(targets, indices, "boxes", pred.device).to(pred.dtype)
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        return {
            "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def loss_semantic(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> torch.Tensor:
        log_pred = outputs["pred_semantic"]
        if any("soft_labels" not in t for t in targets):
            return log_pred.sum() * 0.0  # no soft labels in this batch
        batch, src = _flat_indices(indices, log_pred.device)
        soft = _gather_targets(targets, indices, "soft_labels", log_pred.device).to(log_pred.dtype)
        valid = _gather_targets(targets, indices, "soft_mask", log_pred.device).bool()
        kl = semantic_kl(log_pred[batch, src], soft)
        return (kl * valid).sum() / num_boxes

    def _losses(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float,
                classes: "_FederatedClasses", suffix: str) -> dict[str, torch.Tensor]:
        losses = {"loss_ce": self.loss_labels(outputs, targets, indices, num_boxes, classes(), suffix)}
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if "pred_semantic" in outputs:
            losses["loss_semantic"] = self.loss_semantic(outputs, targets, indices, num_boxes)
        return {k + suffix: v for k, v in losses.items()}

    # -- all of them ------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs of :class:`DINO`; targets as documented in ``dino.py``. Returns named, unweighted losses."""
        device = outputs["pred_logits"].device
        num_boxes = _num_boxes(targets, device)
        classes = _FederatedClasses(self, targets)

        final_indices = self.matcher(outputs, targets)
        losses = self._losses(outputs, targets, final_indices, num_boxes, classes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, self.matcher(aux, targets), num_boxes, classes, f"_{i}"))
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            losses.update(self._losses(enc, targets, self.matcher(enc, targets), num_boxes, classes, "_enc"))
        dn = outputs.get("dn_outputs")
        if dn is not None:
            indices = dn_indices(targets, dn["num_groups"], dn["group_size"])
            dn_boxes = num_boxes * dn["num_groups"]
            losses.update(self._losses(dn, targets, indices, dn_boxes, classes, "_dn"))
            for i, aux in enumerate(dn.get("aux_outputs", [])):
                losses.update(self._losses(aux, targets, indices, dn_boxes, classes, f"_dn_{i}"))
        final = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs", "dn_outputs")}
        for hook in self.hooks.values():
            losses.update(hook.extra_losses(final, targets, final_indices, num_boxes, classes()))
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: ``sum_k weight_dict[k] * losses[k]``."""
        unknown = sorted(set(losses) - set(self.weight_dict))
        if unknown:
            raise KeyError(f"no weight for loss(es) {unknown}")
        return sum(self.weight_dict[k] * v for k, v in losses.items())


def build_weight_dict(cfg: LossConfig, dec_layers: int, semantic_aux_layers: bool = False) -> dict[str, float]:
    """Weights of every loss name the criterion can produce (DESIGN §5: cls 1 / L1 5 / GIoU 2, semantic 0.5).
    The semantic loss only where the model emits it: last decoder and last denoising layer, or every
    decoder and denoising layer with ``semantic_aux_layers``."""
    base = {"loss_ce": cfg.cls_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
    aux = [f"_{i}" for i in range(dec_layers - 1)] + [f"_dn_{i}" for i in range(dec_layers - 1)]
    weights = {k + s: w for s in ["", "_enc", "_dn", *aux] for k, w in base.items()}
    for s in ["", "_dn", *(aux if semantic_aux_layers else [])]:
        weights["loss_semantic" + s] = cfg.semantic_weight
    return weights


def build_criterion(cfg: LossConfig, num_classes: int, dec_layers: int,
                    class_image_counts: torch.Tensor | None = None,
                    hooks: dict[str, nn.Module] | None = None, semantic_aux_layers: bool = False) -> SetCriterion:
    """Matcher + criterion from the loss config; ``class_image_counts`` ``(C,)`` drives federated sampling;
    ``hooks``: a method's extra loss terms (``pipeline.methods``); ``semantic_aux_layers``: whether the
    model emits the semantic branch on every layer (weights for each)."""
    matcher = HungarianMatcher(cfg.cost_class, cfg.cost_bbox, cfg.cost_giou, cfg.focal_alpha, cfg.focal_gamma)
    weights = None
    if class_image_counts is not None:
        weights = torch.as_tensor(class_image_counts, dtype=torch.float32) ** cfg.fed_weight_power
    return SetCriterion(
        num_classes,
        matcher,
        build_weight_dict(cfg, dec_layers, semantic_aux_layers),
        cfg.focal_alpha,
        cfg.focal_gamma,
        fed_num_classes=cfg.fed_num_classes if cfg.fed_loss else None,
        fed_class_weights=weights,
        hooks=hooks,
        fed_per_call=cfg.fed_sample == "per_call",
    )
