"""Matcher against brute force; focal, federated, KL and box losses against hand-computed values."""

import itertools
import math

import pytest
import torch

from lt_distill.pipeline.model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from lt_distill.pipeline.model.config import LossConfig
from lt_distill.pipeline.model.criterion import (
    SetCriterion,
    build_criterion,
    build_weight_dict,
    dn_indices,
    federated_classes,
    semantic_kl,
    sigmoid_focal_loss,
)
from lt_distill.pipeline.model.matcher import HungarianMatcher, focal_class_cost, hungarian_match


def brute_force(cost: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    """Best assignment of every target (column) to a distinct query (row) by enumeration."""
    q, n = cost.shape
    best = min(itertools.permutations(range(q), n), key=lambda rows: sum(cost[r, j].item() for j, r in enumerate(rows)))
    return sum(cost[r, j].item() for j, r in enumerate(best)), best


@pytest.mark.parametrize("seed", range(30))
def test_hungarian_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q = int(torch.randint(1, 7, (1,), generator=g))
    n = int(torch.randint(0, q + 1, (1,), generator=g))
    cost = torch.randn(q, n, generator=g, dtype=torch.float64)
    rows, cols = hungarian_match(cost)
    assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == n
    if n == 0:
        return
    best_cost, best_rows = brute_force(cost)
    assert cost[rows, cols].sum().item() == pytest.approx(best_cost, abs=1e-9)
    # Continuous random costs have a unique optimum: the assignment itself must agree.
    assert {int(c): int(r) for r, c in zip(rows, cols)} == dict(enumerate(best_rows))


@pytest.mark.parametrize("seed", range(10))
def test_matcher_on_predictions_equals_brute_force(seed):
    g = torch.Generator().manual_seed(100 + seed)
    q, c, n = 5, 4, 3
    outputs = {"pred_logits": torch.randn(1, q, c, generator=g), "pred_boxes": torch.rand(1, q, 4, generator=g) * 0.5 + 0.2}
    target = {"boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2, "labels": torch.tensor([0, 3, -1])}
    matcher = HungarianMatcher()
    (rows, cols), = matcher(outputs, [target])
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], target)
    # The cost is the documented weighted sum (focal 2 / L1 5 / GIoU 2).
    giou = generalized_box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"][0]), box_cxcywh_to_xyxy(target["boxes"]))
    l1 = (outputs["pred_boxes"][0][:, None] - target["boxes"][None]).abs().sum(-1)
    cls = focal_class_cost(outputs["pred_logits"][0], target["labels"], 0.25, 2.0)
    torch.testing.assert_close(cost, 2 * cls + 5 * l1 - 2 * giou)
    best_cost, _ = brute_force(cost)
    assert cost[rows, cols].sum().item() == pytest.approx(best_cost, abs=1e-5)


def test_focal_class_cost_by_hand_and_unknown_label_is_free():
    logits = torch.tensor([[0.0, 2.0]])
    p0, p1 = 0.5, 1 / (1 + math.exp(-2.0))
    pos = 0.25 * (1 - p1) ** 2 * -math.log(p1)
    neg = 0.75 * p1**2 * -math.log(1 - p1)
    cost = focal_class_cost(logits, torch.tensor([1, -1, 0]), 0.25, 2.0)
    expected0 = 0.25 * 0.25 * -math.log(p0) - 0.75 * 0.25 * -math.log(p0)
    torch.testing.assert_close(cost, torch.tensor([[pos - neg, 0.0, expected0]]), rtol=1e-5, atol=1e-6)


def test_matcher_handles_image_without_boxes():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    (rows, cols), = HungarianMatcher()(outputs, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    assert len(rows) == len(cols) == 0


def test_sigmoid_focal_loss_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    p = torch.sigmoid(logits).tolist()
    expected = [
        0.25 * (1 - p[0]) ** 2 * -math.log(p[0]),
        0.75 * p[1] ** 2 * -math.log(1 - p[1]),
        0.25 * (1 - p[2]) ** 2 * -math.log(p[2]),
    ]
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 0.25, 2.0), torch.tensor(expected))


def test_federated_classes_keep_present_and_follow_weights():
    weights = torch.tensor([1.0, 0.0, 4.0, 9.0, 0.0, 16.0]) ** 0.5  # image counts ** 0.5
    present = torch.tensor([4, 4, -1, 1])
    classes = federated_classes(present, 6, 4, weights, torch.Generator().manual_seed(0))
    assert classes.dtype == torch.int64 and classes.tolist() == sorted(classes.tolist())
    assert {1, 4} <= set(classes.tolist()) and len(classes) == 4
    # Weight-0 classes are only ever included when present; fewer candidates than asked: all of them.
    assert federated_classes(torch.tensor([], dtype=torch.long), 6, 50, weights).tolist() == [0, 2, 3, 5]
    # More classes present than the sample size: all present ones, nothing sampled.
    assert federated_classes(torch.tensor([0, 2, 3, 5]), 6, 2, weights).tolist() == [0, 2, 3, 5]
    # Sampling frequency ~ weight: one extra class among {0, 2, 3, 5} with weights 1, 2, 3, 4.
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([federated_classes(torch.tensor([1]), 6, 2, weights, g) for _ in range(4000)])
    extra = draws[draws != 1]
    freq = torch.bincount(extra, minlength=6).float() / len(extra)
    torch.testing.assert_close(freq[[0, 2, 3, 5]], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.025, rtol=0)
    assert freq[4] == 0


