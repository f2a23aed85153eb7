"""CLIS (METHODS.md): the properties every implementation must pass, the contrastive loss by hand, the
queue, parameter sharing, attention isolation of tile queries, the region / paste data helpers, and
real runs through the train loop (mixed batches, exact resume, two gloo processes)."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lt_distill.errors import ConfigError, LtDistillError
from lt_distill.pipeline.methods import build_method
from lt_distill.pipeline.methods.clis import CLISLoss, contrastive_loss
from lt_distill.pipeline.methods.clis_data import (
    CLISBatchMixer,
    PredefinedRegions,
    occlude_boxes,
    paste_region,
    region_on_canvas,
    tile_query_boxes,
)
from lt_distill.pipeline.model import build_model, export_inference_model, load_model, model_config, save_checkpoint
from lt_distill.pipeline.model.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from lt_distill.pipeline.model.dino import TaskHeadClassifier
from train_helpers import run_config, run_killable, run_torchrun, train_records

sys.path.insert(0, str(Path(__file__).parent))  # test_train's data helpers

C, E = 7, 32


def unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# -- L_con ------------------------------------------------------------------------------------------
def test_contrastive_loss_empty_queue_is_zero():
    g = torch.Generator().manual_seed(0)
    q, k = unit(5, 16, g=g), unit(5, 16, g=g)
    assert contrastive_loss(q, k, torch.zeros(0, 16), 0.2).item() == 0.0


@pytest.mark.parametrize("num_keys", [1, 7, 300])
def test_contrastive_loss_all_queue_keys_equal_to_key_is_log_one_plus_k(num_keys):
    g = torch.Generator().manual_seed(num_keys)
    q, k = unit(4, 16, g=g), unit(4, 16, g=g)
    for i in range(4):  # one pair at a time: the queue holds K copies of that pair's f_d
        loss = contrastive_loss(q[i:i + 1], k[i:i + 1], k[i].expand(num_keys, -1), 0.2)
        assert loss.item() == pytest.approx(math.log(1 + num_keys), rel=1e-6)


def test_contrastive_loss_by_hand_and_no_gradient_to_keys_or_queue():
    g = torch.Generator().manual_seed(3)
    q = unit(3, 8, g=g).requires_grad_()
    k = unit(3, 8, g=g).requires_grad_()
    queue = unit(5, 8, g=g).requires_grad_()
    tau = 0.2
    loss = contrastive_loss(q, k, queue, tau)
    expected = 0.0
    for i in range(3):
        pos = math.exp(float(q[i].detach() @ k[i].detach()) / tau)
        neg = sum(math.exp(float(q[i].detach() @ n.detach()) / tau) for n in queue)
        expected += -math.log(pos / (pos + neg)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_queue_is_a_fifo_ring():
    hook = CLISLoss(embed_dim=2, queue_size=4)
    keys = torch.arange(12, dtype=torch.float32).view(6, 2)
    hook.enqueue(keys[:3])
    assert torch.equal(hook.queue_keys(), keys[:3])
    hook.enqueue(keys[3:6])  # wraps: slots 3, 0, 1
    assert int(hook.queue_len) == 4 and int(hook.queue_ptr) == 2
    assert torch.equal(hook.queue, torch.stack([keys[4], keys[5], keys[2], keys[3]]))
    hook.enqueue(torch.zeros(0, 2))
    assert int(hook.queue_ptr) == 2
    assert set(hook.state_dict()) == {"queue", "queue_len", "queue_ptr"}  # checkpointed with the criterion


# -- the detector with its CLIS branch --------------------------------------------------------------
def clis_model(task_head_dim=64, seed=0, **options):
    torch.manual_seed(seed)
    method = build_method("clis", {"task_head_dim": task_head_dim, "queue_size": 32, "embed_dim": 16, **options})
    cfg = model_config("tiny", method.model_overrides())
    model, criterion, post = build_model(cfg, torch.randn(C, E), torch.arange(1, C + 1), method=method)
    return model, criterion, method, cfg


def mixed_batch(g, paste=True):
    """Two detection images and one mosaic (4 tiles, one unlabelled), with one region pasted."""
    images = torch.randn(3, 3, 96, 128, generator=g)
    mask = torch.zeros(3, 96, 128, dtype=torch.bool)
    targets = []
    for i, n in enumerate((3, 2)):
        centres = torch.rand(n, 2, generator=g) * 0.4 + 0.3
        targets.append({"boxes": torch.cat([centres, torch.rand(n, 2, generator=g) * 0.2 + 0.1], 1),
                        "labels": torch.randint(0, C, (n,), generator=g), "image_id": i,
                        "size": torch.tensor([128, 160]), "orig_size": torch.tensor([128, 160])})
    tiles = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5],
                          [0.75, 0.75, 0.5, 0.5]])
    targets.append({"boxes": tiles, "labels": torch.tensor([1, 4, -1, 6]), "image_id": -1,
                    "tile_boxes": tiles * torch.tensor([1.0, 1.0, 0.6, 0.6]), "tile_labels": torch.tensor([1, 4, -1, 6]),
                    "size": torch.tensor([128, 160]), "orig_size": torch.tensor([128, 160])})
    if paste:
        for t in targets:
            t["box_mask"] = torch.ones(len(t["boxes"]), dtype=torch.bool)
            t["paste_tile"] = torch.full((len(t["boxes"]),), -1, dtype=torch.long)
        t = targets[0]
        t["boxes"] = torch.cat([t["boxes"], torch.tensor([[0.2, 0.2, 0.2, 0.2]])])
        t["labels"] = torch.cat([t["labels"], torch.tensor([4])])
        t["box_mask"] = torch.cat([t["box_mask"], torch.tensor([False])])
        t["paste_tile"] = torch.cat([t["paste_tile"], torch.tensor([1])])  # tile 1 of the mosaic
    return images, mask, targets


def test_tile_and_instance_branches_share_parameter_objects():
    model, _, _, _ = clis_model()
    head = model.class_head
    assert isinstance(head, TaskHeadClassifier)
    assert model.branch.tile_task_head_of(model) is head.task_head
    assert model.branch._classifier(model) is head.classifier
    branch_params = {id(p) for p in model.branch.parameters()}
    assert not branch_params & {id(p) for p in head.parameters()}  # one owner of H_cls in the state_dict
    assert not any(k.startswith("branch.") and "task_head" in k and "key_" not in k for k in model.state_dict())
    # The tile logits are exactly the shared head's on the tile states.
    g = torch.Generator().manual_seed(1)
    images, mask, targets = mixed_batch(g)
    model.train()
    out = model(images, mask, targets)["clis"]
    assert len(out["tile_logits"]) == 2 and out["tile_logits"][-1].shape == (3, 4, C)
    assert out["tile_valid"].sum() == 4 and out["tile_valid"][2].all() and not out["tile_valid"][:2].any()
    # "Without SS": a deep copy of H_cls, same values, different objects.
    model2, _, _, _ = clis_model(siamese=False)
    copy_head = model2.branch.tile_task_head_of(model2)
    assert copy_head is not model2.class_head.task_head
    for a, b in zip(copy_head.parameters(), model2.class_head.task_head.parameters()):
        assert a is not b and torch.equal(a, b)


def test_tile_queries_leave_the_matching_queries_outputs_unchanged():
    model, _, _, _ = clis_model()
    model.train()
    g = torch.Generator().manual_seed(2)
    images, mask, targets = mixed_batch(g, paste=False)
    plain = [{k: v for k, v in t.items() if not k.startswith("tile_")} for t in targets]
    torch.manual_seed(5)
    with_tiles = model(images, mask, targets)
    torch.manual_seed(5)
    without = model(images, mask, plain)
    assert "clis" in with_tiles
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(with_tiles[key], without[key])
        assert torch.equal(with_tiles["aux_outputs"][0][key], without["aux_outputs"][0][key])
        assert torch.equal(with_tiles["dn_outputs"][key], without["dn_outputs"][key])


def test_separate_tile_pass_equals_the_joint_attention_masked_pass():
    """The branch decodes tiles apart; that must equal one decoder pass with the tile queries appended
    and masked (no other query sees them, each sees only itself)."""
    model, _, _, _ = clis_model()
    model.eval()
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 128, 160, generator=g)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, :, 128:] = True
    with torch.no_grad():
        srcs, masks, pos = model.features(images, mask)
        mem = model.transformer.encode(srcs, masks, pos)
        q, e, d = 20, 3, model.transformer.d_model
        tgt, ref = torch.randn(2, q, d, generator=g), inverse_sigmoid(torch.rand(2, q, 4, generator=g) * 0.5 + 0.2)
        tiles, tref = torch.randn(2, e, d, generator=g), inverse_sigmoid(torch.rand(2, e, 4, generator=g) * 0.5 + 0.2)
        joint_mask = torch.zeros(q + e, q + e, dtype=torch.bool)
        joint_mask[:q, q:] = True  # matching queries do not see tiles
        joint_mask[q:, :] = True
        joint_mask[q:, q:] = ~torch.eye(e, dtype=torch.bool)  # a tile sees only itself
        joint, _ = model.transformer.decoder(torch.cat([tgt, tiles], 1), torch.cat([ref, tref], 1), mem, joint_mask)
        main, _ = model.transformer.decoder(tgt, ref, mem)
        apart, _ = model.transformer.decoder(tiles, tref, mem, ~torch.eye(e, dtype=torch.bool))
    for j, m, a in zip(joint, main, apart):
        torch.testing.assert_close(j[:, :q], m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(j[:, q:], a, rtol=1e-5, atol=1e-5)


def test_alpha_beta_zero_with_tss_off_is_the_baseline_loss_exactly():
    torch.manual_seed(0)
    text = torch.randn(C, E)
    method = build_method("baseline")
    baseline, base_criterion, _ = build_model(model_config("tiny", method.model_overrides()), text,
                                              torch.arange(1, C + 1), method=method)
    model, criterion, _, _ = clis_model(task_head_dim=0, alpha=0.0, beta=0.0)
    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("branch.") for k in missing)
    g = torch.Generator().manual_seed(6)
    images, mask, targets = mixed_batch(g, paste=False)
    plain = [{k: v for k, v in t.items() if not k.startswith("tile_")} for t in targets]
    baseline.train()
    model.train()
    torch.manual_seed(9)
    base_losses = base_criterion(baseline(images, mask, plain), plain)
    base_total = base_criterion.weighted_total(base_losses)
    torch.manual_seed(9)
    losses = criterion(model(images, mask, targets), targets)
    total = criterion.weighted_total(losses)
    assert set(losses) == set(base_losses) | {"loss_imcls", "loss_con"}
    assert losses["loss_imcls"] > 0  # computed, weighted 0
    assert all(torch.equal(losses[k], v) for k, v in base_losses.items())
    assert torch.equal(total, base_total)


def test_clis_step_trains_the_branch_and_never_the_key_encoder_or_queue():
    """Two steps with one pasted region: gradients reach the tile query, W and the shared H_cls, never the
    key encoder; the queue grows by the step's keys; the key copies follow with momentum."""
    model, criterion, _, _ = clis_model(queue_size=8)
    hook = criterion.hooks["clis"]
    g = torch.Generator().manual_seed(7)
    images, mask, targets = mixed_batch(g)
    model.train()
    key_before = [p.clone() for p in model.branch.key_proj.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        losses = criterion(model(images, mask, targets), targets)
        assert set(losses) <= set(criterion.weight_dict) and {"loss_con", "loss_imcls"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        if step == 0:
            assert losses["loss_con"].item() == 0.0  # empty queue
        else:
            assert losses["loss_con"].item() > 0
        criterion.weighted_total(losses).backward()
        assert int(hook.queue_len) == step + 1  # one paste per step enqueued
        assert model.branch.tile_content.grad.abs().sum() > 0
        if step == 1:  # L_con over an empty queue is constant 0 (one logit), so W learns from step 2
            assert model.branch.proj.weight.grad.abs().sum() > 0
        assert model.class_head.task_head[0].weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in (*model.branch.key_proj.parameters(),
                                            *model.branch.key_task_head.parameters()))
        assert not hook.queue.requires_grad
        opt.step()
    # The key copies follow the online W with momentum m.
    m = model.branch.momentum
    online, key_prev = model.branch.proj.weight.detach().clone(), model.branch.key_proj.weight.clone()
    assert not torch.equal(key_prev, key_before[0])  # moved by the second step's update
    model.branch.momentum_update(model)
    torch.testing.assert_close(model.branch.key_proj.weight, m * key_prev + (1 - m) * online, rtol=0, atol=1e-7)


def test_pasted_region_gets_class_loss_only():
    model, base, _, _ = clis_model()
    model.train()
    g = torch.Generator().manual_seed(8)
    images, mask, targets = mixed_batch(g)
    out = model(images, mask, targets)
    indices = base.matcher(out, targets)
    # Moving the pasted box's target changes no box loss; moving an ordinary one does.
    moved = [dict(t) for t in targets]
    moved[0]["boxes"] = targets[0]["boxes"].clone()
    moved[0]["boxes"][-1] += 0.05
    a = base.loss_boxes(out, targets, indices, 5.0)
    b = base.loss_boxes(out, moved, indices, 5.0)
    assert torch.equal(a["loss_bbox"], b["loss_bbox"]) and torch.equal(a["loss_giou"], b["loss_giou"])
    moved[0]["boxes"][0, 0] += 0.05  # one coordinate: four could cancel in the L1 sum
    assert base.loss_boxes(out, moved, indices, 5.0)["loss_bbox"] != a["loss_bbox"]


def test_export_drops_the_branch_and_keeps_the_task_head(tmp_path):
    model, _, _, cfg = clis_model()
    path = tmp_path / "clis.pt"
    save_checkpoint(path, model, cfg)
    out = tmp_path / "inference.pt"
    dropped = export_inference_model(path, out)
    assert any(k.startswith("branch.tile_content") for k in dropped) and any("key_proj" in k for k in dropped)
    assert not any(k.startswith("class_head.task_head") for k in dropped)
    model.eval()
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected = model(images)
        for p in (path, out):  # the training checkpoint and the export give the same predictions
            loaded = load_model(p)
            assert loaded.branch is None and isinstance(loaded.class_head, TaskHeadClassifier)
            got = loaded(images)
            assert torch.equal(got["pred_logits"], expected["pred_logits"])


# -- data helpers -----------------------------------------------------------------------------------
def test_region_on_canvas_by_hand_with_and_without_flip():
    visible = np.array([0.0, 0.0, 1.0, 0.5])  # the top half of the photo is visible
    tile = np.array([100.0, 50.0, 300.0, 150.0])  # shown at 200 x 100 pixels
    region = np.array([0.25, 0.1, 0.5, 0.4])
    np.testing.assert_allclose(region_on_canvas(region, visible, False, tile), [150, 70, 200, 130])
    np.testing.assert_allclose(region_on_canvas(region, visible, True, tile), [200, 70, 250, 130])
    np.testing.assert_allclose(region_on_canvas(np.array([0.9, 0.4, 1.0, 0.9]), visible, False, tile),
                               [280, 130, 300, 150])  # clipped to the visible part
    assert region_on_canvas(np.array([0.1, 0.6, 0.5, 0.9]), visible, False, tile) is None


def test_tile_query_boxes_use_regions_and_fall_back_to_whole_tiles(tmp_path):
    regions = PredefinedRegions.empty(2, 5, detector="x")
    regions.regions[1, 3] = [0.0, 0.0, 0.5, 0.5]
    path = tmp_path / "regions.npz"
    regions.save(path)
    loaded = PredefinedRegions.load(path)
    assert loaded.attrs["detector"] == "x" and loaded.get(1, 3).tolist() == [0.0, 0.0, 0.5, 0.5]
    assert loaded.get(0, 0) is None and loaded.get(5, 0) is None and loaded.get(-1, 0) is None
    target = {"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]),
              "rows": torch.tensor([[1, 3], [1, 4]]), "regions": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2,
                                                                             dtype=torch.float64),
              "flipped": torch.tensor([False, False])}
    boxes = tile_query_boxes(target, loaded)
    torch.testing.assert_close(boxes[0], torch.tensor([0.125, 0.125, 0.25, 0.25]))
    torch.testing.assert_close(boxes[1], target["boxes"][1])  # no region: the whole tile
    torch.testing.assert_close(tile_query_boxes(target, None), target["boxes"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, regions=np.zeros((1, 1, 4)))
    with pytest.raises(LtDistillError, match="cannot read"):
        PredefinedRegions.load(bad)
    with pytest.raises(LtDistillError, match="not found"):
        PredefinedRegions.load(tmp_path / "missing.npz")


def test_occlusion_update_like_copy_paste():
    boxes = torch.tensor([[10.0, 10, 20, 20],    # fully covered -> dropped
                          [0, 12, 30, 18],       # hole in the middle -> unchanged
                          [5, 10, 15, 20],       # right part covered (full height) -> x1 = 10
                          [12, 5, 18, 15],       # bottom part covered (full width) -> y1 = 10
                          [50, 50, 60, 60]])     # untouched
    out, keep = occlude_boxes(boxes, torch.tensor([10.0, 10, 20, 20]))
    assert keep.tolist() == [False, True, True, True, True]
    assert out[1].tolist() == [0, 12, 30, 18]
    assert out[2].tolist() == [5, 10, 10, 20]
    assert out[3].tolist() == [12, 5, 18, 10]
    assert out[4].tolist() == [50, 50, 60, 60]


def test_paste_region_adds_a_class_only_box_and_updates_occluded_ones():
    image = torch.zeros(3, 100, 200)
    target = {"boxes": torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([3, 5]),
              "soft_labels": torch.ones(2, C) / C, "soft_mask": torch.tensor([True, True]),
              "ann_ids": torch.tensor([11, 12]), "area": torch.tensor([200.0, 800.0]), "image_id": 1}
    patch = torch.ones(3, 40, 60)
    out_image, out = paste_region(image, target, patch, label=2, tile=7, xy=(70, 30))
    assert out_image[:, 30:70, 70:130].eq(1).all() and out_image.sum() == patch.sum()
    assert out["labels"].tolist() == [3, 2]  # box 1 (80..120 x 40..60) was fully covered
    assert out["ann_ids"].tolist() == [11, -1] and out["soft_mask"].tolist() == [True, False]
    assert out["box_mask"].tolist() == [True, False] and out["paste_tile"].tolist() == [-1, 7]
    assert out["soft_labels"][1].sum() == 0 and out["area"].tolist() == [200.0, 2400.0]
    torch.testing.assert_close(out["boxes"][1], torch.tensor([0.5, 0.5, 0.3, 0.4]))
    with pytest.raises(ValueError, match="does not fit"):
        paste_region(image, target, patch, 2, 7, (150, 0))


def test_mixer_builds_one_batch_with_tile_anchors_and_pastes():
    g = torch.Generator().manual_seed(9)
    det_images = torch.randn(2, 3, 96, 128, generator=g)
    det_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    det_mask[1, 80:] = True  # the second image is 80 rows high
    det_targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1]),
                    "soft_labels": torch.zeros(1, C), "soft_mask": torch.tensor([False]), "image_id": i}
                   for i in range(2)]
    cls_targets = [{"boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]),
                    "labels": torch.tensor([4, -1]), "soft_labels": torch.zeros(2, C),
                    "soft_mask": torch.tensor([False, False]), "rows": torch.tensor([[0, 0], [0, 1]]),
                    "regions": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, dtype=torch.float64),
                    "flipped": torch.tensor([False, True]), "image_id": -1 - i} for i in range(2)]
    det = {"images": det_images, "pixel_mask": det_mask, "targets": det_targets, "skipped": {"a": 1}}
    cls = {"images": torch.randn(2, 3, 64, 64, generator=g), "pixel_mask": torch.zeros(2, 64, 64, dtype=torch.bool),
           "targets": cls_targets, "skipped": {"a": 2}}
    mixer = CLISBatchMixer(None, paste_tiles=2, paste_scale=(0.2, 0.4), seed=0)
    batch = mixer(det, cls)
    assert batch["images"].shape == (4, 3, 96, 128) and batch["source"] == "mixed"
    assert batch["pixel_mask"][1, 80:].all() and batch["pixel_mask"][2, :, 64:].all()
    assert batch["skipped"] == {"a": 3}
    targets = batch["targets"]
    assert [t["image_id"] for t in targets] == [0, 1, -1, -2]
    assert all("box_mask" in t and "paste_tile" in t for t in targets)
    pasted = torch.cat([t["paste_tile"] for t in targets[:2]])
    # Two labelled tiles (flat indices 0 and 2), both pasted once, with their labels and class loss only.
    assert sorted(pasted[pasted >= 0].tolist()) == [0, 2]
    for t in targets[:2]:
        p = t["paste_tile"] >= 0
        assert (t["labels"][p] == 4).all() and not t["box_mask"][p].any()
    torch.testing.assert_close(targets[2]["tile_boxes"], cls_targets[0]["boxes"])
    assert targets[2]["tile_labels"].tolist() == [4, -1]
    # The same seed gives the same stream (exact replay on resume).
    again = CLISBatchMixer(None, paste_tiles=2, paste_scale=(0.2, 0.4), seed=0)(det, cls)
    assert torch.equal(again["images"], batch["images"])
    # The mosaics keep their tiles as (coarse) detection targets, without paste keys unless pasting.
    assert torch.equal(targets[2]["labels"], cls_targets[0]["labels"]) and targets[2]["box_mask"].all()
    no_paste = CLISBatchMixer(None, 0, (0.2, 0.4))(det, cls)
    assert not any("paste_tile" in t for t in no_paste["targets"])
    assert torch.equal(no_paste["images"][0], det_images[0])  # untouched (image 1: re-padded with zeros)
    assert torch.equal(no_paste["images"][1, :, :80], det_images[1, :, :80])


