"""The detector: presets, output shapes and dtypes, gradients, denoising layout, post-processing, export."""

import dataclasses

import pytest
import torch

from lt_distill.config import to_dict
from lt_distill.errors import ConfigError, LtDistillError
from lt_distill.pipeline.model import (
    PRESETS,
    build_model,
    export_inference_model,
    load_model,
    model_config,
    save_checkpoint,
)
from lt_distill.pipeline.model.backbone import ResNetBackbone, load_resnet_weights
from lt_distill.pipeline.model.denoising import attention_mask, make_denoising_queries, noise_boxes

C, E = 7, 32


def make_targets(g: torch.Generator, counts=(3, 5), num_classes=C) -> list[dict]:
    targets = []
    for i, n in enumerate(counts):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        if n:
            labels[0] = -1  # class unknown: box losses only
        centres = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({
            "boxes": torch.cat([centres, sizes], 1),
            "labels": labels,
            "soft_labels": torch.softmax(torch.randn(n, num_classes, generator=g), -1),
            "soft_mask": torch.arange(n) % 2 == 0,
            "orig_size": torch.tensor([480, 640]),
            "size": torch.tensor([128, 160]),
            "image_id": i,
        })
    return targets


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    text = torch.randn(C, E).half()  # the label store ships float16
    return build_model(model_config("tiny"), text, torch.arange(1, C + 1))


def batch(g: torch.Generator, b: int = 2, h: int = 128, w: int = 160):
    images = torch.randn(b, 3, h, w, generator=g)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[-1, :, w - 32 :] = True  # the last image is narrower, padded on the right
    return images, mask


def test_presets_are_overrides_and_validate():
    ref = model_config("dino-r50-4scale")
    assert (ref.transformer.num_queries, ref.transformer.enc_layers, ref.transformer.dec_layers) == (900, 6, 6)
    assert (ref.denoising.dn_number, ref.denoising.box_noise_scale, ref.denoising.label_noise_ratio) == (100, 1.0, 0.5)
    assert (ref.loss.cls_weight, ref.loss.bbox_weight, ref.loss.giou_weight, ref.loss.semantic_weight) == (1, 5, 2, 0.5)
    assert (ref.loss.cost_class, ref.loss.cost_bbox, ref.loss.cost_giou) == (2, 5, 2)
    assert ref.backbone.name == "resnet50" and ref.transformer.num_feature_levels == 4 and ref.num_select == 300
    tiny = model_config("tiny", {"transformer": {"num_queries": 50}})
    assert tiny.transformer.hidden_dim == 64 and tiny.transformer.num_queries == 50
    assert tiny.transformer.enc_n_points == ref.transformer.enc_n_points  # untouched keys come from defaults
    with pytest.raises(ConfigError, match="transformer.hiden_dim"):
        model_config("tiny", {"transformer": {"hiden_dim": 3}})
    with pytest.raises(ConfigError, match="divisible"):
        model_config("tiny", {"transformer": {"nheads": 3}})
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("huge")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_predicts(preset):
    torch.manual_seed(0)
    cfg = model_config(preset)
    model, _, postprocess = build_model(cfg, torch.randn(5, 16))
    model.eval()
    images, mask = batch(torch.Generator().manual_seed(0), b=1, h=256, w=256)
    with torch.no_grad():
        out = model(images, mask)
    q = cfg.transformer.num_queries
    assert out["pred_logits"].shape == (1, q, 5) and out["pred_boxes"].shape == (1, q, 4)
    assert len(out["aux_outputs"]) == cfg.transformer.dec_layers - 1
    (det,) = postprocess(out, torch.tensor([[256, 256]]))
    assert det["scores"].shape == (min(cfg.num_select, q * 5),)


