"""BACL: the properties ../shared/METHODS.md lists (FCBL, confusion matrix, FHM, stage-2 freezing, Eq. 5),
exact resume and 2-process gloo DDP with the confusion matrix all-reduced."""

import math
import sys
from pathlib import Path

import pytest
import torch

from lt_distill.pipeline.methods import build_method
from lt_distill.pipeline.methods.bacl import (
    SIGN_PATTERNS,
    BACLLoss,
    BACLOptions,
    fcbl_margins,
    fcbl_weights,
    jitter_boxes,
    sample_classes,
)
from lt_distill.pipeline.model import build_model, model_config
from lt_distill.pipeline.model.config import LossConfig
from lt_distill.pipeline.model.criterion import build_criterion
from lt_distill.stages.train.config import OptimConfig
from lt_distill.stages.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from test_model import C, E, batch, make_targets  # noqa: E402
from train_helpers import run_config, run_killable, run_torchrun, train_records  # noqa: E402

D = 16


def _random_confusion(g, c=C):
    m = torch.rand(c, c, generator=g) ** 3
    return m / m.sum(1, keepdim=True)


def _hook(stage="classifier", **options):
    return BACLLoss(C, D, BACLOptions(stage=stage, **options))


def _set_confusion(hook, m):
    hook.cm_numerator.copy_(m * 10)
    hook.cm_count.fill_(10)


def _outputs(g, b=2, q=12, layers=2):
    def layer():
        return {"pred_logits": torch.randn(b, q, C, generator=g, requires_grad=True),
                "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + 0.3,
                "pred_bg": torch.randn(b, q, 1, generator=g)}
    out = layer()
    out["aux_outputs"] = [layer() for _ in range(layers - 1)]
    return out


