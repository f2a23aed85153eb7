"""Transforms, region tracking, mosaic and repeat-factor sampling of the stage-2 data pipeline."""

import math
import random

import numpy as np
import pytest
import torch

from lt_distill.pipeline.data import transforms as T
from lt_distill.pipeline.data.config import ClassificationAugConfig, DetectionAugConfig, data_config
from lt_distill.pipeline.data.mosaic import RandomMosaic, mosaic_tiles
from lt_distill.pipeline.data.sampler import RepeatFactorSampler, category_repeat_factors, repeat_factors
from lt_distill.pipeline.grid import GridSpec


def coordinate_grid(h, w):
    """float64 image whose pixel (y, x) holds its own centre in normalised original coordinates."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    return torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, dtype=torch.float64)])


def tile_target(h, w, label=1):
    return {"boxes": torch.tensor([[0.0, 0.0, float(w), float(h)]]), "labels": torch.tensor([label]),
            "region": (0.0, 0.0, 1.0, 1.0), "flipped": False, "size": torch.tensor([h, w])}


def region_errors(patch, region, flipped, margin=2):
    """Largest |coordinate held by a transformed grid image - coordinate the tracked region predicts|
    along x and y, in normalised original units, and the size of one output pixel in those units.
    Interior pixels only: border pixels mix in clamped neighbours when resampled."""
    h, w = patch.shape[-2:]
    x0, y0, x1, y1 = region
    fx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    fy = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    ex = x1 - fx * (x1 - x0) if flipped else x0 + fx * (x1 - x0)
    ey = y0 + fy * (y1 - y0)
    inner = (slice(margin, h - margin), slice(margin, w - margin))
    errx = float((patch[0][inner] - ex[None, margin:w - margin]).abs().max())
    erry = float((patch[1][inner] - ey[margin:h - margin, None]).abs().max())
    return (errx, erry), ((x1 - x0) / w, (y1 - y0) / h)


@pytest.mark.parametrize("mode", ["nearest", "exact"])
def test_tracked_region_equals_transformed_coordinate_grid(mode):
    aug = ClassificationAugConfig(crop_match=mode, crop_prob=1.0, tile_size=64)
    tile_tf = T.make_tile_transforms(aug, GridSpec.parse("default").boxes())
    fit = "quadrant" if mode == "exact" else "tile"
    checked, flipped, cut = 0, 0, 0
    for seed in range(30):
        random.seed(seed)
        tiles, sizes = [], []
        for _ in range(4):
            h, w = random.randint(40, 160), random.randint(40, 160)
            tiles.append(tile_tf(coordinate_grid(h, w), tile_target(h, w)))
            sizes.append((h, w))
        canvas, target = RandomMosaic(64, pad_value=-1.0, fit=fit)(tiles)
        for box, region, flip, tile in zip(target["boxes"].tolist(), target["regions"], target["flipped"],
                                           target["tiles"].tolist()):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            assert np.allclose(box, [x0, y0, x1, y1])  # tiles are pasted at whole pixels
            patch = canvas[:, y0:y1, x0:x1]
            assert torch.allclose(patch[2], torch.ones_like(patch[2]))  # the box covers tile pixels only
            if min(patch.shape[-2:]) <= 6:
                continue
            (errx, erry), (px, py) = region_errors(patch, region, flip)
            # Resampling a linear ramp is exact up to ~0.1 output pixel; exact mode also cuts the grid box
            # at whole input pixels (up to half an input pixel per edge).
            h, w = sizes[tile]
            slack_x, slack_y = (0.5 / w, 0.5 / h) if mode == "exact" else (0.0, 0.0)
            assert errx < 0.15 * px + slack_x and erry < 0.15 * py + slack_y
            checked += 1
            flipped += int(flip)
            cut += int(tuple(region) != (0.0, 0.0, 1.0, 1.0))
    assert checked > 80 and flipped > 20 and cut > 60
    # the whole canvas outside the boxes is padding
    assert (canvas[2] < 0).sum() + sum((b[2] - b[0]) * (b[3] - b[1]) for b in target["boxes"].tolist()) \
        == pytest.approx(canvas.shape[-1] * canvas.shape[-2])


def test_exact_mode_regions_are_grid_boxes():
    grid = GridSpec.parse("default").boxes()
    aug = ClassificationAugConfig(crop_match="exact", crop_prob=0.7, tile_size=64)
    tile_tf = T.make_tile_transforms(aug, grid)
    seen = set()
    for seed in range(40):
        random.seed(seed)
        tiles = [tile_tf(torch.zeros(3, 90, 70, dtype=torch.uint8), tile_target(90, 70)) for _ in range(4)]
        _, target = RandomMosaic(64, fit="quadrant")(tiles)
        for region in target["regions"]:
            hit = np.nonzero((np.abs(grid - region) < 1e-12).all(axis=1))[0]
            assert len(hit) == 1
            seen.add(int(hit[0]))
    assert len(seen) > 15


def test_detection_transforms_move_boxes_with_pixels():
    """Boxes of a transformed image, mapped back through the tracked region, are the original boxes
    clipped to the visible region."""
    aug = DetectionAugConfig(scales=[96, 128], max_size=160, crop_prob=0.5, crop_resize_scales=[80, 100],
                             crop_min_size=50, crop_max_size=90)
    tf = T.make_detection_transforms(aug)
    for seed in range(40):
        random.seed(seed)
        h, w = 120, 90
        boxes = torch.tensor([[10.0, 20.0, 60.0, 100.0], [0.0, 0.0, 90.0, 120.0], [70.0, 5.0, 88.0, 30.0]])
        target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "ann_ids": torch.tensor([11, 12, 13]),
                  "area": torch.ones(3), "region": (0.0, 0.0, 1.0, 1.0), "flipped": False,
                  "size": torch.tensor([h, w])}
        image, out = tf(coordinate_grid(h, w), target)
        assert tuple(out["size"].tolist()) == tuple(image.shape[-2:])
        assert min(image.shape[-2:]) <= 128 and max(image.shape[-2:]) <= 160
        oh, ow = image.shape[-2:]
        x0, y0, x1, y1 = out["region"]
        for b, ann in zip(out["boxes"].tolist(), out["ann_ids"].tolist()):
            fx0, fx1 = b[0] / ow, b[2] / ow
            xs = sorted([x1 - fx0 * (x1 - x0), x1 - fx1 * (x1 - x0)] if out["flipped"]
                        else [x0 + fx0 * (x1 - x0), x0 + fx1 * (x1 - x0)])
            ys = [y0 + b[1] / oh * (y1 - y0), y0 + b[3] / oh * (y1 - y0)]
            orig = boxes[ann - 11].tolist()
            want = [max(orig[0] / w, x0), max(orig[1] / h, y0), min(orig[2] / w, x1), min(orig[3] / h, y1)]
            assert np.allclose([xs[0], ys[0], xs[1], ys[1]], want, atol=1e-5)
        assert len(out["labels"]) == len(out["boxes"]) == len(out["ann_ids"])


def test_hflip_twice_is_identity_and_resize_follows_detr_sizes():
    image = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    target = {"boxes": torch.tensor([[1.0, 1.0, 3.0, 4.0]]), "region": (0.1, 0.2, 0.6, 0.9), "flipped": False}
    im2, t2 = T.hflip(*T.hflip(image, target))
    assert torch.equal(im2, image) and torch.equal(t2["boxes"], target["boxes"]) and not t2["flipped"]
    assert T.size_with_aspect_ratio(480, 640, 800, 1333) == (800, 1066)
    assert T.size_with_aspect_ratio(400, 1600, 800, 1333) == (333, 1332)  # DETR's rounding
    assert T.size_with_aspect_ratio(800, 600, 600) == (800, 600)


def test_crop_drops_boxes_outside_and_box_to_pixels_rounds():
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]),
              "labels": torch.tensor([3, 4]), "ann_ids": torch.tensor([7, 8])}
    _, out = T.crop(torch.zeros(3, 100, 100), target, (0, 0, 40, 40))
    assert out["labels"].tolist() == [3] and out["ann_ids"].tolist() == [7]
    assert T.box_to_pixels((0.125, 0.25, 0.875, 1.0), 10, 8) == (2, 1, 6, 8)
    assert T.box_to_pixels((0.0, 0.0, 0.01, 0.01), 10, 10) == (0, 0, 1, 1)  # at least one pixel


def test_mosaic_boxes_stay_inside_canvas():
    aug = ClassificationAugConfig(crop_match="nearest", crop_prob=0.5, tile_size=32, center_ratio_range=(0.0, 2.0))
    tile_tf = T.make_tile_transforms(aug)
    n_boxes = 0
    for seed in range(60):
        random.seed(seed)
        sizes = [(random.randint(8, 120), random.randint(8, 120)) for _ in range(4)]
        tiles = [tile_tf(torch.zeros(3, h, w, dtype=torch.uint8), tile_target(h, w)) for h, w in sizes]
        canvas, target = RandomMosaic(32, aug.center_ratio_range, fit=random.choice(["tile", "quadrant"]))(tiles)
        assert canvas.shape == (3, 64, 64)
        b = target["boxes"]
        assert (b >= 0).all() and (b <= 64).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert len(b) == len(target["labels"]) == len(target["regions"]) <= 4
        n_boxes += len(b)
    assert n_boxes > 150


def test_mosaic_quadrant_fit_never_cuts_a_tile():
    tiles = [(torch.ones(3, h, w), tile_target(h, w)) for h, w in [(50, 100), (100, 50), (30, 30), (200, 120)]]
    _, target = mosaic_tiles(tiles, 64, (40, 90), pad_value=0, fit="quadrant")
    assert len(target["regions"]) == 4 and (target["regions"] == [0.0, 0.0, 1.0, 1.0]).all()
    quadrants = [(0, 0, 40, 90), (40, 0, 128, 90), (0, 90, 40, 128), (40, 90, 128, 128)]
    for box, (qx0, qy0, qx1, qy1) in zip(target["boxes"].tolist(), quadrants):
        assert qx0 <= box[0] and qy0 <= box[1] and box[2] <= qx1 and box[3] <= qy1


def test_repeat_factors_follow_lvis_formula_on_crafted_histogram():
    # 10000 images; category 0 in 1 image, 1 in 5, 2 in 10, 3 in 5000, 4 in 40; t = 0.001.
    n = 10_000
    cats = [[] for _ in range(n)]
    for c, count in [(0, 1), (1, 5), (2, 10), (3, 5000), (4, 40)]:
        for i in range(count):
            cats[(i * 7 + c * 13) % n].append(c)
    cats[5].extend([4, 4])  # duplicates inside one image count once
    per_cat = category_repeat_factors(cats, 0.001)
    expected = {0: math.sqrt(0.001 / (1 / n)), 1: math.sqrt(0.001 / (5 / n)), 2: 1.0, 3: 1.0,
                4: 1.0}
    assert per_cat == pytest.approx(expected)
    factors = repeat_factors(cats, 0.001)
    for i in range(n):
        want = max((expected[c] for c in cats[i]), default=1.0)
        assert factors[i] == pytest.approx(want)
    assert factors.max() == pytest.approx(math.sqrt(10))
    assert (repeat_factors(cats, 0.0) == 1).all()


def test_repeat_factor_sampler_expected_counts_and_rank_split():
    factors = np.array([1.0, 2.5, 1.2, 3.0, 1.0])
    counts = np.zeros(5)
    sampler = RepeatFactorSampler(factors, num_replicas=1, rank=0, seed=3)
    epochs = 400
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts += np.bincount(list(sampler), minlength=5)
    assert counts / epochs == pytest.approx(factors, abs=0.08)
    # two ranks: same epoch permutation, disjoint halves of it, equal lengths
    a = RepeatFactorSampler(factors, num_replicas=2, rank=0, seed=3)
    b = RepeatFactorSampler(factors, num_replicas=2, rank=1, seed=3)
    full = RepeatFactorSampler(factors, num_replicas=1, rank=0, seed=3)
    for epoch in range(5):
        for s in (a, b, full):
            s.set_epoch(epoch)
        whole = list(full)
        padded = whole + whole[: (len(whole) % 2)]
        assert len(a) == len(b) and list(a) == padded[0::2] and list(b) == padded[1::2]


def test_data_presets_validate():
    tiny = data_config("tiny")
    assert max(tiny.det_aug.scales) <= 256 and tiny.cls_aug.tile_size * 2 == 256
    assert data_config().det_aug.scales == list(range(480, 801, 32))
    with pytest.raises(ValueError, match="crop_match"):
        data_config("default", {"cls_aug": {"crop_match": "closest"}})
