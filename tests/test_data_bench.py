"""Online soft labels and the two data benchmarks (fidelity, labels) on tiny inputs."""

import random

import numpy as np
import pytest
import torch

from lt_distill.bench.fidelity import (
    _compare,
    _LosslessLabels,
    _Tally,
    check_same_teacher,
    measure_fidelity,
    reproduce_store,
    teacher_config_for_store,
)
from lt_distill.bench.labels import run_labels_bench
from lt_distill.pipeline.data import (
    build_classification_dataset,
    build_classification_loader,
    build_detection_dataset,
    build_detection_loader,
    build_train_loader,
    data_config,
    open_label_store,
)
from lt_distill.pipeline.data import synthetic as S
from lt_distill.pipeline.data.online import OnlineSoftLabeler
from lt_distill.pipeline.data.transforms import normalize
from lt_distill.pipeline.grid import GridSpec, box_iou, mirror_boxes
from lt_distill.pipeline.shards import iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize, decode_image
from lt_distill.store import LabelReader, LabelStore, ShardResult, StoreError, StoreLayout, StoreMismatchError, encode_topk


class ColourLayoutScorer:
    """A content-sensitive stand-in for CLIP (no weights offline): softmax of a fixed random projection
    of the crop's 4 x 4 mean-colour layout. Not mirror invariant, unlike a real teacher roughly is."""

    def __init__(self, num_classes=20, input_size=32, seed=0):
        self.proj = torch.randn(48, num_classes, generator=torch.Generator().manual_seed(seed))
        self.input_size = input_size

    def score_crop_batch(self, crops):
        x = torch.nn.functional.adaptive_avg_pool2d(crops.float() / 255, 4).flatten(1)
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
        return torch.softmax(8.0 * x @ self.proj / 48 ** 0.5, -1)

    def score_crops(self, image, boxes):
        return self.score_crop_batch(crop_and_resize(image, boxes, self.input_size))


def fill_store(path, urls, scorer, grid="default", topk=8):
    """What precompute's crops mode does, with the scorer as the teacher."""
    spec = GridSpec.parse(grid)
    shards = []
    for url in urls:
        keys, probs = [], []
        for raw in iter_tar_samples(url):
            keys.append(raw.key)
            image = decode_image(raw.fields["jpg"])
            probs.append(scorer.score_crop_batch(crop_and_resize(image, spec.boxes(), scorer.input_size)).numpy())
        shards.append((keys, np.stack(probs)))
    num_classes = shards[0][1].shape[-1]
    layout = StoreLayout(num_shards=len(urls), shard_capacity=max(len(k) for k, _ in shards), num_crops=spec.num_boxes,
                         topk=topk, num_classes=num_classes)
    store = LabelStore.create(path, layout, teacher={"model": "colour-layout"}, vocabulary=S.class_names(num_classes),
                              grid_spec=spec.spec, grid_boxes=spec.boxes())
    for s, (keys, probs) in enumerate(shards):
        n = len(keys)
        index, prob = encode_topk(probs, topk)
        store.write_shard(s, ShardResult(keys, np.full((n, 2), 64), np.full(n, -1), np.ones(n, np.uint8),
                                         np.zeros(n, np.uint8), index, prob))
    return LabelReader(path)