def test_clis_config_rejects_bad_values():
    for bad in ({"tau": 0}, {"momentum": 1.0}, {"beta": -1}, {"paste_scale": [0.5, 0.2]}, {"mosaics_per_image": 0},
                {"task_head_dim": -1}, {"queue": 3}):
        with pytest.raises(ConfigError):
            build_method("clis", bad)
    method = build_method("clis", {"task_head_dim": 0})
    assert method.model_overrides() == {"head": {"semantic_branch": False, "task_head_dim": 0}}


# -- training runs (the train loop, checkpoints, resume, DDP) -----------------------------------------
CLIS_OPTIONS = {"task_head_dim": 64, "queue_size": 8, "embed_dim": 16}  # a queue that wraps within the run


def _clis_config(ds, store, out, **top):
    return run_config(ds, out, store=store, method="clis", method_options=dict(CLIS_OPTIONS), **top)


def test_a_clis_run_mixes_sources_pastes_and_checkpoints_the_queue(run_data, tmp_path):
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import train

    ds, store = run_data
    result = train(train_config(None, base=_clis_config(ds, store, tmp_path / "run", max_iters=3, checkpoint_every=3)))
    records = train_records(tmp_path / "run")
    assert [r["source"] for r in records] == ["mixed"] * 3  # both sources in every step
    assert all(r["loss_con"] >= 0 and r["loss_imcls"] > 0 and math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss_con"] == 0.0 and records[-1]["loss_con"] > 0  # the queue fills from step 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "iter_0000003.pt", weights_only=True)
    (state,) = ckpt["criterion_ranks"]
    assert int(state["hooks.clis.queue_len"]) == 6  # t = 2 pastes per step, 3 steps, queue of 8
    assert result.model.branch is not None
    assert not any(k.startswith("semantic_head.") for k in ckpt["model"])  # CLIS has no soft labels
    assert any(k.startswith("class_head.task_head.") for k in ckpt["model"])


@pytest.mark.slow
def test_clis_kill_and_resume_gives_the_same_losses(run_data, tmp_path):
    ds, store = run_data
    full = _clis_config(ds, store, tmp_path / "full")
    assert run_killable(full, -1, "fresh").returncode == 0
    killed = _clis_config(ds, store, tmp_path / "killed")
    assert run_killable(killed, 4, "fresh").returncode == -9  # checkpoint at 3, killed after step 4
    proc = run_killable(killed, -1, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, got = train_records(tmp_path / "full"), train_records(tmp_path / "killed")
    assert [r["iter"] for r in got] == list(range(1, 7))
    keys = [k for k in ref[0] if k.startswith("loss") or k == "grad_norm"]
    assert "loss_con" in keys and ref[-1]["loss_con"] > 0
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]
    last = [torch.load(p / "checkpoints" / "iter_0000006.pt", weights_only=True) for p in (tmp_path / "full",
                                                                                           tmp_path / "killed")]
    for key in ("model", "criterion"):
        assert all(torch.equal(v, last[1][key][k]) for k, v in last[0][key].items()), key


@pytest.mark.slow
def test_clis_under_torchrun_keeps_replicas_equal_and_a_queue_per_rank(run_data, tmp_path):
    ds, store = run_data
    base = _clis_config(ds, store, tmp_path / "ddp", max_iters=3, checkpoint_every=3)
    r0, r1 = run_torchrun(base, tmp_path, timeout=900)
    for name, tensor in r0["state"].items():  # the same averaged gradient (and key-encoder update) everywhere
        assert torch.equal(tensor, r1["state"][name]), name
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "iter_0000003.pt", weights_only=True)
    q0, q1 = (s["hooks.clis.queue"] for s in ckpt["criterion_ranks"])
    assert int(ckpt["criterion_ranks"][0]["hooks.clis.queue_len"]) == 6
    assert not torch.equal(q0, q1)  # each rank queues its own keys (not synchronised)