# ------------------------------------------------------------------------------------------ FCBL
def test_fcbl_with_alpha_0_and_weights_off_is_the_base_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    targets = make_targets(g)
    outputs = _outputs(g)
    cfg = LossConfig()
    hook = _hook(fcbl_alpha=0.0, fcbl_reweight=False, fhm=False)
    _set_confusion(hook, _random_confusion(g))
    base = build_criterion(cfg, C, 2, torch.arange(1, C + 1))
    fcbl = build_criterion(cfg, C, 2, torch.arange(1, C + 1), hooks={"bacl": hook})
    torch.manual_seed(5)
    a = base(outputs, targets)
    ga = torch.autograd.grad(a["loss_ce"], outputs["pred_logits"])[0]
    torch.manual_seed(5)  # the same federated classes
    b = fcbl(outputs, targets)
    gb = torch.autograd.grad(b["loss_ce"], outputs["pred_logits"])[0]
    assert set(b) - set(a) == {"loss_bg"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(ga, gb) and ga.abs().sum() > 0
    # With margins on, the final layer's loss changes and the earlier layer's does not.
    hook.options.fcbl_alpha = 0.85
    torch.manual_seed(5)
    c = fcbl(outputs, targets)
    assert not torch.equal(c["loss_ce"], a["loss_ce"]) and torch.equal(c["loss_ce_0"], a["loss_ce_0"])


def test_fcbl_margins_antisymmetric_bounded_and_hand_computed():
    g = torch.Generator().manual_seed(1)
    m = _random_confusion(g)
    m[2] = 0  # an unseen class: clamped at 1e-3
    delta = fcbl_margins(m, torch.arange(C), 0.85)
    torch.testing.assert_close(delta, -delta.t())
    assert torch.all(delta.diagonal() == 0)
    assert delta.abs().max() <= 0.85 * math.log(1000) + 1e-6
    two = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    torch.testing.assert_close(fcbl_margins(two, torch.tensor([0, 1]), 0.5),
                               torch.tensor([[0.0, 0.5 * math.log(0.2 / 0.5)], [0.5 * math.log(0.5 / 0.2), 0.0]]))


def test_fcbl_weights_by_hand():
    prob = torch.tensor([[0.2, 0.5, 0.1, 0.75], [0.9, 0.3, 0.2, 0.1]])
    w = fcbl_weights(prob, torch.tensor([1, 2]), 0.7)
    assert w.tolist() == [[0, 1, 0, 1], [1, 1, 1, 0]]


def test_confusion_rows_sum_to_one_for_seen_classes_and_accumulate():
    g = torch.Generator().manual_seed(2)
    hook = _hook()
    logits = [torch.randn(6, C, generator=g) for _ in range(2)]
    labels = [torch.tensor([0, 0, 3, 5, 5, 5]), torch.tensor([3, 1, 1, 0, 6, 6])]
    for z, y in zip(logits, labels):
        hook._update_confusion(z, y)
    m = hook.confusion()
    z, y = torch.cat(logits), torch.cat(labels)
    for c in range(C):
        rows = z[y == c].softmax(-1)
        if len(rows):
            torch.testing.assert_close(m[c], rows.mean(0))
            assert m[c].sum().item() == pytest.approx(1.0, abs=1e-6)
        else:
            assert torch.all(m[c] == 0)


# ------------------------------------------------------------------------------------------ FHM
def test_jittered_boxes_cover_the_16_sign_patterns_within_a_sixth():
    g = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0.3, 0.3, 0.6, 0.5], [0.0, 0.9, 0.2, 1.0]])
    views = jitter_boxes(boxes, 1 / 6, g)
    assert views.shape == (2, 16, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bound = torch.stack([w, h, w, h], -1)[:, None] / 6
    assert torch.all((views - boxes[:, None]).abs() <= bound + 1e-6)
    assert torch.all(views >= 0) and torch.all(views <= 1)  # the second box is clipped
    assert views[1, :, 0].min() == 0 and views[1, :, 3].max() == 1
    signs = torch.sign(views[0] - boxes[0])  # the first box is never clipped: every pattern once
    assert torch.equal(signs, SIGN_PATTERNS)


def test_statistics_first_update_sets_then_running_average():
    g = torch.Generator().manual_seed(4)
    hook = _hook()
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]), "labels": torch.tensor([2, 4])},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([2])}]
    indices = [(torch.tensor([3, 7]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    feats = []

    def decode_views(query_index, view_boxes):
        assert query_index.shape == (2, 32) and view_boxes.shape == (2, 32, 4)
        assert query_index[0, :16].eq(3).all() and query_index[0, 16:].eq(7).all()
        assert query_index[1, :16].eq(1).all()
        f = torch.randn(2, 32, D, generator=g)
        feats.append(f)
        return f

    outputs = {"pred_logits": torch.zeros(2, 10, C), "decode_views": decode_views}
    hook._update_statistics(outputs, targets, indices)
    f = feats[0].double()
    class2 = torch.cat([f[0, :16], f[1, :16]])
    torch.testing.assert_close(hook.feat_mean[2].double(), class2.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hook.feat_var[2].double(), class2.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hook.feat_mean[4].double(), f[0, 16:].mean(0), rtol=1e-5, atol=1e-6)
    assert hook.feat_seen.tolist() == [0, 0, 1, 0, 1, 0, 0]
    mean2, var2 = hook.feat_mean[2].clone(), hook.feat_var[2].clone()
    hook._update_statistics(outputs, targets, indices)
    f = feats[1].double()
    class2 = torch.cat([f[0, :16], f[1, :16]])
    torch.testing.assert_close(hook.feat_mean[2].double(), 0.9 * mean2.double() + 0.1 * class2.mean(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hook.feat_var[2].double(), 0.9 * var2.double() + 0.1 * class2.var(0), rtol=1e-5,
                               atol=1e-6)


def test_zero_variance_hallucinates_the_mean_and_unseen_classes_give_nothing():
    hook = _hook(fhm_num_classes=8, fhm_num_features=12)
    hook.feat_mean[3] = torch.arange(D, dtype=torch.float32)
    hook.feat_seen[3] = 1  # variance stays 0
    m = torch.eye(C)
    m[3, 3] = 0.0  # only class 3 is ever drawn
    _set_confusion(hook, m)
    feats, labels = hook.hallucinate(torch.Generator().manual_seed(0))
    assert feats.shape == (96, D) and torch.all(labels == 3)
    assert torch.equal(feats, hook.feat_mean[3].expand(96, -1))
    hook.feat_seen[3] = 0
    feats, labels = hook.hallucinate(torch.Generator().manual_seed(0))
    assert feats.shape == (0, D) and labels.numel() == 0


def test_class_sampling_is_proportional_to_one_minus_accuracy():
    m = torch.diag(torch.tensor([0.0, 0.5, 0.75, 1.0, 0.9]))
    draws = sample_classes(m, 40000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.tensor([1.0, 0.5, 0.25, 0.0, 0.1], dtype=torch.float64) / 1.85
    # 40,000 draws: the standard error of each frequency is below 0.0025; 4 of them is a safe bound.
    assert (freq - expected).abs().max() < 0.01 and freq[3] == 0
    assert sample_classes(torch.eye(3), 5).numel() == 0


# ------------------------------------------------------------------------------------------ stage 2
def _capture_hidden(model):
    seen = []
    handle = model.transformer.decoder.register_forward_hook(lambda m, i, o: seen.append(o[0][-1].detach().clone()))
    return seen, handle


def test_stage2_trains_only_the_heads_and_leaves_hs_unchanged():
    method = build_method("bacl", {"stage": "classifier"})
    cfg = model_config("tiny", method.model_overrides())
    assert cfg.denoising.dn_number == 0
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg, torch.randn(C, E), torch.arange(1, C + 1), method=method)
    method.prepare_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n, _ in model.named_parameters() if n.startswith(("class_head.", "extensions.background."))}
    assert trainable == heads and {"class_head.proj.weight", "extensions.background.linear.weight",
                                   "extensions.background.linear.bias"} <= trainable
    assert len(list(model.parameters())) > len(trainable) + 50  # everything else is frozen
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    g = torch.Generator().manual_seed(1)
    images, mask = batch(g)
    targets = make_targets(g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen, handle = _capture_hidden(model)
    model.train()
    out = model(images, mask, targets)
    losses = criterion(out, targets)
    assert {"loss_bg", "loss_fhm"} <= set(losses) and not any("_dn" in k for k in losses)
    criterion.weighted_total(losses).backward()
    optimizer.step()
    model(images, mask, targets)
    handle.remove()
    assert torch.equal(seen[0], seen[-1])  # hs of the fixed input: unchanged by the step
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
    assert criterion.hooks["bacl"].cm_count.sum() > 0 and criterion.hooks["bacl"].feat_seen.sum() > 0


def test_eq5_scores_reach_the_post_processor():
    method = build_method("bacl")
    torch.manual_seed(0)
    model, _, post = build_model(model_config("tiny"), torch.randn(C, E), method=method)
    torch.nn.init.normal_(model.extensions["background"].linear.weight, std=1.0)
    model.eval()
    g = torch.Generator().manual_seed(2)
    images, mask = batch(g)
    with torch.no_grad():
        out = model(images, mask)
    expected = out["pred_logits"].sigmoid() * (1 - out["pred_bg"].sigmoid())
    torch.testing.assert_close(out["pred_scores"], expected)
    dets = post(out, torch.tensor([[128, 160], [128, 160]]))
    torch.testing.assert_close(dets[0]["scores"], expected[0].flatten().topk(len(dets[0]["scores"])).values)


# ------------------------------------------------------------------------------------------ training
def _bacl_config(ds, store, out, **top):
    return run_config(ds, out, store=store, method="bacl", method_options={"stage": "classifier"}, **top)


@pytest.mark.slow
def test_bacl_stage2_kill_and_resume_is_exact(run_data, tmp_path):
    ds, store = run_data
    full = _bacl_config(ds, store, tmp_path / "full")
    proc = run_killable(full, -1, "fresh")
    assert proc.returncode == 0, proc.stderr[-2000:]
    killed = _bacl_config(ds, store, tmp_path / "killed")
    assert run_killable(killed, 4, "fresh").returncode == -9
    proc = run_killable(killed, -1, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, got = train_records(tmp_path / "full"), train_records(tmp_path / "killed")
    assert {r["source"] for r in ref} == {"detection"}  # stage 2: LVIS only
    keys = [k for k in ref[0] if k.startswith("loss") or k == "grad_norm"]
    assert "loss_fhm" in keys and "loss_bg" in keys
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]
    a, b = (torch.load(tmp_path / run / "checkpoints" / "iter_0000006.pt", weights_only=True) for run in
            ("full", "killed"))
    assert a["criterion"]["hooks.bacl.cm_count"].sum() > 0
    for k in a["criterion"]:
        assert torch.equal(a["criterion"][k], b["criterion"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_bacl_two_gloo_processes_share_the_confusion_matrix(run_data, tmp_path):
    ds, store = run_data
    base = _bacl_config(ds, store, tmp_path / "ddp", max_iters=3, checkpoint_every=3)
    r0, r1 = run_torchrun(base, tmp_path)
    for k in r0["criterion"]:  # M and the FHM statistics: the same on both ranks
        assert torch.equal(r0["criterion"][k], r1["criterion"][k]), k
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # The ranks trained on different images (different losses), yet hold one confusion matrix and one set of
    # statistics: both are summed over ranks every step. A rank alone would have counted fewer positives.
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"]))
    count = r0["criterion"]["hooks.bacl.cm_count"]
    assert count.sum() > 0
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "iter_0000003.pt", weights_only=True)
    assert torch.equal(ckpt["criterion"]["hooks.bacl.cm_count"], count)