def test_fidelity_exact_mode_reproduces_the_grid_labels(tmp_path):
    pattern, _, _ = S.write_shards(tmp_path / "shards", 2, 6, seed=4, size_range=(60, 120))
    urls = [str(tmp_path / "shards" / f"shard-{s:04d}.tar") for s in range(2)]
    scorer = ColourLayoutScorer()
    reader = fill_store(tmp_path / "store", urls, scorer)
    random.seed(0)
    result = measure_fidelity(reader, pattern, scorer, num_tiles=48, modes=("exact", "nearest"), preset="tiny")
    exact, nearest = result["exact"], result["nearest"]
    assert exact["masked_fraction"] == 0.0 and exact["tiles_seen"] >= 48
    # Unflipped exact tiles are the very grid crops (cut at the same pixels, resized twice): the scorer
    # agrees with the stored label; KL is the top-8 truncation plus resampling.
    assert exact["unflipped"]["tiles"] > 10 and exact["unflipped"]["top1_agreement"] >= 0.95
    assert exact["unflipped"]["mean_kl"] < 0.05
    # A scorer that is not mirror invariant disagrees on flipped tiles; nearest crops are not grid crops.
    assert exact["flipped"]["mean_kl"] > 5 * exact["unflipped"]["mean_kl"]
    assert nearest["unflipped"]["mean_kl"] > exact["unflipped"]["mean_kl"]
    assert exact["whole-image label"]["top1_agreement"] < exact["unflipped"]["top1_agreement"]
    # The decomposition: the scorer's full output on the mirrored grid crops explains the flipped tiles
    # (flip-aware), the unmirrored one does not; with no storage loss the gap is only resampling.
    assert exact["lossless, flip-aware"]["mean_kl"] < 0.05
    assert exact["lossless label"]["mean_kl"] > 3 * exact["lossless, flip-aware"]["mean_kl"]
    assert exact["lossless label"]["tiles"] == exact["all"]["tiles"]
    # The store reproduction check: the same scorer reproduces the stored labels, another one does not.
    same = reproduce_store(reader, pattern, scorer, num_images=3)
    assert same["images"] == 3 and same["top1_agreement"] == 1.0 and same["mean_kl"] < 0.05
    assert reproduce_store(reader, pattern, ColourLayoutScorer(seed=1), num_images=3)["top1_agreement"] < 0.5


def test_lossless_labels_are_the_scorer_on_the_matched_grid_crops():
    scorer = ColourLayoutScorer()
    grid = GridSpec.parse("coarse").boxes()
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lossless = _LosslessLabels(scorer, grid, "interp", 0.5, 4)

    class Decoder:  # stands in for the dataset: watch() records what its decode returns
        def decode(self, shard, position, raw):
            return {"image": image, "shard": shard, "position": 5}

    dataset = Decoder()
    lossless.watch(dataset)
    dataset.decode(1, 0, None)
    crops = crop_and_resize(image, grid, scorer.input_size)
    full = scorer.score_crop_batch(crops).numpy()
    mirrored = scorer.score_crop_batch(crop_and_resize(image.flip(-1), mirror_boxes(grid), scorer.input_size)).numpy()
    regions = np.stack([grid[3], (grid[1] + grid[2]) / 2])  # a grid box, and a region between two boxes
    rows = np.array([[1, 5], [1, 5]])
    out = lossless(rows, regions, np.array([False, True]))
    np.testing.assert_allclose(out[0], full[3], rtol=1e-5, atol=1e-7)
    iou = box_iou(regions[1:], grid)[0]
    w = np.where(iou >= 0.5, iou, 0.0)
    np.testing.assert_allclose(out[1], (w / w.sum()) @ mirrored, rtol=1e-5, atol=1e-7)


def test_confident_agreement_counts_only_tiles_with_a_clear_online_top1():
    online = np.array([[0.9, 0.1, 0.0], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]])
    cached = np.array([[0.8, 0.2, 0.0], [0.3, 0.6, 0.1], [0.4, 0.35, 0.25], [0.2, 0.5, 0.3]])
    tally = _Tally()
    tally.add(*_compare(online, cached))
    summary = tally.summary()
    assert summary["top1_agreement"] == 0.5 and summary["confident_tiles"] == 2
    assert summary["top1_agreement_confident"] == 0.5  # the two confident rows: one agrees, one does not


def test_teacher_is_rebuilt_from_the_store_provenance(tmp_path):
    attrs = {"teacher": {"model": "lt-tiny-rn", "weights_sha256": "random-init:seed=7", "temperature": 2.0,
                         "prompt_templates": ["a photo of a {}."], "synonyms": False}}
    cfg = teacher_config_for_store(attrs, TeacherConfig(device="cpu"))
    assert (cfg.model, cfg.random_init, cfg.seed, cfg.temperature, cfg.templates) == \
        ("lt-tiny-rn", True, 7, 2.0, "single")
    attrs["teacher"]["weights_sha256"] = "ab" * 32
    with pytest.raises(StoreError, match="--weights"):
        teacher_config_for_store(attrs, TeacherConfig(device="cpu"))
    assert teacher_config_for_store(attrs, TeacherConfig(), weights="w.pt").weights == "w.pt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    pattern, keys, _ = S.write_shards(root / "shards", 2, 4, seed=8)
    jpath, images = S.write_detection_set(root / "det", 4, seed=9)
    teacher_cfg = TeacherConfig(model="lt-tiny-rn", random_init=True, vocab=str(jpath), templates="single",
                                device="cpu", engine="eager")
    teacher = build_teacher(teacher_cfg)
    S.write_label_store(root / "store", keys, num_classes=10)
    cfg = data_config("tiny", {"det_annotations": str(jpath), "det_images": str(images), "cls_shards": pattern,
                               "label_store": str(root / "store")})
    return {"teacher": teacher, "teacher_cfg": teacher_cfg, "cfg": cfg, "root": root, "keys": keys}