def test_training_outputs_shapes_and_dtypes(tiny):
    model, _, _ = tiny
    g = torch.Generator().manual_seed(1)
    images, mask = batch(g)
    targets = make_targets(g)
    model.train()
    out = model(images, mask, targets)
    q = model.num_queries
    for layer in [out] + out["aux_outputs"]:
        assert layer["pred_logits"].shape == (2, q, C) and layer["pred_logits"].dtype == torch.float32
        assert layer["pred_boxes"].shape == (2, q, 4) and layer["pred_boxes"].dtype == torch.float32
        assert ((layer["pred_boxes"] >= 0) & (layer["pred_boxes"] <= 1)).all()
    # The semantic branch on the last layer only (RichSem distill_aux_layers=False).
    assert out["pred_semantic"].shape == (2, q, C)
    torch.testing.assert_close(out["pred_semantic"].exp().sum(-1), torch.ones(2, q))  # log-probabilities
    assert not any("pred_semantic" in layer for layer in out["aux_outputs"] + out["dn_outputs"]["aux_outputs"])
    assert len(out["aux_outputs"]) == 1  # 2 decoder layers
    assert out["enc_outputs"]["pred_logits"].shape == (2, q, C) and out["enc_outputs"]["pred_boxes"].shape == (2, q, 4)
    dn = out["dn_outputs"]
    # tiny: dn_number 20, at most 5 boxes -> 4 groups of 2 * 5 queries.
    assert (dn["num_groups"], dn["group_size"]) == (4, 10)
    assert dn["pred_logits"].shape == (2, 40, C) and dn["pred_boxes"].shape == (2, 40, 4)
    assert dn["pred_semantic"].shape == (2, 40, C)
    assert len(dn["aux_outputs"]) == 1

    model.eval()
    with torch.no_grad():
        out = model(images, mask, targets)
    assert "dn_outputs" not in out  # no denoising at inference


def test_gradient_reaches_every_trainable_parameter_and_no_frozen_one(tiny):
    model, criterion, _ = tiny
    g = torch.Generator().manual_seed(2)
    images, mask = batch(g)
    targets = make_targets(g)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3)
    # Step 1: the zero-initialised last box-head layers and sampling-offset weights block some
    # gradients at initialisation (exactly zero); one update opens every path.
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        losses = criterion(model(images, mask, targets), targets)
        assert all(torch.isfinite(v) for v in losses.values())
        criterion.weighted_total(losses).backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("features.backbone.stem", "features.backbone.layer1")) for n in frozen)
    assert any(n.startswith("features.backbone.layer1") for n in frozen)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert any(n.startswith("semantic_head.") for n, p in model.named_parameters() if p.grad is not None)
    assert any(n == "dn_unknown_label" for n, p in model.named_parameters() if p.grad is not None)


def test_empty_targets_train_without_denoising(tiny):
    model, criterion, _ = tiny
    g = torch.Generator().manual_seed(3)
    images, mask = batch(g)
    targets = make_targets(g, counts=(0, 0))
    model.train()
    out = model(images, mask, targets)
    assert "dn_outputs" not in out
    losses = criterion(out, targets)
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0  # every query is a negative
    model.zero_grad(set_to_none=True)
    criterion.weighted_total(losses).backward()
    # Every trainable parameter is still in the graph (DistributedDataParallel requires it).
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_postprocess_top_pairs_in_original_pixels(tiny):
    _, _, postprocess = tiny
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 2], logits[0, 1, 3], logits[0, 0, 0] = 5.0, 4.0, 3.0  # one query can give two detections
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.9, 0.9, 0.4, 0.4]]])
    (det,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))
    assert det["labels"][:3].tolist() == [2, 3, 0] and det["labels"].dtype == torch.int64
    assert det["scores"].shape == (12,) and (det["scores"][:-1] >= det["scores"][1:]).all()
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.0, 0.0, 200.0, 200.0]))
    torch.testing.assert_close(det["boxes"][2], torch.tensor([160.0, 60.0, 240.0, 140.0]))
    # Boxes reaching past the image are clipped to it.
    assert det["boxes"][:, 2].max() <= 400 and det["boxes"][:, 3].max() <= 200


def test_denoising_queries_layout_noise_and_mask():
    torch.manual_seed(0)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]), "labels": torch.tensor([1, -1])},
        {"boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]]), "labels": torch.tensor([2])},
    ]
    dn = make_denoising_queries(targets, lambda lab: lab[:, None].float().expand(-1, 4) + 10, 5, 3, 6, 0.0, 1.0)
    assert (dn.num_groups, dn.group_size, dn.num_queries) == (3, 4, 12)
    content = dn.content[..., 0]
    # Group layout: positives then negatives of boxes 0..m-1; unused slots stay zero.
    assert content[0, :4].tolist() == [11.0, 9.0, 11.0, 9.0] and content[1, :4].tolist() == [12.0, 0.0, 12.0, 0.0]
    assert (dn.content[:, 4:] == dn.content[:, :4].repeat(1, 2, 1)).all()
    # Matching queries never see dn queries; dn groups see only themselves.
    m = dn.attn_mask
    assert m.shape == (15, 15) and m[12:, :12].all() and not m[12:, 12:].any() and not m[:12, 12:].any()
    assert not m[4:8, 4:8].any() and m[4:8, :4].all() and m[4:8, 8:12].all()
    torch.testing.assert_close(attention_mask(1, 2, 1, torch.device("cpu")),
                               torch.tensor([[False, False, False], [False, False, False], [True, True, False]]))


