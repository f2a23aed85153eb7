import numpy as np
import pytest

from lt_distill.errors import ConfigError
from lt_distill.pipeline.grid import NAMED_GRIDS, GridSpec, box_iou, match_crops


@pytest.mark.parametrize("name", sorted(NAMED_GRIDS))
def test_named_grids_cover_the_image_and_are_mirror_symmetric(name):
    grid = GridSpec.parse(name)
    boxes = grid.boxes()
    assert boxes.shape == (grid.num_boxes, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 1, 1])              # box 0 is the whole image
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-12).all()
    mirrored = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    assert np.abs(box_iou(mirrored, boxes).max(1) - 1).max() < 1e-9  # every mirror image is a grid box
    assert GridSpec.parse(grid.spec) == grid                         # the canonical spec round-trips


def test_default_grid_has_30_boxes():
    assert GridSpec.parse("default").num_boxes == 30
    assert GridSpec.parse("default").spec == "1:1,0.75:2,0.5:3,0.35:4"


@pytest.mark.parametrize("spec", ["1.0", "0:1", "1.5:1", "0.3:2", "a:b"])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ConfigError, match="grid spec"):
        GridSpec.parse(spec)


def test_iou_matches_hand_values():
    iou = box_iou(np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]]), np.array([[0, 0, 0.5, 1], [2, 2, 3, 3]]))
    np.testing.assert_allclose(iou, [[0.5, 0], [0.5, 0]])


def test_match_modes():
    boxes = GridSpec.parse("default").boxes()
    regions = np.array([boxes[7], [0.02, 0.0, 0.52, 0.5], [0.3, 0.3, 0.4, 0.4]])
    w, valid = match_crops(regions, boxes, "exact")
    assert valid.tolist() == [True, False, False] and w[0, 7] == 1 and w.sum() == 1
    w, valid = match_crops(regions, boxes, "nearest", iou_threshold=0.5)
    assert valid.tolist() == [True, True, False]
    iou = box_iou(regions, boxes)
    assert w[1].argmax() == iou[1].argmax() and w[1].sum() == 1 and not w[2].any()
    w, valid = match_crops(regions, boxes, "interp_topn", iou_threshold=0.5, top_n=3)  # pre-issue-10
    top = np.argsort(-iou[1])[:3]
    np.testing.assert_allclose(w[1, top], iou[1, top] / iou[1, top].sum())
    assert np.count_nonzero(w[1]) == 3 and valid.tolist() == [True, True, False]
    assert w[0, 7] < 0.6  # an exact match diluted by its neighbours
    w, valid = match_crops(regions, boxes, "interp", iou_threshold=0.5, top_n=3)
    above = np.nonzero(iou[1] >= 0.5)[0]  # only boxes at or above the threshold carry weight
    np.testing.assert_allclose(w[1, above], iou[1, above] / iou[1, above].sum())
    assert np.count_nonzero(w[1]) == len(above) and valid.tolist() == [True, True, False]
    assert w[0, 7] == 1.0 and w[0].sum() == 1.0
    with pytest.raises(ConfigError):
        match_crops(regions, boxes, "closest")
    w, valid = match_crops(np.zeros((0, 4)), boxes, "nearest")
    assert w.shape == (0, 30) and valid.shape == (0,)


@pytest.mark.parametrize("name", ["default", "coarse"])
def test_interp_gives_a_grid_box_exactly_its_own_label(name):
    boxes = GridSpec.parse(name).boxes()
    w, valid = match_crops(boxes, boxes, "interp", iou_threshold=0.5, top_n=4)
    assert valid.all() and np.array_equal(w, np.eye(len(boxes)))


def test_interp_breaks_ties_symmetrically():
    boxes = GridSpec.parse("default").boxes()
    mirror = np.array([1.0, 0.0, 1.0, 0.0]) - boxes[:, [2, 1, 0, 3]] * np.array([1, -1, 1, -1])
    perm = box_iou(mirror, boxes).argmax(1)  # grid box -> its mirror image
    assert np.allclose(boxes[perm], mirror)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x0, y0 = rng.uniform(0, 0.4, 2)
        w0, h0 = rng.uniform(0.3, 0.6, 2)
        region = np.array([[x0, y0, x0 + w0, y0 + h0]])
        flipped = np.array([[1 - x0 - w0, y0, 1 - x0, y0 + h0]])
        for top_n in (1, 2, 4):
            a, _ = match_crops(region, boxes, "interp", iou_threshold=0.3, top_n=top_n)
            b, _ = match_crops(flipped, boxes, "interp", iou_threshold=0.3, top_n=top_n)
            np.testing.assert_allclose(a[0], b[0, perm], atol=1e-12)
    # A horizontally centred region ties exactly between the two 0.75 boxes of a row: equal weights.
    w, _ = match_crops(np.array([[0.125, 0.0, 0.875, 0.75]]), boxes, "interp", iou_threshold=0.5, top_n=1)
    assert w[0, 1] == w[0, 2] > 0 and w[0, 1] + w[0, 2] == pytest.approx(1.0)