def test_online_labeler_scores_tiles_and_boxes(tiny):
    teacher, cfg = tiny["teacher"], tiny["cfg"]
    reader = LabelReader(cfg.label_store)
    labeler = OnlineSoftLabeler(teacher, cfg.pixel_mean, cfg.pixel_std)
    pixels = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    image, _ = normalize(pixels, {}, cfg.pixel_mean, cfg.pixel_std)
    assert torch.equal(labeler.image_uint8(torch.nn.functional.pad(image, (0, 5, 0, 3)), torch.tensor([17, 23])),
                       pixels)  # padding dropped, pixels recovered exactly
    random.seed(0)
    cls_batch = next(iter(build_classification_loader(cfg, build_classification_dataset(cfg, reader))))
    det_batch = next(iter(build_detection_loader(cfg, build_detection_dataset(cfg, reader))))
    for batch in (cls_batch, det_batch):
        cached = [t["soft_labels"].clone() for t in batch["targets"]]
        labeler(batch)
        for t, c in zip(batch["targets"], cached):
            n = len(t["labels"])
            assert t["soft_labels"].shape == (n, 10) and t["soft_mask"].all()
            assert torch.allclose(t["soft_labels"].sum(-1), torch.ones(n), atol=1e-5)
            assert not torch.equal(t["soft_labels"], c)
    # classification tiles: the teacher's crops path on the tile's canvas pixels
    t0 = cls_batch["targets"][0]
    canvas = labeler.image_uint8(cls_batch["images"][0], t0["size"])
    h, w = t0["size"].tolist()
    cx, cy, bw, bh = t0["boxes"][0].tolist()
    box = np.array([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]])
    assert torch.allclose(t0["soft_labels"][0], teacher.score_crops(canvas, box)[0], atol=1e-6)


@pytest.mark.slow
def test_bench_labels_times_both_paths_on_one_batch(tiny):
    result = run_labels_bench(tiny["teacher_cfg"], preset="tiny", repeats=2, warmup=1)
    assert result["data"]["tiles"] >= 4 and result["store"]["num_classes"] == 10
    assert 0 < result["cached_ms_per_step"] < result["online_ms_per_step"]
    assert result["speedup"] == pytest.approx(result["online_ms_per_step"] / result["cached_ms_per_step"])


def test_fidelity_refuses_another_teacher(tiny):
    attrs = {"teacher": {"model": "RN50", "weights_sha256": "random-init:seed=0", "text_fingerprint": "x",
                         "temperature": 1.0}, "vocabulary": {"sha256": "y"}}
    with pytest.raises(StoreMismatchError, match=r"teacher\.model.*teacher\.text_fingerprint.*vocabulary\.sha256"):
        check_same_teacher(attrs, tiny["teacher"])


def test_online_mode_trains_without_a_store(tiny):
    cfg = data_config("tiny", {"det_annotations": tiny["cfg"].det_annotations, "det_images": tiny["cfg"].det_images,
                               "cls_shards": tiny["cfg"].cls_shards, "soft_labels": "online", "label_store": ""})
    assert open_label_store(cfg) is None
    loader = build_train_loader(cfg, None, hard_labeler=lambda fields: (int(fields["cls"]), 0))
    labeler = OnlineSoftLabeler(tiny["teacher"], cfg.pixel_mean, cfg.pixel_std)
    random.seed(1)
    sources = []
    for batch in loader:
        assert not any(t["soft_mask"].any() for t in batch["targets"])  # nothing cached
        labeler(batch)
        sources.append(batch["source"])
        for t in batch["targets"]:
            assert t["soft_mask"].all() and t["soft_labels"].shape == (len(t["labels"]), 10)
            if batch["source"] == "classification":
                assert ((t["labels"] >= 0) & (t["labels"] < 10)).all() and (t["rows"][:, 0] >= 0).all()
        if len(sources) == 4:
            break
    assert sources == ["detection", "classification"] * 2
