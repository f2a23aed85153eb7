"""BACL (Qi et al., arXiv 2308.02213): background channel, FCBL and FHM, in two training stages.

Mapped onto DINO as ``../shared/METHODS.md`` fixes it; where that page is silent the official code
(github Tianhao-Qi/BACL: ``mmdet/models/losses/fcbl.py``, ``roi_heads/bbox_heads/fhm_convfc_bbox_head.py``)
decides, and the comments say so.

* **Background channel** (:class:`BackgroundHead`): ``Linear(D, 1)`` on every decoder layer's
  features; trained on the final layer (target 1 on unmatched queries, 0 on matched ones); detections
  are scored ``p_k = sigmoid(z_k) * (1 - sigmoid(z_bg))`` (Eq. 5).
* **Stage 1** (``stage = "representation"``): the normal detector plus the background channel.
* **Stage 2** (``stage = "classifier"``, started with ``--init-from`` the stage-1 model): only the
  class head and the background channel train; no denoising queries, LVIS only (no classification
  shards), no repeat-factor sampling; FCBL and FHM from the first step.
* **FCBL** (:class:`BACLLoss`, Eq. 6-9) inside the federated focal loss of the final layer: margins
  ``delta_ij = alpha * ln(max(M_ij, 1e-3) / max(M_ji, 1e-3))`` on the negatives of a matched query of
  class i, and weights ``w_j = 1`` iff ``p_j >= p_i`` or ``p_j >= prob_thr``.
* **Confusion matrix** ``M_ij = sum_n softmax(z_n)_j [y_n = i] / N_i`` over the final layer's matched
  queries and the hallucinated features, cumulative over stage 2, all-reduced over ranks, updated after
  the loss (a step uses the matrix of the step before).
* **FHM** (Eq. 10-13): per class seen in a batch, the mean and unbiased variance of its features (each
  ground truth's matched query re-anchored at 16 jittered boxes through the frozen decoder; sums
  all-reduced so every rank holds the same statistics), running averages with ``fhm_decay``; then
  ``fhm_num_classes`` classes drawn with replacement, ``P(c) ~ 1 - M_cc``, ``fhm_num_features``
  features ``mu + sigma * eps`` each, as extra positives of the class and background heads.

The confusion matrix and the statistics are buffers of the criterion hook, so they are saved with
training checkpoints and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..model.criterion import sigmoid_focal_loss
from .base import CriterionHook, Method, ModelExtension, TrainingStage

# The 16 sign patterns of (eta1, ..., eta4) for the jittered boxes, one row each.
SIGN_PATTERNS = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=4)))


@dataclasses.dataclass
class BACLOptions:
    stage: Literal["representation", "classifier"] = "representation"
    bg_weight: float = 1.0  # background-channel loss
    bg_prior_prob: float = 0.5  # initial sigmoid(z_bg): the same factor for every query, ranking unchanged
    fcbl_alpha: float = 0.85  # margin scale; 0 = no margins
    fcbl_prob_thr: float = 0.7
    fcbl_reweight: bool = True  # False: every negative weighs 1
    fhm: bool = True
    fhm_weight: float = 1.0
    fhm_num_classes: int = 8  # classes drawn per step (with replacement)
    fhm_num_features: int = 12  # features per drawn class
    fhm_decay: float = 0.1  # mu <- (1 - decay) mu + decay u
    fhm_jitter: float = 1 / 6  # box sides move by up to this fraction of the box's width / height
    # Stage 2 trains only these (parameter name prefixes of the detector).
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["class_head.", "extensions.background."])

    def __post_init__(self) -> None:
        if self.fcbl_alpha < 0 or self.bg_weight < 0 or self.fhm_weight < 0:
            raise ValueError("fcbl_alpha, bg_weight and fhm_weight must be >= 0")
        if not 0 < self.fcbl_prob_thr < 1 or not 0 < self.bg_prior_prob < 1 or not 0 < self.fhm_decay <= 1:
            raise ValueError("fcbl_prob_thr and bg_prior_prob must be in (0, 1), fhm_decay in (0, 1]")
        if self.fhm_num_classes < 1 or self.fhm_num_features < 1 or not 0 < self.fhm_jitter < 0.5:
            raise ValueError("fhm_num_classes and fhm_num_features must be >= 1, fhm_jitter in (0, 0.5)")


class BackgroundHead(ModelExtension):
    """``pred_bg`` ``(B, Q, 1)``: the background logit of every query; Eq. 5 scoring."""

    def __init__(self, hidden_dim: int, prior_prob: float = 0.5, needs_views: bool = False):
        super().__init__()
        self.linear = nn.Linear(hidden_dim, 1)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.constant_(self.linear.bias, math.log(prior_prob / (1 - prior_prob)))
        self.needs_views = needs_views  # stage 2: FHM re-anchors queries through the decoder

    def forward(self, hidden: torch.Tensor, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pred_bg": self.linear(hidden)}

    def score(self, outputs: dict[str, Any], prob: torch.Tensor) -> torch.Tensor:
        return prob * (1 - outputs["pred_bg"].float().sigmoid())


def fcbl_margins(confusion: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``delta`` ``(N, C)`` for ground-truth classes ``labels`` ``(N,)``: ``alpha * ln(max(M_ij, 1e-3) /
    max(M_ji, 1e-3))`` with i = the label (official code: ``cm[label, :] / cm[:, label].t()``)."""
    return alpha * (confusion[labels].clamp(min=1e-3) / confusion[:, labels].t().clamp(min=1e-3)).log()


