"""The embedding encoding of the label store: int8 quantisation, store round trip and checks, precompute
against the teacher, temperature at read time, and training from one store with two vocabularies."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_distill.pipeline.data.embedding import EmbeddingDecoder
from lt_distill.pipeline.grid import match_crops
from lt_distill.pipeline.shards import expand_shards, iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize, decode_image
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute
from lt_distill.store import (
    LabelReader,
    ShardResult,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    decode_embeddings,
    dequantise,
    int8_error_bound,
    quantise,
    store_info,
    store_stats,
    verify_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import make_shards, store_arrays  # noqa: E402
from store_helpers import make_store  # noqa: E402
from train_helpers import check_decoded_soft_labels, train_two_steps  # noqa: E402

EMB = {"logit_scale": 50.0, "temperature": 1.0, "text_tower": {"model": "tiny-test", "weights_sha256": "0" * 64}}
TINY = {"model": "lt-tiny-rn", "random_init": True, "device": "cpu", "engine": "eager"}


def unit(rng: np.random.Generator, shape) -> np.ndarray:
    e = rng.normal(size=shape).astype(np.float32)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def log_ratio_bound(scale: np.ndarray, text: np.ndarray, logit_scale: float, temperature: float = 1.0) -> np.ndarray:
    """Largest |log q_c - log p_c| that int8 rounding can cause per row: every logit moves by at most
    (logit_scale / T) * (scale / 2) * ||t_c||_1, and a softmax's log-probabilities by twice the largest move."""
    move = logit_scale / temperature * int8_error_bound(scale)[..., None] * np.abs(text).sum(-1)
    return 2 * move.max(-1)


# ------------------------------------------------------------------------------------------ quantisation
def test_int8_round_trip_error_bound(rng):
    e = unit(rng, (400, 512))
    e[0] = 0.0                   # an empty row: scale 0, codes 0
    e[1] = 0.0
    e[1, 7] = -1.0               # a one-hot row: max |e| sits on the clip
    e[2] *= 1e-3                 # tiny values: the scale follows them
    codes, scale = quantise(e, "int8")
    assert codes.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (400,)
    err = np.abs(dequantise(codes, scale) - e)
    assert (err <= int8_error_bound(scale)[:, None] + 1e-9).all()
    assert (codes[0] == 0).all() and scale[0] == 0
    assert codes[1, 7] == -127 and np.count_nonzero(codes[1]) == 1
    assert (np.abs(codes[3:]).max(-1) == 127).all()  # unit rows use the whole int8 range
    # Unit rows: the relative error is about one part in 127 * sqrt(D) / 3.3, never worse than the bound.
    assert float(err[3:].max()) < float(scale[3:].astype(np.float32).max()) / 2 + 1e-9
    half, none = quantise(e, "float16")
    assert half.dtype == np.float16 and none is None
    np.testing.assert_allclose(dequantise(half, None), e, rtol=2 ** -11, atol=2 ** -24)  # fp16 subnormal spacing
    # Decoded distributions stay within the bound the element error implies.
    text = unit(rng, (40, 512))
    p = decode_embeddings(e[3:], text, 100.0)
    q = decode_embeddings(dequantise(codes, scale)[3:], text, 100.0)
    assert (np.abs(np.log(q) - np.log(p)).max(-1) <= log_ratio_bound(scale[3:], text, 100.0) + 1e-4).all()
    with pytest.raises(StoreError, match="embedding dtype"):
        quantise(e, "int4")


