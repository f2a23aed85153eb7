"""Teacher preprocessing follows open_clip's own (issue 10 point 9) and the online path cuts and scores
on the teacher's device in calls sized to the work (issue 11 §4).

Tolerances: our uint8 crops equal open_clip's PIL transform within one grey level (PIL and torch's
antialiased kernels round differently; measured: max 1 level, mean < 0.01 level on chelsea); the float
path the GPU runs equals the uint8 path within one level (measured mean < 0.02 level)."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lt_distill.pipeline.data import build_detection_dataset, build_detection_loader, data_config
from lt_distill.pipeline.data import synthetic as S
from lt_distill.pipeline.data.online import OnlineSoftLabeler
from lt_distill.pipeline.teacher import (
    Normalize,
    Preprocess,
    PreprocessError,
    TeacherConfig,
    build_teacher,
    crop_and_resize,
    cut_and_resize,
)
from lt_distill.pipeline.teacher.preprocess import resized_shape
from lt_distill.store import LabelReader

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import photo  # noqa: E402

open_clip_transform = pytest.importorskip("open_clip.transform")


@pytest.mark.parametrize("interpolation,resize_mode,size", [
    ("bicubic", "shortest", 224), ("bilinear", "squash", 224), ("bicubic", "shortest", 64), ("bicubic", "squash", 96),
])
def test_preprocessing_equals_open_clips_transform(interpolation, resize_mode, size):
    cfg = open_clip_transform.PreprocessCfg(size=size, interpolation=interpolation, resize_mode=resize_mode)
    img = photo("chelsea")  # (300, 451, 3): not square, so shortest and squash differ
    want = open_clip_transform.image_transform_v2(cfg, is_train=False)(Image.fromarray(img))
    pre = Preprocess.from_open_clip({"interpolation": interpolation, "resize_mode": resize_mode}, size)
    got = Normalize(cfg.mean, cfg.std)(crop_and_resize(img, np.array([[0.0, 0.0, 1.0, 1.0]]), pre))[0]
    levels = (got - want).abs() * torch.tensor(cfg.std).view(3, 1, 1) * 255
    assert got.shape == want.shape == (3, size, size)
    assert levels.max() <= 1.001 and levels.mean() <= 0.02


def test_resize_modes_by_hand():
    shortest, squash = Preprocess(224, "bicubic", "shortest"), Preprocess(224, "bilinear", "squash")
    assert resized_shape(300, 451, shortest) == (224, 336)  # int(224 * 451 / 300): torchvision's rule
    assert resized_shape(451, 300, shortest) == (336, 224)
    assert resized_shape(300, 451, squash) == (224, 224)
    # shortest = resize, then the centre: a 2x6 image whose columns are 0..5, to 2x2, keeps columns 2 and 3
    img = torch.arange(6, dtype=torch.uint8).repeat(3, 2, 1) * 40
    out = cut_and_resize(img, np.array([[0.0, 0.0, 1.0, 1.0]]), Preprocess(2, "bilinear", "shortest"))
    assert torch.equal(out[0], img[:, :, 2:4])
    with pytest.raises(PreprocessError, match="longest"):
        Preprocess(224, "bicubic", "longest")
    with pytest.raises(PreprocessError, match="interpolation"):
        Preprocess(224, "nearest", "squash")
    assert Preprocess.from_open_clip({"interpolation": "random"}, 64) == Preprocess(64, "bicubic", "shortest")
    assert Preprocess.from_open_clip(None, 64).to_dict() == {"size": 64, "interpolation": "bicubic",
                                                            "resize_mode": "shortest", "antialias": True}


@pytest.mark.parametrize("pre", [Preprocess(64, "bicubic", "shortest"), Preprocess(48, "bilinear", "squash")])
def test_float_path_is_within_one_level_of_the_uint8_path(pre):
    img = torch.from_numpy(photo("astronaut")).permute(2, 0, 1).contiguous()
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.7, 0.9], [0.5, 0.5, 0.55, 0.6]])
    u8 = cut_and_resize(img, boxes, pre)
    fl = cut_and_resize(img.float(), boxes, pre)
    assert fl.dtype == torch.float32 and torch.equal(fl, fl.round())
    assert (fl - u8.float()).abs().max() <= 1 and (fl - u8.float()).abs().mean() < 0.05


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single", vocab="lvis-v1",
                                       device="cpu", engine="eager"))


def test_teacher_follows_the_models_preprocess_cfg_and_records_it(teacher):
    cfg = teacher.model.visual.preprocess_cfg
    assert teacher.preprocess == Preprocess(teacher.input_size, cfg["interpolation"], cfg["resize_mode"])
    assert teacher.pooled_preprocess == Preprocess(teacher.pooled_size, cfg["interpolation"], "squash")
    assert teacher.provenance("crops")["preprocess"] == teacher.preprocess.to_dict()
    assert teacher.provenance("pooled")["preprocess"]["resize_mode"] == "squash"
    img, boxes = photo("coffee"), np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.9, 0.6]])
    want = teacher.score_crop_batch(crop_and_resize(img, boxes, teacher.preprocess))
    torch.testing.assert_close(teacher.score_crops(img, boxes), want)
    squashed = teacher.score_crop_batch(crop_and_resize(img, boxes, teacher.input_size))
    assert not torch.allclose(squashed, want)  # the setting matters for a non-square box


def test_online_pooled_batch_equals_per_image_scoring(tmp_path):
    """Detection boxes of all images in one pooled call (boxes padded to the longest list) give each
    image's labels as scoring it alone does."""
    jpath, images = S.write_detection_set(tmp_path / "det", 4, seed=3)
    t = build_teacher(TeacherConfig(model="lt-tiny-rn", random_init=True, vocab=str(jpath), templates="single",
                                    device="cpu", engine="eager"))
    pattern, keys, _ = S.write_shards(tmp_path / "shards", 1, 4, seed=8)
    S.write_label_store(tmp_path / "store", keys, num_classes=len(t.vocabulary))
    cfg = data_config("tiny", {"det_annotations": str(jpath), "det_images": str(images), "cls_shards": pattern,
                               "label_store": str(tmp_path / "store"), "batch_size": 3})
    random.seed(0)
    batch = next(iter(build_detection_loader(cfg, build_detection_dataset(cfg, LabelReader(cfg.label_store)))))
    counts = [len(tg["boxes"]) for tg in batch["targets"]]
    assert len(set(counts)) > 1, counts  # unequal box lists: the padding is exercised
    labeler = OnlineSoftLabeler(t, cfg.pixel_mean, cfg.pixel_std, profile=True)
    labeler(batch)
    for image, tg in zip(batch["images"], batch["targets"]):
        canvas = labeler.image_uint8(image, tg["size"])
        b = tg["boxes"].float()
        xyxy = torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1).clamp(0, 1).numpy()
        torch.testing.assert_close(tg["soft_labels"], t.score_pooled(canvas, xyxy).float(), rtol=1e-4, atol=1e-6)
    assert labeler.calls == 1 and all(v > 0 for v in labeler.timings.values())
