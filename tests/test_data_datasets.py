"""Detection and classification datasets, cached soft labels, store checks and the alternating loader."""

import json
import random

import numpy as np
import pytest
import torch

from lt_distill.pipeline.data import (
    CropSoftLabels,
    assign_shards,
    build_classification_dataset,
    build_detection_dataset,
    build_train_loader,
    data_config,
    load_detection_annotations,
    open_label_store,
)
from lt_distill.pipeline.data import synthetic as S
from lt_distill.pipeline.grid import GridSpec
from lt_distill.store import LabelReader, StoreMismatchError, decode_topk

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    pattern, keys, classes = S.write_shards(root / "shards", 3, 8, seed=1, broken=[(1, 2)], num_classes=NUM_CLASSES)
    jpath, images = S.write_detection_set(root / "det", 10, num_classes=NUM_CLASSES, seed=2)
    anns = json.loads(jpath.read_text())["annotations"]
    labelled = [a["id"] for a in anns if a["id"] % 3]  # every third annotation has no object label
    hard = [[c if i % 4 else -1 for i, c in enumerate(shard)] for shard in classes]
    S.write_label_store(root / "store", keys, num_classes=NUM_CLASSES, hard_labels=hard, objects=labelled, seed=3)
    return {"root": root, "pattern": pattern, "keys": keys, "hard": hard, "json": jpath, "images": images,
            "anns": anns, "labelled": set(labelled), "store": root / "store"}


def config(data, **overrides):
    base = {"det_annotations": str(data["json"]), "det_images": str(data["images"]), "cls_shards": data["pattern"],
            "label_store": str(data["store"])}
    base.update(overrides)
    return data_config("tiny", base)


def all_tiles(dataset):
    for image, target in dataset:
        for i in range(len(target["labels"])):
            yield image, target, i


# ---------------------------------------------------------------------------------- crop labels
def test_exact_mode_returns_the_stored_label_bit_for_bit(data):
    cfg = config(data, cls_aug={"crop_match": "exact", "crop_prob": 0.8, "tile_size": 48}, cls_unlabelled="keep")
    reader = open_label_store(cfg)
    grid = np.asarray(reader.attrs["grid"]["boxes"])
    random.seed(0)
    dataset = build_classification_dataset(cfg, reader, repeat=False)
    n, cropped, flipped = 0, 0, 0
    for _, target, i in all_tiles(dataset):
        shard, pos = target["rows"][i].tolist()
        region = target["regions"][i].numpy()
        j = np.nonzero((np.abs(grid - region) < 1e-12).all(axis=1))[0]
        assert len(j) == 1 and bool(target["soft_mask"][i])
        index, prob, valid = reader.labels(shard, pos)
        want = decode_topk(index[j[0]], prob[j[0]], NUM_CLASSES, reader.attrs["encoding"]["residual"])
        assert np.array_equal(target["soft_labels"][i].numpy(), want)
        assert target["labels"][i] == data["hard"][shard][pos]
        n += 1
        cropped += int(j[0] != 0)
        flipped += int(target["flipped"][i])
    assert n == 23  # 24 samples, one undecodable
    assert cropped > 8 and flipped > 4


def iou(a, b):
    lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    return inter / ((a[2:] - a[:2]).prod() + (b[:, 2:] - b[:, :2]).prod(-1) - inter)


def test_nearest_and_interp_follow_their_rules(data):
    reader = LabelReader(data["store"])
    grid = GridSpec.parse("default").boxes()
    index, prob, _ = reader.labels(0, 5)
    full = decode_topk(index, prob, NUM_CLASSES, reader.attrs["encoding"]["residual"])  # (K, C)
    regions = np.array([[0.02, 0.0, 0.52, 0.48],   # close to a 0.5 box
                        [0.1, 0.1, 0.95, 0.9],     # close to the whole image / 0.75 boxes
                        [0.0, 0.0, 0.08, 0.08],    # tiny: no grid box reaches the threshold
                        [0.3, 0.3, 0.7, 0.7]])
    nearest = CropSoftLabels(reader, "nearest", iou_threshold=0.5)
    soft, mask = nearest(0, 5, regions)
    for r, s, m in zip(regions, soft, mask):
        ious = iou(r, grid)
        assert m == (ious.max() >= 0.5)
        if m:
            assert np.array_equal(s, full[ious.argmax()])
        else:
            assert not s.any()
    interp = CropSoftLabels(reader, "interp", iou_threshold=0.5, top_n=3)
    soft, mask = interp(0, 5, regions)
    for r, s, m in zip(regions, soft, mask):
        ious = iou(r, grid)
        assert m == (ious.max() >= 0.5)
        if m:  # the (at most 3) boxes at or above the threshold, weighted by IoU
            top = np.argsort(-ious, kind="stable")[:3]
            top = top[ious[top] >= 0.5]
            w = ious[top] / ious[top].sum()
            assert np.allclose(s, (w[:, None] * full[top]).sum(0), atol=1e-6)
            assert s.sum() == pytest.approx(1.0, abs=1e-3)
    assert mask.tolist() == [True, True, False, True]
    soft, mask = interp(0, 5, grid[[7, 20]])  # a grid box itself: exactly its own label
    assert mask.all() and np.array_equal(soft, full[[7, 20]])