# ------------------------------------------------------------------------------------------ store
@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_embedding_store_round_trip_reader_and_checks(tmp_path, rng, dtype, capsys):
    import pickle

    from lt_distill.cli import main

    layout = StoreLayout(num_shards=3, shard_capacity=8, num_crops=5, topk=0, num_classes=40, embed_dim=32,
                         embed_dtype=dtype)
    path = tmp_path / "emb.zarr"
    store = make_store(path, layout, embedding=EMB)
    e = unit(rng, (6, 5, 32))
    codes, scale = quantise(e, dtype)
    status, reasons = np.ones(6, np.uint8), np.zeros(6, np.uint8)
    status[2], reasons[2] = 2, 2
    result = ShardResult(keys=[f"k{i}" for i in range(6)], sizes=np.full((6, 2), 64), hard_labels=np.full(6, -1),
                         status=status, reasons=reasons, embedding=codes, embedding_scale=scale)
    store.write_shard(1, result)
    store.write_text_embeddings(unit(rng, (40, 32)), {"model": "tiny-test"})
    reader = pickle.loads(pickle.dumps(LabelReader(path)))  # as a DataLoader worker gets it
    for i in range(6):
        got, got_scale, valid = reader.embeddings(1, i)
        assert valid == (i != 2)
        if i == 2:  # a failed row reads as fill values
            assert not got.any()
            continue
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, codes[i])
        assert (got_scale is None) == (dtype == "float16")
        if got_scale is not None:
            assert np.array_equal(got_scale, scale[i])
    batch, batch_scale, valid = reader.embeddings_batch([1, 1, 0], [0, 5, 0])
    assert np.array_equal(batch[1], codes[5]) and list(valid) == [True, True, False]
    with pytest.raises(StoreError, match="embeddings only"):
        reader.labels(1, 0)
    # For looking at a store (inspect), rows decode with the store's own class text embeddings.
    index, prob, valid = reader.top_labels(1, 3, k=3)
    full = decode_embeddings(dequantise(codes[3], scale[3] if scale is not None else None),
                             reader.text_embeddings().astype(np.float32), EMB["logit_scale"])
    assert valid and np.array_equal(index, np.argsort(-full, axis=-1, kind="stable")[:, :3])
    np.testing.assert_allclose(prob.astype(np.float32), np.sort(full, axis=-1)[:, ::-1][:, :3], rtol=1e-3)
    topk_result = ShardResult(keys=["a"], sizes=np.full((1, 2), 8), hard_labels=np.full(1, -1),
                              status=np.ones(1, np.uint8), reasons=np.zeros(1, np.uint8),
                              index=np.zeros((1, 5, 4), np.int16), prob=np.zeros((1, 5, 4), np.float16))
    with pytest.raises(StoreError, match="encoding is embedding"):
        store.write_shard(0, topk_result)

    info = store_info(path)["attributes"]["encoding"]
    assert info["kind"] == "embedding" and info["embedding"]["dim"] == 32 and info["embedding"]["dtype"] == dtype
    assert info["embedding"]["text_tower"] == EMB["text_tower"] and "index_dtype" not in info
    assert verify_store(path) == []
    stats = store_stats(path)
    assert stats["encoding"] == "embedding" and stats["images_done"] == 5
    assert abs(stats["mean_embedding_norm"] - 1) < 1e-2 and stats["embedding_top1_classes"]
    for command, expected in ((["store", "info"], f"D=32 {dtype}, logit_scale=50"),
                              (["store", "stats"], "mean_embedding_norm")):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, str(path)])
        assert exit_info.value.code == 0 and expected in capsys.readouterr().out

    from lt_distill.store.labelstore import WRITE_CONFIG

    g = store.group  # rewritten the way the store writes (every chunk kept), so only the content is wrong
    if dtype == "int8":  # a zero scale in a done row, and a row that is no longer a unit vector
        bad_scale = g["labels/embedding_scale"][8:16]
        bad_scale[0, 0] = 0
        g["labels/embedding_scale"].with_config(WRITE_CONFIG)[8:16] = bad_scale
    bad = g["labels/embedding"][8:16]
    bad[1] = (bad[1].astype(np.float32) / 2).astype(bad.dtype)
    g["labels/embedding"].with_config(WRITE_CONFIG)[8:16] = bad
    problems = verify_store(path)
    assert any(p.startswith("row 9: a crop embedding is not a unit vector") for p in problems), problems
    assert (dtype == "float16") or any(p.startswith("row 8: embedding scale zero") for p in problems)
    # The embedding arrays carry the store's per-chunk crc32c: one flipped byte is caught by verify and reader.
    shard_file = path / "labels" / "embedding" / "c" / "1" / "0" / "0"  # source shard 1's Zarr shard
    raw = bytearray(shard_file.read_bytes())
    raw[40] ^= 0xFF
    shard_file.write_bytes(bytes(raw))
    assert any("crc32c" in p for p in verify_store(path)), verify_store(path)
    with pytest.raises(StoreError, match="corrupt"):
        LabelReader(path).embeddings(1, 0)