def fcbl_weights(prob: torch.Tensor, labels: torch.Tensor, prob_thr: float) -> torch.Tensor:
    """``w`` ``(N, C)`` float: 1 where ``prob_j >= prob_label`` or ``prob_j >= prob_thr`` (the label's own
    channel always), else 0. ``prob`` are the Eq. 5 scores of the N matched queries."""
    own = prob.gather(1, labels[:, None])
    return ((prob >= own) | (prob >= prob_thr)).to(prob.dtype)


def jitter_boxes(boxes: torch.Tensor, frac: float = 1 / 6, generator: torch.Generator | None = None) -> torch.Tensor:
    """16 views of each xyxy box ``(n, 4)`` in [0, 1] -> ``(n, 16, 4)`` xyxy, clipped to [0, 1]:
    ``[x1 + e1 w f, y1 + e2 h f, x2 + e3 w f, y2 + e4 h f]``, ``e = s * U(0, 1)`` for the 16 sign
    patterns ``s`` (one view each), f = ``frac``."""
    n = boxes.shape[0]
    u = torch.rand(n, 16, 4, generator=generator, dtype=boxes.dtype).to(boxes.device)
    eta = SIGN_PATTERNS.to(boxes)[None] * u
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    scale = torch.stack([w, h, w, h], -1)[:, None] * frac
    return (boxes[:, None] + eta * scale).clamp(0, 1)