def test_box_noise_positive_within_half_size_negative_beyond():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2000, 1)
    negative = torch.arange(2000) >= 1000
    noised = noise_boxes(boxes, negative, 1.0)
    corners = lambda b: torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)  # noqa: E731
    shift = (corners(noised) - corners(boxes)).abs() / 0.1  # in units of half the box size
    assert (shift[:1000] < 1 + 1e-5).all() and (shift[1000:] > 1 - 1e-5).all() and (shift[1000:] < 2 + 1e-5).all()


def test_label_noise_flips_about_a_quarter():
    torch.manual_seed(0)
    targets = [{"boxes": torch.rand(1, 4) * 0.5 + 0.25, "labels": torch.tensor([0])}]
    dn = make_denoising_queries(targets, lambda lab: torch.nn.functional.one_hot(lab, 1000).float(), 1000, 1, 4000, 0.5, 1.0)
    flipped = (dn.content.argmax(-1) != 0).float().mean().item()
    assert 0.22 < flipped < 0.28  # ratio / 2 = 0.25 (a random class equals the old one 1/1000 of the time)


def test_export_drops_exactly_the_semantic_branch(tiny, tmp_path):
    model, _, _ = tiny
    cfg = model_config("tiny")
    ckpt, out = tmp_path / "ckpt.pth", tmp_path / "export" / "model.pth"
    # A training-style checkpoint: the model config is a section of a larger config.
    torch.save({"model": model.state_dict(), "config": {"model": to_dict(cfg), "lr": 1e-4}, "epoch": 3}, ckpt)
    dropped = export_inference_model(ckpt, out)
    semantic = sorted(k for k in model.state_dict() if k.startswith("semantic_head."))
    assert dropped == semantic and semantic
    exported = torch.load(out, weights_only=True)
    assert set(exported["model"]) == set(model.state_dict()) - set(semantic)
    assert exported["config"]["model"]["head"]["semantic_branch"] is False and "epoch" not in exported

    g = torch.Generator().manual_seed(5)
    images, mask = batch(g)
    full, slim = load_model(ckpt), load_model(out)
    assert slim.semantic_head is None
    with torch.no_grad():
        a, b = full(images, mask), slim(images, mask)
    assert "pred_semantic" in a and "pred_semantic" not in b
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(LtDistillError, match="not found"):
        export_inference_model(tmp_path / "missing.pth", tmp_path / "out.pth")
    torch.save({"weights": {}}, tmp_path / "bad.pth")
    with pytest.raises(LtDistillError, match="not an lt-distill checkpoint"):
        load_model(tmp_path / "bad.pth")
    torch.save({"model": {}, "config": {"head": {"semantic_brnach": False}}}, tmp_path / "typo.pth")
    with pytest.raises(ConfigError, match="semantic_brnach"):
        export_inference_model(tmp_path / "typo.pth", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_save_checkpoint_round_trip(tiny, tmp_path):
    model, _, _ = tiny
    cfg = dataclasses.replace(model_config("tiny"))
    save_checkpoint(tmp_path / "c.pth", model, cfg, epoch=1)
    loaded = load_model(tmp_path / "c.pth")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_backbone_weights_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    body = ResNetBackbone("resnet18", tmp_path / "r18.pth")
    torch.testing.assert_close(body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(body.stem[1].running_var, reference.bn1.running_var)
    with pytest.raises(LtDistillError, match="not found"):
        ResNetBackbone("resnet18", tmp_path / "nope.pth")
    with pytest.raises(LtDistillError, match="does not fit"):
        load_resnet_weights(torchvision.models.resnet50(weights=None), tmp_path / "r18.pth")