# ------------------------------------------------------------------------------------------ precompute
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb_shards")
    return make_shards(root / "shards", num_shards=2, per_shard=3)


def _precompute(store: Path, pattern: str, encoding: str, **kw) -> dict:
    teacher = TeacherConfig(templates="single", **TINY)
    cfg = PrecomputeConfig(store=str(store), shards=pattern, teacher=teacher, encoding=encoding, topk=5,
                           grid="coarse", labels="none", pseudo_threshold=0.0, workers=0, batch_size=4,
                           progress=False, **kw)
    return run_precompute(cfg, log=lambda _m: None)


@pytest.mark.slow
def test_precompute_embeddings_match_the_teacher_at_any_temperature(shards, tmp_path):
    both, emb, topk = tmp_path / "both.zarr", tmp_path / "emb.zarr", tmp_path / "topk.zarr"
    _precompute(both, shards, "both")
    _precompute(emb, shards, "embedding")
    _precompute(topk, shards, "topk")
    a_both, a_emb, a_topk = store_arrays(both), store_arrays(emb), store_arrays(topk)
    # The top-k rows do not depend on what else is stored; nor do the embeddings or pseudo hard labels.
    for name in ("labels/index", "labels/prob", "rows/hard_label", "rows/status", "rows/key"):
        assert np.array_equal(a_both[name], a_topk[name]), name
    for name in ("labels/embedding", "labels/embedding_scale", "rows/hard_label", "rows/status"):
        assert np.array_equal(a_both[name], a_emb[name]), name
    assert "labels/index" not in a_emb and "labels/embedding" not in a_topk
    assert (a_emb["rows/hard_label"][a_emb["rows/status"] == 1] >= 0).all()  # threshold 0: every done row
    for path in (both, emb, topk):
        assert verify_store(path) == [], path
    attrs = LabelReader(emb).attrs["encoding"]
    assert attrs["kind"] == "embedding" and attrs["embedding"]["dtype"] == "int8"
    assert attrs["embedding"]["text_tower"]["model"] == "lt-tiny-rn"
    assert attrs["embedding"]["text_tower"]["weights_sha256"].startswith("random-init:")

    # Stored rows are the teacher's own unit embeddings, within the int8 bound; decoded at temperature 2 they
    # are the softmax of a teacher built at temperature 2, within the bound that rounding implies.
    reader = LabelReader(emb)
    boxes = np.asarray(reader.attrs["grid"]["boxes"])
    warm = build_teacher(TeacherConfig(templates="single", temperature=2.0, **TINY))
    decoder = EmbeddingDecoder(warm.text_embeddings, attrs["embedding"]["logit_scale"], temperature=2.0)
    assert attrs["embedding"]["logit_scale"] == pytest.approx(warm.logit_scale)
    checked = 0
    for url in expand_shards(shards):
        for raw in iter_tar_samples(url):
            s, pos = reader.locate(raw.key)
            codes, scale, valid = reader.embeddings(s, pos)
            assert valid
            crops = crop_and_resize(decode_image(raw.fields["jpg"]), boxes, warm.preprocess)  # as precompute cuts
            feats = warm.crop_features(crops).numpy()
            assert (np.abs(dequantise(codes, scale) - feats) <= int8_error_bound(scale)[:, None] + 1e-6).all()
            want = warm.score_crop_batch(crops).numpy()
            got = decoder(torch.from_numpy(codes.copy())[:, None], torch.from_numpy(scale.astype(np.float32))[:, None],
                          torch.ones(len(codes), 1)).numpy()
            text = warm.text_embeddings.numpy()
            bound = log_ratio_bound(scale, text, warm.logit_scale, 2.0) + 1e-4
            assert (np.abs(np.log(got) - np.log(want)).max(-1) <= bound).all()
            cold = decode_embeddings(dequantise(codes, scale), text, warm.logit_scale, 1.0)
            assert (np.abs(np.log(cold) - np.log(want)).max(-1) > bound).any()  # the temperature is what matters
            checked += 1
    assert checked == 6

    # Resuming needs the same encoding: a top-k run on the embedding store is refused, naming the field.
    with pytest.raises(StoreMismatchError, match="encoding.kind: store has 'embedding', run expects 'topk'"):
        _precompute(emb, shards, "topk")
    summary = _precompute(emb, shards, "embedding")  # the same command again: nothing left to do
    assert summary["classification"]["shards"] == 0