def test_semantic_kl_by_hand():
    soft = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    pred = torch.tensor([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]])
    expected = torch.tensor([0.5 * math.log(2) * 2, math.log(2)])
    torch.testing.assert_close(semantic_kl(pred.log(), soft), expected)
    # Equals torch's KL for rows without zeros.
    soft = torch.softmax(torch.randn(4, 5), -1)
    log_pred = torch.log_softmax(torch.randn(4, 5), -1)
    torch.testing.assert_close(
        semantic_kl(log_pred, soft).sum(), torch.nn.functional.kl_div(log_pred, soft, reduction="sum")
    )


def _identity_criterion(num_classes: int, fed: int | None = None, weights=None) -> SetCriterion:
    """A criterion whose matcher pairs query i with target i, so losses can be computed by hand."""

    class Identity(torch.nn.Module):
        def forward(self, outputs, targets):
            return [(torch.arange(len(t["boxes"])), torch.arange(len(t["boxes"]))) for t in targets]

    return SetCriterion(num_classes, Identity(), build_weight_dict(LossConfig(), 2), 0.25, 2.0, fed, weights)


def test_criterion_losses_by_hand():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.3, 0.1, -2.0], [-3.0, 1.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2], [0.7, 0.7, 0.2, 0.2]]])
    log_sem = torch.log_softmax(torch.randn(1, 3, 3), -1)
    target_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.35, 0.3, 0.1, 0.1]])
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 0.0]])
    targets = [{"boxes": target_boxes, "labels": torch.tensor([0, -1]), "soft_labels": soft,
                "soft_mask": torch.tensor([True, False])}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_semantic": log_sem}
    losses = _identity_criterion(3)(outputs, targets)
    num_boxes = 2.0

    # Classification: query 0 positive for class 0; query 1 (label -1) excluded; query 2 all negative.
    onehot = torch.zeros(3, 3)
    onehot[0, 0] = 1
    focal = sigmoid_focal_loss(logits[0], onehot)
    torch.testing.assert_close(losses["loss_ce"], (focal[0].sum() + focal[2].sum()) / num_boxes)
    # Boxes: the unknown-class box still counts.
    l1 = (boxes[0, :2] - target_boxes).abs().sum()
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, :2]), box_cxcywh_to_xyxy(target_boxes)))
    torch.testing.assert_close(losses["loss_bbox"], l1 / num_boxes)
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / num_boxes)
    # Semantic: only the row with a valid soft label.
    kl = (soft[0] * (soft[0].log() - log_sem[0, 0])).sum()
    torch.testing.assert_close(losses["loss_semantic"], kl / num_boxes)
    # Weighted total: 1 / 5 / 2 / 0.5.
    total = losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"] + 0.5 * losses["loss_semantic"]
    torch.testing.assert_close(_identity_criterion(3).weighted_total(losses), total)


def test_unknown_label_row_gets_no_classification_gradient():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}
    targets = [{"boxes": torch.rand(2, 4), "labels": torch.tensor([2, -1])}]
    _identity_criterion(4)(outputs, targets)["loss_ce"].backward()
    assert logits.grad[0, 1].abs().sum() == 0
    assert logits.grad[0, 0].abs().sum() > 0 and logits.grad[0, 2].abs().sum() > 0


def test_federated_loss_only_covers_sampled_classes():
    torch.manual_seed(0)
    c = 10
    logits = torch.randn(1, 3, c, requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}
    targets = [{"boxes": torch.rand(1, 4), "labels": torch.tensor([7])}]
    weights = torch.zeros(c)
    weights[[2, 3]] = 1.0  # only classes 2 and 3 can be sampled
    loss = _identity_criterion(c, fed=3, weights=weights)(outputs, targets)["loss_ce"]
    loss.backward()
    touched = (logits.grad[0].abs().sum(0) > 0).nonzero().flatten().tolist()
    assert touched == [2, 3, 7]
    onehot = torch.zeros(3, c)
    onehot[0, 7] = 1
    expected = sigmoid_focal_loss(logits[0, :, [2, 3, 7]], onehot[:, [2, 3, 7]]).sum()
    torch.testing.assert_close(loss, expected)


def test_dn_indices_point_at_positive_slots():
    targets = [{"boxes": torch.rand(2, 4)}, {"boxes": torch.rand(0, 4)}, {"boxes": torch.rand(3, 4)}]
    (src0, tgt0), (src1, _), (src2, tgt2) = dn_indices(targets, num_groups=2, group_size=6)
    assert src0.tolist() == [0, 1, 6, 7] and tgt0.tolist() == [0, 1, 0, 1]
    assert src1.numel() == 0
    assert src2.tolist() == [0, 1, 2, 6, 7, 8] and tgt2.tolist() == [0, 1, 2, 0, 1, 2]


def test_build_criterion_weights_and_names():
    crit = build_criterion(LossConfig(), num_classes=5, dec_layers=3, class_image_counts=torch.tensor([4, 9, 0, 1, 16]))
    torch.testing.assert_close(crit.fed_class_weights, torch.tensor([2.0, 3.0, 0.0, 1.0, 4.0]))
    w = crit.weight_dict
    assert (w["loss_ce"], w["loss_bbox"], w["loss_giou"], w["loss_semantic"]) == (1.0, 5.0, 2.0, 0.5)
    for suffix in ["_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]:
        assert w["loss_giou" + suffix] == 2.0
    with pytest.raises(KeyError, match="loss_foo"):
        crit.weighted_total({"loss_foo": torch.tensor(1.0)})