def test_clis_regions_command_stores_the_best_box_of_each_rows_class(run_data, tmp_path):
    from lt_distill.cli import main
    from lt_distill.pipeline.data.classification import decode_sample_image
    from lt_distill.pipeline.data import transforms as T
    from lt_distill.pipeline.shards import expand_shards, iter_tar_samples
    from lt_distill.store import LabelReader

    ds, store = run_data
    reader = LabelReader(store)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model, _, _ = build_model(cfg, torch.as_tensor(np.asarray(reader.text_embeddings())).float())
    save_checkpoint(tmp_path / "det.pt", model, cfg)
    out = tmp_path / "regions.npz"
    with pytest.raises(SystemExit) as exit_info:
        main(["clis-regions", "--checkpoint", str(tmp_path / "det.pt"), "--shards", ds.cls_shards, "--store",
              str(store), "--out", str(out), "--image-size", "96", "--max-size", "128", "--batch-size", "3"])
    assert exit_info.value.code == 0
    regions = PredefinedRegions.load(out)
    assert regions.regions.shape[:2] == (reader.layout.num_shards, reader.layout.shard_capacity)
    assert "sha256:" in regions.attrs["detector"]
    # One image by hand: its row's region is the detector's top-scoring box for the row's hard label.
    model.eval()
    shard_url = expand_shards(ds.cls_shards)[1]
    raw = next(iter(iter_tar_samples(shard_url)))
    label = int(reader.hard_label(1, 0))
    assert label >= 0
    image, _ = T.resize(decode_sample_image(raw.fields), {}, 96, 128)
    image, _ = T.normalize(image, {}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        pred = model(image[None])
    # Batched CPU arithmetic may differ in the last bits, which can flip near-tied queries of a random
    # detector: the stored region must be the box of a query scoring (within 1e-4) the best score.
    scores = pred["pred_logits"][0, :, label].float().sigmoid()
    assert regions.scores[1, 0] == pytest.approx(float(scores.max()), abs=1e-4)
    boxes = box_cxcywh_to_xyxy(pred["pred_boxes"][0]).clamp(0, 1)
    near_best = boxes[scores >= scores.max() - 1e-4]
    assert (near_best - torch.as_tensor(regions.get(1, 0))).abs().max(-1).values.min() < 1e-4
    labelled = sum(int(reader.hard_label(s, r)) >= 0 for s in range(2) for r in range(8))
    assert (~np.isnan(regions.regions[..., 0])).sum() == labelled