# ------------------------------------------------------------------------------------------ training
SMALL_DATA = {
    "det_aug": {"scales": [128], "max_size": 160, "crop_resize_scales": [96, 128], "crop_min_size": 64,
                "crop_max_size": 128},
    "cls_aug": {"tile_size": 64, "scales": [128], "max_size": 160, "crop_match": "interp"},
}


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The synthetic demo data and one embedding store (int8, with object embeddings) made from it."""
    from lt_distill.stages.demo.synthetic import SyntheticConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("emb_train")
    ds = make_synthetic_dataset(root / "data", SyntheticConfig(
        num_classes=6, train_images=12, val_images=4, image_size=(128, 160), cls_shards=2,
        cls_images_per_shard=6, cls_image_size=96))
    teacher = TeacherConfig(vocab=str(ds.categories), templates="simple", **TINY)
    run_precompute(PrecomputeConfig(
        store=str(root / "store.zarr"), shards=ds.cls_shards, teacher=teacher, encoding="embedding",
        labels="cls", class_list=str(ds.class_list), synset_wnids=str(ds.synset_wnids), batch_size=6, workers=0,
        annotations=str(ds.train_annotations), images=str(ds.train_images), progress=False), log=lambda _m: None)
    # A second vocabulary: four of the classes, renamed and in another order, with their boxes only.
    gt = json.loads(ds.train_annotations.read_text())
    keep = [c for c in gt["categories"]][:4][::-1]
    new_id = {c["id"]: 100 - i for i, c in enumerate(keep)}  # ids decide the class order
    cats = [{**c, "id": new_id[c["id"]], "name": "shape_" + "_".join(reversed(c["name"].split("_"))),
             "synonyms": []} for c in keep]
    anns = [{**a, "category_id": new_id[a["category_id"]]} for a in gt["annotations"] if a["category_id"] in new_id]
    subset = root / "subset.json"
    subset.write_text(json.dumps({**gt, "categories": cats, "annotations": anns}))
    return ds, root / "store.zarr", subset


def _run_config(ds, store, out, annotations, templates, **top):
    data = {"det_annotations": str(annotations), "det_images": str(ds.train_images), "cls_shards": ds.cls_shards,
            "label_store": str(store), **SMALL_DATA,
            "cls_unlabelled": "keep"}  # renamed classes keep no hard label (it follows the name); soft labels do
    return {"output_dir": str(out), "model_preset": "tiny", "data_preset": "tiny", "data": data,
            "teacher": {"model": "lt-tiny-rn", "random_init": True, "templates": templates},
            "max_iters": 2, "checkpoint_every": 2, "log_every": 1, "seed": 0, "progress": False,
            "tensorboard": False, **top}


def _reference_soft_labels(reader: LabelReader, batch: dict, text: np.ndarray, temperature: float,
                           top_n: int = 4) -> list[np.ndarray]:
    """fp32 numpy reference of every target's soft labels, read straight from the store."""
    logit_scale = reader.embedding_attrs()["logit_scale"]
    grid = np.asarray(reader.attrs["grid"]["boxes"])
    out = []
    for t in batch["targets"]:
        n = len(t["labels"])
        soft = np.zeros((n, len(text)), np.float32)
        if batch["source"] == "detection":
            codes, scale, valid = reader.object_embeddings(t["ann_ids"].numpy())
            for i in np.nonzero(valid)[0]:
                soft[i] = decode_embeddings(dequantise(codes[i], scale[i]), text, logit_scale, temperature)
        else:
            for i, (s, p) in enumerate(t["rows"].numpy()):
                if p < 0:
                    continue
                codes, scale, valid = reader.embeddings(int(s), int(p))
                weights, ok = match_crops(t["regions"].numpy()[i:i + 1], grid, "interp", 0.5, top_n)
                if valid and ok[0]:
                    probs = decode_embeddings(dequantise(codes, scale), text, logit_scale, temperature)
                    soft[i] = weights[0] @ probs
        out.append(soft)
    return out