def test_store_with_other_vocabulary_or_grid_is_refused_by_name(data, tmp_path):
    S.write_label_store(tmp_path / "coarse", data["keys"], num_classes=NUM_CLASSES, grid="coarse")
    with pytest.raises(StoreMismatchError, match=r"grid\.spec: store has '1:1,0\.6:2,0\.4:3'"):
        open_label_store(config(data, label_store=str(tmp_path / "coarse")))
    names = S.class_names(NUM_CLASSES)
    other = names[:-1] + ["something_else"]
    S.write_label_store(tmp_path / "vocab", data["keys"], num_classes=NUM_CLASSES, vocabulary=other)
    with pytest.raises(StoreMismatchError, match=r"vocabulary\.sha256"):
        open_label_store(config(data, label_store=str(tmp_path / "vocab")), vocabulary=names)
    open_label_store(config(data), vocabulary=names)  # the matching store passes


# ---------------------------------------------------------------------------------- detection
def test_detection_dataset_skips_and_counts_broken_inputs(data, tmp_path):
    doc = json.loads(data["json"].read_text())
    doc["annotations"] += [
        {"id": 9001, "image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 5]},        # empty box
        {"id": 9002, "image_id": 1, "category_id": 999, "bbox": [1, 2, 3, 5]},      # unknown category
        {"id": 9003, "image_id": 4242, "category_id": 1, "bbox": [1, 2, 3, 5]},     # unknown image
        {"id": 9004, "image_id": 1, "category_id": 1, "bbox": [1, "x", 3, 5]},      # bad box
        {"id": 9005, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 5], "iscrowd": 1},
    ]
    doc["images"] += [{"id": 77, "height": 50, "width": 60, "coco_url": "http://x/train2017/missing.jpg"},
                      {"id": 78, "height": 50, "width": 60, "file_name": "broken.jpg"},
                      {"id": 79, "height": 10, "width": 10, "file_name": "train2017/000000000001.jpg"},
                      {"id": "bad"}]
    (data["images"] / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(doc))
    records, cats, skipped = load_detection_annotations(path)
    assert skipped == {"empty_box": 1, "unknown_category": 1, "unknown_image": 1, "bad_bbox": 1, "crowd": 1,
                       "bad_image_entry": 1}
    assert len(cats) == NUM_CLASSES and len(records) == 13
    cfg = config(data, det_annotations=str(path))
    dataset = build_detection_dataset(cfg, open_label_store(cfg))
    reasons = {}
    ids = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        ids.append(target["image_id"])
        for k, v in target["skipped"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == {"missing_image": 1, "undecodable_image": 1, "size_mismatch": 1}
    assert not {77, 78, 79} & set(ids)


def test_detection_targets_carry_object_soft_labels(data):
    cfg = config(data)
    reader = open_label_store(cfg)
    dataset = build_detection_dataset(cfg, reader)
    by_id = {a["id"]: a for a in data["anns"]}
    random.seed(1)
    seen_masked = seen_labelled = 0
    for i in range(len(dataset)):
        image, t = dataset[i]
        n = len(t["labels"])
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert t["boxes"].shape == (n, 4) and t["soft_labels"].shape == (n, NUM_CLASSES)
        assert t["soft_labels"].dtype == torch.float32 and t["soft_mask"].dtype == torch.bool
        assert t["labels"].dtype == torch.int64 and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert tuple(t["size"].tolist()) == tuple(image.shape[-2:])
        for ann_id, label, soft, m in zip(t["ann_ids"].tolist(), t["labels"].tolist(), t["soft_labels"], t["soft_mask"]):
            assert label == by_id[ann_id]["category_id"] - 1
            assert bool(m) == (ann_id in data["labelled"])
            if m:
                index, prob, _ = reader.objects([ann_id])
                assert torch.equal(soft, torch.from_numpy(reader.decode(index, prob)[0]))
                seen_labelled += 1
            else:
                assert not soft.any()
                seen_masked += 1
    assert seen_masked > 3 and seen_labelled > 6


# ---------------------------------------------------------------------------------- classification
def test_classification_positions_follow_keys_and_missing_rows_are_masked(data, tmp_path):
    # A store whose shard 0 lists its keys in another order and lacks one: the dataset must find rows by
    # key, and mask the sample the store does not hold.
    keys = [list(k) for k in data["keys"]]
    keys[0] = keys[0][::-1][:-1] + ["not_in_the_tar"]
    hard = [[(hash(k) % NUM_CLASSES) for k in shard] for shard in keys]
    S.write_label_store(tmp_path / "store", keys, num_classes=NUM_CLASSES, hard_labels=hard)
    cfg = config(data, label_store=str(tmp_path / "store"), cls_aug={"mosaic_prob": 0.0}, cls_unlabelled="keep")
    reader = open_label_store(cfg)
    dataset = build_classification_dataset(cfg, reader, repeat=False)
    seen, masked, skipped = 0, 0, {}
    for _, t in dataset:
        for k, v in t["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        shard, pos = t["rows"][0].tolist()
        if shard < 0:
            assert not t["soft_mask"][0] and t["labels"][0] == -1
            masked += 1
            continue
        assert t["labels"][0] == hard[shard][pos]
        seen += 1
    assert masked == 1 and seen == 22 and skipped == {"not_in_store": 1, "undecodable": 1}


def test_unlabelled_classification_images_are_skipped_and_counted(data):
    # Hard label -1 on positions 0 and 4 of every shard (6 samples); one other sample is undecodable.
    cfg = config(data, cls_aug={"mosaic_prob": 0.0})
    assert cfg.cls_unlabelled == "skip"  # the default: RichSem trains on mapped images only
    dataset = build_classification_dataset(cfg, open_label_store(cfg), repeat=False)
    labels, skipped = [], {}
    for _, t in dataset:
        labels += t["labels"].tolist()
        for k, v in t["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert len(labels) == 17 and min(labels) >= 0
    assert skipped == {"unlabelled": 6, "undecodable": 1}
    keep = config(data, cls_aug={"mosaic_prob": 0.0}, cls_unlabelled="keep")
    kept = [t["labels"][0].item() for _, t in build_classification_dataset(keep, open_label_store(keep), repeat=False)]
    assert len(kept) == 23 and kept.count(-1) == 6


def test_shard_assignment_covers_every_sample_once():
    for num_shards in (1, 2, 3, 7):
        for units in (1, 2, 4, 5):
            claims = {}
            for u in range(units):
                for shard, stride, offset in assign_shards(num_shards, u, units):
                    for p in range(12):
                        if p % stride == offset:
                            assert (shard, p) not in claims
                            claims[(shard, p)] = u
            assert len(claims) == num_shards * 12


def test_alternating_loader_batches(data):
    cfg = config(data)
    loader = build_train_loader(cfg, open_label_store(cfg))
    loader.set_epoch(0)
    random.seed(0)
    sources = []
    for batch in loader:
        sources.append(batch["source"])
        b, _, h, w = batch["images"].shape
        assert b == cfg.batch_size and batch["pixel_mask"].shape == (b, h, w)
        assert batch["pixel_mask"].dtype == torch.bool
        for img_mask, t in zip(batch["pixel_mask"], batch["targets"]):
            th, tw = t["size"].tolist()
            assert not img_mask[:th, :tw].any() and img_mask.sum() == h * w - th * tw
            n = len(t["labels"])
            assert t["boxes"].shape == (n, 4) and t["soft_labels"].shape == (n, NUM_CLASSES)
            assert t["soft_mask"].shape == (n,) and isinstance(t["image_id"], int)
            assert t["orig_size"].dtype == torch.int64 and t["size"].dtype == torch.int64
            if batch["source"] == "classification":
                assert t["image_id"] < 0 and n >= 1
                assert max(h, w) <= 2 * cfg.cls_aug.tile_size
    assert len(sources) == len(loader) == 2 * (len(loader.detection))
    assert sources == ["detection", "classification"] * (len(sources) // 2)
