"""Flip-aware cached labels (issue 11): `precompute --flip-labels` keeps a mirror row per grid box (row K + j:
box j cut and mirrored), and readers give a flipped tile the mirror rows with match_crops' weights."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_distill.cli import main
from lt_distill.pipeline.data import CropSoftLabels, build_classification_dataset, data_config
from lt_distill.pipeline.data import synthetic as S
from lt_distill.pipeline.data.embedding import CropEmbeddings
from lt_distill.pipeline.grid import GridSpec, match_crops, mirror_boxes
from lt_distill.pipeline.images import pixel_boxes
from lt_distill.pipeline.shards import expand_shards, iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize, decode_image
from lt_distill.pipeline.vocab import load_vocabulary
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute
from lt_distill.store import (
    STATUS_DONE,
    LabelReader,
    LabelStore,
    ShardResult,
    StoreError,
    StoreLayout,
    decode_topk,
    encode_topk,
    store_info,
    verify_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import TINY, make_shards  # noqa: E402

GRID = "1.0:1,0.6:2"  # K = 5: small, and its boxes are not mirror images of themselves (except the first)
TINY_TEACHER = dict(model="lt-tiny-rn", random_init=True, templates="single")


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(TeacherConfig(**TINY_TEACHER), load_vocabulary("lvis-v1"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("flip-data") / "shards", num_shards=2, per_shard=3)


def precompute(store: Path, shards: str, mode: str = "crops", flip: bool = True, **kw):
    cfg = PrecomputeConfig(store=str(store), shards=shards, teacher=TeacherConfig(**TINY_TEACHER), mode=mode,
                           grid=GRID, flip_labels=flip, labels="none", workers=0, batch_size=2, progress=False, **kw)
    return run_precompute(cfg, log=lambda _m: None)


def check_rows(store: Path, shards: str, score) -> int:
    """Every done image: the stored top-k of rows 0..2K-1 equals ``score(image, boxes) -> (2K, C)`` probs."""
    reader = LabelReader(store)
    k = reader.layout.topk
    checked = 0
    for url in expand_shards(shards):
        for raw in iter_tar_samples(url):
            shard, pos = reader.locate(raw.key)
            index, prob, valid = reader.labels(shard, pos)
            assert valid
            p = score(decode_image(raw.fields["jpg"]))
            assert index.shape == (len(p), k)
            stored = prob.astype(np.float32)
            np.testing.assert_allclose(stored, np.take_along_axis(p, index.astype(np.int64), 1), rtol=2e-3, atol=1e-7)
            checked += 1
    return checked


def test_crops_store_mirror_rows_are_the_teacher_on_mirrored_crops(shards, teacher, tmp_path):
    precompute(tmp_path / "flip", shards)
    store = LabelStore.open(tmp_path / "flip")
    boxes = GridSpec.parse(GRID).boxes()
    assert store.layout.num_crops == 2 * len(boxes) == 10
    assert store.attrs["grid"]["flip_labels"] is True and len(store.attrs["grid"]["boxes"]) == 5
    assert verify_store(tmp_path / "flip") == []
    assert store_info(tmp_path / "flip")["attributes"]["grid"] == {"spec": GridSpec.parse(GRID).spec, "num_boxes": 5,
                                                                    "flip_labels": True}

    def reference(image: np.ndarray) -> np.ndarray:
        # Independently of GridCrops: cut each whole-pixel box with numpy, mirror it, resize the cut.
        h, w = image.shape[:2]
        mirrored = [crop_and_resize(np.ascontiguousarray(image[y0:y1, x0:x1][:, ::-1]), np.array([[0., 0., 1., 1.]]),
                                    teacher.preprocess) for x0, y0, x1, y1 in pixel_boxes(boxes, w, h).tolist()]
        return torch.cat([teacher.score_crops(image, boxes), teacher.score_crop_batch(torch.cat(mirrored))]).numpy()

    assert check_rows(tmp_path / "flip", shards, reference) == 6
    # The mirror rows are labels of their own, not copies of the grid rows (the images are not symmetric).
    index, prob, _ = LabelReader(tmp_path / "flip").labels(0, 0)
    assert not np.array_equal(prob[1:5], prob[6:10])


def test_pooled_store_mirror_rows_use_the_mirrored_image_and_boxes(shards, teacher, tmp_path):
    precompute(tmp_path / "pooled", shards, mode="pooled")
    boxes = GridSpec.parse(GRID).boxes()
    assert LabelStore.open(tmp_path / "pooled").layout.num_crops == 10

    def reference(image: np.ndarray) -> np.ndarray:
        mirrored = np.ascontiguousarray(image[:, ::-1])
        return torch.cat([teacher.score_pooled(image, boxes),
                          teacher.score_pooled(mirrored, mirror_boxes(boxes))]).numpy()

    assert check_rows(tmp_path / "pooled", shards, reference) == 6


def test_resume_with_another_flip_setting_is_refused(shards, tmp_path, capsys):
    args = ["precompute", "--store", tmp_path / "s", "--shards", shards, *TINY, "--grid", GRID, "--labels", "none",
            "--workers", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0
    assert LabelStore.open(tmp_path / "s").attrs["grid"]["flip_labels"] is False
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args + ["--flip-labels"]])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "grid.flip_labels: store has False, run expects True" in err
    assert LabelStore.open(tmp_path / "s").layout.num_crops == 5  # nothing rewritten


def test_a_store_from_before_flip_labels_resumes_as_unflipped(shards, tmp_path):
    precompute(tmp_path / "old", shards, flip=False)
    store = LabelStore.open(tmp_path / "old", "r+")
    grid = dict(store.attrs["grid"])
    del grid["flip_labels"]  # as main wrote it before this field existed
    store.group.attrs["grid"] = grid
    assert precompute(tmp_path / "old", shards, flip=False)["classification"]["shards"] == 0  # all done: resumed
    with pytest.raises(StoreError, match="grid.flip_labels"):
        precompute(tmp_path / "old", shards, flip=True)


def test_layout_must_count_the_mirror_rows(tmp_path):
    boxes = GridSpec.parse(GRID).boxes()
    kw = dict(teacher={"model": "t"}, vocabulary=["a", "b", "c"], grid_spec=GRID, grid_boxes=boxes)
    with pytest.raises(StoreError, match=r"grid has 5 boxes \(\+ mirror rows\) but layout.num_crops is 5"):
        LabelStore.create(tmp_path / "a", StoreLayout(1, 4, 5, 2, 3), flip_labels=True, **kw)
    with pytest.raises(StoreError, match="grid has 5 boxes but layout.num_crops is 10"):
        LabelStore.create(tmp_path / "b", StoreLayout(1, 4, 10, 2, 3), **kw)


# ---------------------------------------------------------------------------------------------------- readers
NUM_CLASSES = 12


def write_store(path: Path, keys: list[list[str]], flip: bool, seed: int = 0) -> np.ndarray:
    """A default-grid store of random labels for ``keys``: with ``flip`` 2K rows per image, else the first K
    of the same rows. Returns the (shards, n, 2K, C) distributions before top-k."""
    spec = GridSpec.parse("default")
    k = spec.num_boxes
    n = max(len(s) for s in keys)
    rng = np.random.default_rng(seed)
    probs = S.random_distributions(rng, (len(keys), n, 2 * k), NUM_CLASSES)
    layout = StoreLayout(num_shards=len(keys), shard_capacity=n, num_crops=2 * k if flip else k, topk=6,
                         num_classes=NUM_CLASSES)
    store = LabelStore.create(path, layout, teacher={"model": "synthetic", "mode": "crops"},
                              vocabulary=S.class_names(NUM_CLASSES), grid_spec=spec.spec, grid_boxes=spec.boxes(),
                              flip_labels=flip)
    for s, shard_keys in enumerate(keys):
        m = len(shard_keys)
        index, prob = encode_topk(probs[s, :m, : layout.num_crops], layout.topk)
        store.write_shard(s, ShardResult(keys=list(shard_keys), sizes=np.full((m, 2), 64, np.int32),
                                         hard_labels=np.zeros(m, np.int64), status=np.full(m, STATUS_DONE, np.uint8),
                                         reasons=np.zeros(m, np.uint8), index=index, prob=prob))
    return probs


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("flip-stores")
    pattern, keys, _ = S.write_shards(root / "shards", 2, 6, seed=1, num_classes=NUM_CLASSES)
    write_store(root / "flip", keys, flip=True)
    write_store(root / "plain", keys, flip=False)
    return {"pattern": pattern, "flip": LabelReader(root / "flip"), "plain": LabelReader(root / "plain")}


def decoded(reader: LabelReader, shard: int, pos: int) -> np.ndarray:
    index, prob, _ = reader.labels(shard, pos)
    return decode_topk(index, prob, NUM_CLASSES, reader.attrs["encoding"]["residual"])  # (rows, C)


REGIONS = np.array([[0.0, 0.0, 0.5, 0.5],     # a grid box (0.5:3, top left)
                    [0.02, 0.0, 0.52, 0.48],  # near it
                    [0.1, 0.1, 0.95, 0.9],    # between the whole image and the 0.75 boxes
                    [0.0, 0.0, 0.08, 0.08]])  # below every threshold


@pytest.mark.parametrize("mode", ["exact", "nearest", "interp"])
def test_flipped_tiles_read_the_mirror_rows_with_the_grid_weights(stores, mode):
    reader = stores["flip"]
    grid = np.asarray(reader.attrs["grid"]["boxes"])
    k = len(grid)
    full = decoded(reader, 1, 3)  # (2K, C)
    labels = CropSoftLabels(reader, mode, iou_threshold=0.5, top_n=3)
    weights, ok = match_crops(REGIONS, grid, mode, 0.5, 3)
    flips = np.array([True, True, False, True])
    soft, mask = labels(1, 3, REGIONS, flips)
    assert np.array_equal(mask, ok) and ok[0] and not ok[3]
    for i in range(len(REGIONS)):
        rows = np.nonzero(weights[i])[0]
        if not ok[i]:
            assert not soft[i].any()
            continue
        want = full[rows + (k if flips[i] else 0)]
        if len(rows) == 1:  # exact / nearest: the one stored row, bit for bit
            assert np.array_equal(soft[i], want[0])
        else:  # the weights match_crops gives over the K boxes, applied to the chosen rows
            assert mode == "interp"
            np.testing.assert_allclose(soft[i], (weights[i, rows, None] * want).sum(0), atol=1e-6)
    # Unflipped (or no flags at all): the grid rows, as without mirror rows.
    plain_soft, _ = labels(1, 3, REGIONS)
    assert np.array_equal(plain_soft, labels(1, 3, REGIONS, np.zeros(4, bool))[0])
    assert np.array_equal(plain_soft[0], full[np.nonzero(weights[0])[0][0]])
    assert not np.array_equal(soft[0], plain_soft[0])


@pytest.mark.parametrize("mode", ["exact", "nearest", "interp"])
def test_a_store_without_mirror_rows_ignores_the_flags(stores, mode):
    flip, plain = stores["flip"], stores["plain"]
    labels = CropSoftLabels(plain, mode, iou_threshold=0.5, top_n=3)
    before, mask_before = labels(0, 2, REGIONS)  # main's call
    after, mask_after = labels(0, 2, REGIONS, np.ones(4, bool))
    assert np.array_equal(before, after) and np.array_equal(mask_before, mask_after)
    # ... and equal, bit for bit, to the flip store's unflipped labels (same first K rows)
    same, _ = CropSoftLabels(flip, mode, iou_threshold=0.5, top_n=3)(0, 2, REGIONS, np.zeros(4, bool))
    assert np.array_equal(before, same)


def test_the_classification_dataset_passes_the_flip_of_every_tile(stores):
    reader = stores["flip"]
    grid = np.asarray(reader.attrs["grid"]["boxes"])
    cfg = data_config("tiny", {"cls_shards": stores["pattern"], "label_store": str(reader.path), "num_workers": 0,
                               "cls_aug": {"crop_match": "exact", "crop_prob": 0.8, "tile_size": 48},
                               "cls_unlabelled": "keep"})
    random.seed(0)
    seen = {True: 0, False: 0}
    for _, target in build_classification_dataset(cfg, reader, repeat=False):
        for i in range(len(target["labels"])):
            shard, pos = target["rows"][i].tolist()
            j = np.nonzero((np.abs(grid - target["regions"][i].numpy()) < 1e-12).all(axis=1))[0][0]
            flipped = bool(target["flipped"][i])
            want = decoded(reader, shard, pos)[j + len(grid) * flipped]
            assert np.array_equal(target["soft_labels"][i].numpy(), want)
            seen[flipped] += 1
    assert seen[True] >= 2 and seen[False] >= 2


def test_crop_embeddings_read_mirror_rows(tmp_path):
    k, dim = GridSpec.parse("default").num_boxes, 8
    layout = StoreLayout(num_shards=1, shard_capacity=2, num_crops=2 * k, topk=0, num_classes=NUM_CLASSES,
                         embed_dim=dim, embed_dtype="float16")
    spec = GridSpec.parse("default")
    store = LabelStore.create(tmp_path / "e", layout, teacher={"model": "synthetic"},
                              vocabulary=S.class_names(NUM_CLASSES), grid_spec=spec.spec, grid_boxes=spec.boxes(),
                              flip_labels=True, embedding={"logit_scale": 100.0, "temperature": 1.0,
                                                           "text_tower": {"model": "synthetic"}})
    codes = np.random.default_rng(0).standard_normal((2, 2 * k, dim)).astype(np.float16)
    store.write_shard(0, ShardResult(keys=["a", "b"], sizes=np.full((2, 2), 64, np.int32), hard_labels=np.zeros(2),
                                     status=np.full(2, STATUS_DONE, np.uint8), reasons=np.zeros(2, np.uint8),
                                     embedding=codes))
    embeddings = CropEmbeddings(LabelReader(tmp_path / "e"), NUM_CLASSES, "nearest")
    rows, regions = np.array([[0, 1], [0, 1]]), REGIONS[[0, 0]]
    out = embeddings.tiles(rows, regions, np.array([False, True]))
    j = 5  # REGIONS[0] is grid box 5 (0.5:3 top left; 1 + 4 boxes before it)
    assert np.allclose(GridSpec.parse("default").boxes()[j], REGIONS[0])
    assert np.array_equal(out["soft_embed"][0, 0].numpy(), codes[1, j])
    assert np.array_equal(out["soft_embed"][1, 0].numpy(), codes[1, k + j])
    assert np.array_equal(embeddings.tiles(rows, regions)["soft_embed"][1, 0].numpy(), codes[1, j])