@pytest.mark.slow
def test_one_embedding_store_two_vocabularies(demo_store, tmp_path):
    from lt_distill.pipeline.vocab import load_vocabulary
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import build_train_data
    from lt_distill.stages.train.runtime import DistInfo

    ds, store, subset = demo_store
    reader = LabelReader(store)
    for annotations, templates, temperature in ((ds.train_annotations, "simple", 0.0), (subset, "single", 0.5)):
        cfg = train_config(None, [f"data.soft_temperature={temperature}"],
                           base=_run_config(ds, store, tmp_path / f"run-{templates}", annotations, templates))
        data = build_train_data(cfg.data_config(), cfg, DistInfo())
        # The run's classifier: its own classes and prompts, from the store's teacher (an independent build).
        vocab = load_vocabulary(str(annotations))
        ref_teacher = build_teacher(TeacherConfig(vocab=str(annotations), templates=templates, **TINY), vocab)
        text = ref_teacher.text_embeddings.numpy()
        assert data.text_embeddings.shape == (len(vocab), 64)
        np.testing.assert_allclose(data.text_embeddings.numpy(), text, atol=1e-6)
        assert data.embedded.temperature == (temperature or 1.0)
        check_decoded_soft_labels(
            data, lambda batch: _reference_soft_labels(reader, batch, text, data.embedded.temperature), len(vocab),
            atol=2e-6)
        train_two_steps(cfg)


@pytest.mark.slow
def test_store_from_another_teacher_is_refused_by_name(demo_store, tmp_path):
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import train

    ds, store, _ = demo_store
    steps = []
    for teacher, message in (({"seed": 1}, "teacher weights: store has 'random-init:v2:seed=0"),
                             ({"model": "RN50", "random_init": False, "weights": None}, "teacher.model: store has "
                                                                                        "'lt-tiny-rn', run has 'RN50'")):
        base = _run_config(ds, store, tmp_path / "refused", ds.train_annotations, "simple")
        base["teacher"].update(teacher)
        with pytest.raises(StoreMismatchError, match=message):
            train(train_config(None, base=base), on_step=lambda it, v: steps.append(it))
    assert not steps and not (tmp_path / "refused" / "checkpoints").exists()
    # A top-k reading of an embeddings-only store is refused too.
    base = _run_config(ds, store, tmp_path / "refused", ds.train_annotations, "simple")
    with pytest.raises(StoreMismatchError, match="embeddings only"):
        train(train_config(None, ["data.soft_encoding=topk"], base=base))


def assert_kill_and_resume_is_exact(make_config, tmp_path: Path) -> None:
    """A 4-step run killed after step 3 (checkpoint at 2) and resumed logs the losses of an uninterrupted
    run; ``make_config(out, max_iters=4)`` is the run's config."""
    from train_helpers import run_killable, train_records

    assert run_killable(make_config(tmp_path / "full", max_iters=4), -1, "fresh").returncode == 0
    killed = make_config(tmp_path / "killed", max_iters=4)
    proc = run_killable(killed, 3, "fresh")  # checkpoint at 2, killed after step 3
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_killable(killed, -1, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, got = train_records(tmp_path / "full"), train_records(tmp_path / "killed")
    assert [r["iter"] for r in got] == [1, 2, 3, 4]
    keys = [k for k in ref[0] if k.startswith("loss") or k == "grad_norm"]
    assert "loss_semantic" in keys
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]