def sample_classes(confusion: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` classes drawn with replacement with ``P(c) ~ 1 - M_cc`` (int64 ``(num,)``; empty when every
    class is classified perfectly)."""
    weight = (1 - confusion.diagonal()).clamp(min=0).float().cpu()
    if weight.sum() <= 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.multinomial(weight, num, replacement=True, generator=generator)


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


class BACLLoss(CriterionHook):
    """The background-channel loss (both stages) and, in stage 2, FCBL, the confusion matrix and FHM.

    Buffers (checkpointed): ``cm_numerator`` ``(C, C)`` and ``cm_count`` ``(C,)`` of the confusion
    matrix, ``feat_mean`` / ``feat_var`` ``(C, D)`` and ``feat_seen`` ``(C,)`` of FHM."""

    def __init__(self, num_classes: int, hidden_dim: int, options: BACLOptions, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        self.options = options
        self.classifier_stage = options.stage == "classifier"
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.weights = {"loss_bg": options.bg_weight}
        if self.classifier_stage and options.fhm:
            self.weights["loss_fhm"] = options.fhm_weight
        self.register_buffer("cm_numerator", torch.zeros(num_classes, num_classes))
        self.register_buffer("cm_count", torch.zeros(num_classes))
        self.register_buffer("feat_mean", torch.zeros(num_classes, hidden_dim))
        self.register_buffer("feat_var", torch.zeros(num_classes, hidden_dim))
        self.register_buffer("feat_seen", torch.zeros(num_classes))

    def confusion(self) -> torch.Tensor:
        """``M`` ``(C, C)``: row i = mean softmax over the classes of the positives of class i (zeros
        for classes not seen yet)."""
        return self.cm_numerator / self.cm_count.clamp(min=1)[:, None]

    # -- FCBL ---------------------------------------------------------------------------------------
    def _fcbl(self, logits: torch.Tensor, bg: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Margins and weights ``(N, C)`` of N positives (logits ``(N, C)``, bg logits ``(N,)``)."""
        o = self.options
        margins = fcbl_margins(self.confusion(), labels, o.fcbl_alpha)
        if not o.fcbl_reweight:
            return margins, None
        prob = logits.detach().sigmoid() * (1 - bg.detach().sigmoid())[:, None]
        return margins, fcbl_weights(prob, labels, o.fcbl_prob_thr)

    def adjust_class_loss(self, outputs, batch, src, labels, suffix):
        if not self.classifier_stage or suffix != "":  # FCBL: final decoder layer, stage 2
            return None, None
        logits = outputs["pred_logits"]
        known = labels >= 0
        b, s, y = batch[known], src[known], labels[known]
        margins, weights = self._fcbl(logits[b, s], outputs["pred_bg"][b, s, 0], y)
        offset = torch.zeros_like(logits)
        offset[b, s] = margins.to(logits.dtype)
        weight = None
        if weights is not None:
            weight = torch.ones_like(logits)
            weight[b, s] = weights.to(logits.dtype)
        return offset, weight

    # -- extra terms --------------------------------------------------------------------------------
    def extra_losses(self, outputs, targets, indices, num_boxes, classes):
        bg = outputs["pred_bg"][..., 0]  # (B, Q)
        matched = torch.zeros_like(bg)
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(bg.device)
        src = torch.cat([src for src, _ in indices]).to(bg.device)
        matched[batch, src] = 1
        # Choice: a focal loss (no alpha) like the class channels: ~900 unmatched queries per image would
        # swamp a plain BCE normalised by the number of boxes.
        losses = {"loss_bg": sigmoid_focal_loss(bg, 1 - matched, -1, self.focal_gamma).sum() / num_boxes}
        if not self.classifier_stage:
            return losses
        labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)])
        labels = labels.to(bg.device)
        known = labels >= 0
        pos_logits = outputs["pred_logits"][batch[known], src[known]]
        pos_labels = labels[known]
        if self.options.fhm:
            if self.training:
                self._update_statistics(outputs, targets, indices)
            fhm_loss, fhm_logits, fhm_labels = self._fhm_loss(outputs, num_boxes, classes)
            losses["loss_fhm"] = fhm_loss
            pos_logits = torch.cat([pos_logits, fhm_logits])
            pos_labels = torch.cat([pos_labels, fhm_labels])
        if self.training:  # after the loss: this step used the matrix of the step before
            self._update_confusion(pos_logits.detach(), pos_labels)
        return losses

    def _update_confusion(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        numerator = torch.zeros_like(self.cm_numerator)
        numerator.index_add_(0, labels, F.softmax(logits.float(), dim=-1))
        count = torch.bincount(labels, minlength=self.cm_count.numel()).to(self.cm_count)
        _all_reduce(numerator, count)
        self.cm_numerator += numerator
        self.cm_count += count

    def _update_statistics(self, outputs: dict[str, Any], targets: list[dict], indices: list) -> None:
        """Per-class mean / unbiased variance of the 16 re-anchored views of every matched ground truth of a
        known class, summed over ranks, folded into the running statistics."""
        rows = []
        for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
            labels = t["labels"][tgt.to(t["labels"].device)].to(src.device)
            keep = labels >= 0
            boxes = box_cxcywh_to_xyxy(t["boxes"][tgt.to(t["boxes"].device)][keep.to(t["boxes"].device)].float())
            rows.append((b, src[keep], labels[keep], jitter_boxes(boxes, self.options.fhm_jitter)))
        num_views = max((len(r[1]) * 16 for r in rows), default=0)
        c, d = self.feat_mean.shape
        # float64 sums: the variance is a difference of two of them
        dev = self.feat_mean.device
        s1, s2 = (torch.zeros(c, d, dtype=torch.float64, device=dev) for _ in range(2))
        n = torch.zeros(c, dtype=torch.float64, device=dev)
        if num_views:
            bsz = len(targets)
            query_index = torch.zeros(bsz, num_views, dtype=torch.int64)
            view_boxes = torch.full((bsz, num_views, 4), 0.5)
            for b, src, _, jittered in rows:
                k = len(src) * 16
                query_index[b, :k] = src.cpu().repeat_interleave(16)
                view_boxes[b, :k] = box_xyxy_to_cxcywh(jittered.reshape(-1, 4)).cpu()
            device = outputs["pred_logits"].device
            feats = outputs["decode_views"](query_index.to(device), view_boxes.to(device)).double()
            for b, src, labels, _ in rows:
                f = feats[b, : len(src) * 16]
                lab = labels.to(device).repeat_interleave(16)
                s1.index_add_(0, lab, f)
                s2.index_add_(0, lab, f * f)
                n.index_add_(0, lab, torch.ones_like(lab, dtype=n.dtype))
        _all_reduce(s1, s2, n)  # every rank folds the same batch statistics in
        seen = n > 1
        if not seen.any():
            return
        cnt = n[seen][:, None]
        mean = s1[seen] / cnt
        var = ((s2[seen] - cnt * mean * mean) / (cnt - 1)).clamp(min=0)  # unbiased
        first = self.feat_seen[seen] == 0
        decay = self.options.fhm_decay
        old_mean, old_var = self.feat_mean[seen], self.feat_var[seen]
        mean, var = mean.to(old_mean), var.to(old_var)
        self.feat_mean[seen] = torch.where(first[:, None], mean, (1 - decay) * old_mean + decay * mean)
        self.feat_var[seen] = torch.where(first[:, None], var, (1 - decay) * old_var + decay * var)
        self.feat_seen[seen] += 1

    def hallucinate(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(K, D)`` and their classes ``(K,)``: classes drawn ``P(c) ~ 1 - M_cc``; a drawn class
        without statistics yet gives nothing (official code), the others ``fhm_num_features`` features
        ``mu + sigma * eps`` each."""
        o = self.options
        drawn = sample_classes(self.confusion(), o.fhm_num_classes, generator).to(self.feat_seen.device)
        drawn = drawn[self.feat_seen[drawn] > 0]
        labels = drawn.repeat_interleave(o.fhm_num_features)
        eps = torch.randn(len(labels), self.feat_mean.shape[1], generator=generator).to(self.feat_mean)
        return self.feat_mean[labels] + self.feat_var[labels].sqrt() * eps, labels

    def _fhm_loss(self, outputs: dict[str, Any], num_boxes: float, classes: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, labels = self.hallucinate()
        heads = outputs["head_outputs"](feats)
        logits, bg = heads["pred_logits"].float(), heads["pred_bg"][..., 0].float()
        if len(labels) == 0:  # nothing to hallucinate yet: a zero that keeps the heads in the graph
            return logits.sum() * 0.0 + bg.sum() * 0.0, logits.detach(), labels
        margins, weights = self._fcbl(logits, bg, labels)
        onehot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        weights = torch.ones_like(logits) if weights is None else weights
        adjusted = logits + margins
        if classes is not None:  # the federated subset, plus the hallucinated classes themselves
            subset = torch.unique(torch.cat([classes.to(labels.device), labels]))
            adjusted, onehot, weights = adjusted[:, subset], onehot[:, subset], weights[:, subset]
        cls = (sigmoid_focal_loss(adjusted, onehot, self.focal_alpha, self.focal_gamma) * weights).sum()
        bg_loss = sigmoid_focal_loss(bg, torch.zeros_like(bg), -1, self.focal_gamma).sum()
        return (cls + bg_loss) / num_boxes, logits.detach(), labels


class BACL(Method):
    name = "bacl"
    Options = BACLOptions
    description = "balanced classification: background channel, FCBL + FHM in a classifier stage"

    def model_overrides(self) -> dict[str, Any]:
        return {"denoising": {"dn_number": 0}} if self.options.stage == "classifier" else {}

    def data_overrides(self) -> dict[str, Any]:
        # Stage 2 re-balances the classifier on the detection data as it is: LVIS only, no RFS.
        return {"cls_shards": "", "rfs_threshold": 0.0} if self.options.stage == "classifier" else {}

    def extensions(self, hidden_dim: int, num_classes: int) -> dict[str, ModelExtension]:
        fhm = self.options.stage == "classifier" and self.options.fhm
        return {"background": BackgroundHead(hidden_dim, self.options.bg_prior_prob, needs_views=fhm)}

    def criterion_hooks(self, num_classes: int, hidden_dim: int, loss: Any) -> dict[str, CriterionHook]:
        return {"bacl": BACLLoss(num_classes, hidden_dim, self.options, loss.focal_alpha, loss.focal_gamma)}

    def prepare_model(self, model: nn.Module) -> None:
        if self.options.stage != "classifier":
            return
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in self.options.trainable))

    def training_stages(self) -> list[TrainingStage]:
        # The demo gives stage 2 half of stage 1's iterations (the paper: 12 + 12 epochs).
        return [TrainingStage("representation", {"method_options": {"stage": "representation"}}),
                TrainingStage("classifier", {"method_options": {"stage": "classifier"}}, iters_fraction=0.5)]