@pytest.mark.slow
def test_kill_and_resume_from_an_embedding_store_gives_the_same_losses(demo_store, tmp_path):
    ds, store, subset = demo_store
    assert_kill_and_resume_is_exact(lambda out, **top: _run_config(ds, store, out, subset, "single", **top), tmp_path)


def test_bench_store_embedding_table_small(tmp_path):
    from lt_distill.bench.store_embedding import run_embedding_benchmark

    r = run_embedding_benchmark(num_shards=1, capacity=8, num_crops=5, dims=(16,), num_reads=50, kl_images=4,
                                workdir=tmp_path, step_time=False)
    int8, half = r["sizes"]["D=16 int8"], r["sizes"]["D=16 float16"]
    assert int8["raw_bytes_per_image"] == 5 * (16 + 2) and half["raw_bytes_per_image"] == 5 * 32
    assert int8["bytes_per_image"] >= int8["raw_bytes_per_image"]  # incompressible codes plus checksums/indexes
    assert min(int8["read_random_cold_images_per_s"], int8["read_random_images_per_s"]) > 0
    kl = r["kl"]
    assert kl["crops"] == 4 * 5 and kl["dim"] == 512 and kl["classes"] == 1203
    assert 0 < kl["float16"]["kl_decoded_exact_mean"] < kl["int8"]["kl_decoded_exact_mean"] < 0.01
    assert all(ms > 0 for ms in r["decode_ms_per_batch_cpu"].values())


def test_run_class_text_embeddings_come_from_the_text_cache(tmp_path, monkeypatch):
    """A run reading a CLIP embedding store encodes its class texts once: what precompute's teacher wrote
    (same model, weights, prompts) is read back bit for bit, and a weights file is not even loaded on a hit."""
    import dataclasses

    import lt_distill.stages.train.embedding as train_embedding
    from lt_distill.pipeline.teacher import load_open_clip
    from lt_distill.pipeline.vocab import Vocabulary, load_vocabulary

    calls = {"encode": 0, "load": 0}
    real_encode = train_embedding.encode_class_texts

    def encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    def load(*args, **kwargs):
        calls["load"] += 1
        return load_open_clip(*args, **kwargs)

    monkeypatch.setattr(train_embedding, "encode_class_texts", encode)
    monkeypatch.setattr(train_embedding, "load_open_clip", load)
    model, _ = load_open_clip("lt-tiny-rn", None, random_init=True)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    vocab = Vocabulary("lvis-v1[:50]", load_vocabulary("lvis-v1").categories[:50])
    cfg = TeacherConfig(model="lt-tiny-rn", weights=str(weights), templates="single", device="cpu",
                        text_cache=str(tmp_path / "text"))
    teacher = build_teacher(cfg, vocab)  # as precompute builds it: computes and writes the entry
    text, weights_id = train_embedding.class_text_embeddings(cfg, vocab, torch.device("cpu"))
    assert calls == {"encode": 0, "load": 0} and weights_id == teacher.weights_id
    assert torch.equal(text, teacher.text_embeddings)
    fresh, _ = train_embedding.class_text_embeddings(dataclasses.replace(cfg, text_cache="off"), vocab,
                                                     torch.device("cpu"))
    assert calls == {"encode": 1, "load": 1} and torch.equal(fresh, text)
    other, _ = train_embedding.class_text_embeddings(dataclasses.replace(cfg, templates="simple"), vocab,
                                                     torch.device("cpu"))
    assert calls == {"encode": 2, "load": 2} and not torch.equal(other, text)  # other prompts: another entry
    assert len(list((tmp_path / "text").glob("*.npy"))) == 2
