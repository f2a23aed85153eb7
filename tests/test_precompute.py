"""Stage 1 end to end (stages/precompute, cli precompute / inspect) with the tiny random teacher."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lt_distill.cli import main
from lt_distill.pipeline.grid import GridSpec
from lt_distill.pipeline.shards import expand_shards, iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, decode_image
from lt_distill.pipeline.vocab import load_vocabulary
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute
from lt_distill.store import REASON_CODES, STATUS_DONE, STATUS_FAILED, LabelReader, LabelStore, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import TINY, jpeg, make_shards, photo, store_arrays, write_tar  # noqa: E402

DOG, ENTITY, ZEBRA = "n02084071", "n00004475", "n02391049"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def lvis():
    return load_vocabulary("lvis-v1")


@pytest.fixture(scope="module")
def teacher(lvis):
    return build_teacher(TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"), lvis)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "classes.txt").write_text(f"{DOG}\n{ENTITY}\n{ZEBRA}\n")
    # .json wnids agree with .cls under classes.txt (precompute checks that before labelling)
    pattern = make_shards(root / "shards", num_shards=3, per_shard=5, class_indices=[0, 1, 2], wnids=[DOG, ENTITY, ZEBRA])
    return root, pattern


@pytest.fixture(scope="module")
def crops_store(data, tmp_path_factory):
    root, pattern = data
    out = tmp_path_factory.mktemp("crops")
    cfg = PrecomputeConfig(store=str(out / "store"), shards=pattern, teacher=TeacherConfig(
        model="lt-tiny-rn", random_init=True, templates="single"), class_list=str(root / "classes.txt"),
        workers=2, batch_size=4, summary_json=str(out / "summary.json"), progress=False)
    summary = run_precompute(cfg, log=lambda _m: None)
    return out / "store", summary


def check_labels_match_teacher(store_path: Path, url: str, teacher, mode: str) -> int:
    """Every stored (K, k) block equals the teacher's own top-k for that image (float16 rounding aside)."""
    reader = LabelReader(store_path)
    boxes = np.asarray(reader.attrs["grid"]["boxes"])
    k = reader.layout.topk
    checked = 0
    for raw in iter_tar_samples(url):
        shard, pos = reader.locate(raw.key)
        index, prob, valid = reader.labels(shard, pos)
        if not valid:
            continue
        image = decode_image(raw.fields["jpg"])
        assert tuple(reader.shard_rows(shard).sizes[pos]) == image.shape[:2]
        p = (teacher.score_crops(image, boxes) if mode == "crops" else teacher.score_pooled(image, boxes)).numpy()
        stored = prob.astype(np.float32)
        np.testing.assert_allclose(stored, np.take_along_axis(p, index.astype(np.int64), 1), rtol=2e-3, atol=1e-7)
        kth = np.sort(p, axis=1)[:, -k - 1]  # the best class left out
        assert (stored.min(1) * (1 + 2e-3) >= kth).all()
        assert (np.diff(stored, axis=1) <= 0).all()  # descending
        checked += 1
    return checked


def test_end_to_end_crops(crops_store, data, teacher, lvis):
    path, summary = crops_store
    root, pattern = data
    assert verify_store(path) == []
    store = LabelStore.open(path)
    assert store.layout.num_shards == 3 and store.layout.num_crops == 30 and store.layout.topk == 16
    assert store.layout.shard_capacity == 16  # 5 samples per shard, rounded up to a multiple of 16
    assert store.attrs["teacher"]["model"] == "lt-tiny-rn" and store.attrs["teacher"]["engine"] == "eager"
    assert store.attrs["encoding"]["residual"] == "spread" and store.attrs["precompute"]["labels"] == "cls"
    assert store.shards_done().all()
    # hard labels from .cls through the class list and the WordNet mapping: dog, (entity: none), zebra, ...
    reader = LabelReader(path)
    want = [lvis.names.index("dog"), -1, lvis.names.index("zebra")]
    for s in range(3):
        rows = reader.shard_rows(s)
        assert list(rows.keys[:5]) == [f"s{s:03d}_{i:04d}" for i in range(5)]
        assert list(rows.hard_labels[:5]) == [want[(s * 5 + i) % 3] for i in range(5)]
        assert (rows.status[:5] == STATUS_DONE).all()
    # labels are the teacher's top-k per crop
    for url in expand_shards(pattern):
        assert check_labels_match_teacher(path, url, teacher, "crops") == 5
    np.testing.assert_array_equal(reader.text_embeddings(), teacher.text_embeddings.numpy().astype(np.float16))
    assert reader.text_fingerprint() == teacher.fingerprint
    written = json.loads((path.parent / "summary.json").read_text())
    assert written["classification"]["images_done"] == 15 and written["classification"]["shards"] == 3
    assert written["classification"]["store"]["shards_done"] == 3
    assert summary["classification"]["images_failed"] == 0


def test_pooled_mode_and_json_labels(data, tmp_path, teacher, lvis):
    root, pattern = data
    cfg = PrecomputeConfig(store=str(tmp_path / "pooled"), shards=pattern, mode="pooled", grid="coarse", topk=8,
                           residual="renormalise", labels="json", teacher=TeacherConfig(
                               model="lt-tiny-rn", random_init=True, templates="single"), workers=0, progress=False)
    # .json wnids cycle dog, entity (a well-formed wnid no LVIS class has), zebra
    run_precompute(cfg, log=lambda _m: None)
    store = LabelStore.open(tmp_path / "pooled")
    assert store.attrs["teacher"]["mode"] == "pooled" and store.attrs["teacher"]["pooled_size"] == 128
    assert store.attrs["encoding"]["residual"] == "renormalise" and store.layout.num_crops == 14
    expected = np.tile([lvis.names.index("dog"), -1, lvis.names.index("zebra")], 5)
    np.testing.assert_array_equal(store.group["rows/hard_label"][:][store.group["rows/status"][:] == STATUS_DONE],
                                  expected)
    assert check_labels_match_teacher(tmp_path / "pooled", expand_shards(pattern)[1], teacher, "pooled") == 5


def test_bad_samples_are_recorded_and_the_job_goes_on(tmp_path, lvis):
    """A truncated member, bad JPEG bytes and a missing label fail exactly those samples, with reasons;
    an empty shard and a shard of only failures are written too."""
    good = [jpeg(photo(n)[:160, :200]) for n in ("astronaut", "coffee", "chelsea")]
    members = [("a.jpg", good[0]), ("a.cls", b"0"),
               ("b.jpg", b"\xff\xd8\xff\xe0 definitely not a JPEG"), ("b.cls", b"0"),
               ("c.jpg", good[1]),
               ("d.jpg", good[2]), ("d.cls", b"2"),
               ("e.jpg", jpeg(photo("rocket"))), ("e.cls", b"0")]
    write_tar(tmp_path / "bad-0.tar", members)
    raw = (tmp_path / "bad-0.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("e.jpg").offset_data + 1000
    (tmp_path / "bad-0.tar").write_bytes(raw[:cut])  # the file ends inside e.jpg
    write_tar(tmp_path / "bad-1.tar", [])
    write_tar(tmp_path / "bad-2.tar", [("x.jpg", b"garbage"), ("x.cls", b"0"), ("y.jpg", good[0]), ("y.cls", b"9")])
    (tmp_path / "classes.txt").write_text(f"{DOG}\n{ENTITY}\n{ZEBRA}\n")
    cfg = PrecomputeConfig(store=str(tmp_path / "store"), shards=str(tmp_path / "bad-{0..2}.tar"), grid="coarse",
                           shard_capacity=8, class_list=str(tmp_path / "classes.txt"), workers=2,
                           teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"),
                           accept_partial_shards=True, progress=False)  # shard 0 ends inside e.jpg
    summary = run_precompute(cfg, log=lambda _m: None)["classification"]
    store = LabelStore.open(tmp_path / "store")
    assert store.shards_done().all() and list(store.shard_num_rows()) == [5, 0, 2]
    assert store.shard_read_records()[0]["end"] == "member_cut_short"
    status, reason = store.group["rows/status"][:], store.group["rows/reason"][:]
    keys = store.group["rows/key"][:]
    assert list(keys[:5]) == ["a", "b", "c", "d", "e"]
    assert list(status[:5]) == [STATUS_DONE, STATUS_FAILED, STATUS_FAILED, STATUS_DONE, STATUS_FAILED]
    assert list(reason[:5]) == [0, REASON_CODES["undecodable"], REASON_CODES["missing_label"], 0,
                                REASON_CODES["truncated"]]
    assert list(reason[16:18]) == [REASON_CODES["undecodable"], REASON_CODES["unknown_label"]]
    assert (status[16:18] == STATUS_FAILED).all()
    assert list(store.group["rows/hard_label"][:5]) == [lvis.names.index("dog"), -1, -1, lvis.names.index("zebra"), -1]
    assert summary["images_done"] == 2 and summary["images_failed"] == 5
    assert summary["failed_by_reason"] == {"missing_label": 1, "truncated": 1, "undecodable": 2, "unknown_label": 1}
    assert len(summary["notes"]) == 1 and "e.jpg is cut short" in summary["notes"][0]
    assert verify_store(tmp_path / "store") == []


def test_rerun_resumes_and_other_settings_are_refused(crops_store, data, capsys):
    path, _ = crops_store
    root, pattern = data
    before = store_arrays(path)
    args = ["precompute", "--store", path, "--shards", pattern, *TINY, "--class-list", root / "classes.txt",
            "--workers", "0", "--batch-size", "4"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "3 already done, 0 to label" in out
    after = store_arrays(path)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    code, out, err = run_cli(capsys, *args, "--topk", "8", "--temperature", "2")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "encoding.topk: store has 16, run expects 8" in err and "teacher.temperature" in err
    assert all(np.array_equal(after[k], store_arrays(path)[k]) for k in after)  # nothing written


@pytest.mark.parametrize("case", ["missing weights", "unknown model", "bad shard pattern", "weights not found",
                                  "existing non-store folder"])
def test_clear_errors_and_nothing_written(case, data, tmp_path, capsys):
    root, pattern = data
    store = tmp_path / "store"
    args = ["precompute", "--store", store, "--shards", pattern, "--no-progress", "--templates", "single",
            "--class-list", root / "classes.txt"]
    expect = {
        "missing weights": (["--model", "lt-tiny-rn"], "no weights for teacher 'lt-tiny-rn'"),
        "unknown model": (["--model", "RN51", "--random-init"], "unknown open_clip model 'RN51'"),
        "bad shard pattern": (["--model", "lt-tiny-rn", "--random-init", "--shards", str(root / "x-{0..3}.tar")],
                              "4 of 4 shard files do not exist"),
        "weights not found": (["--model", "lt-tiny-rn", "--weights", tmp_path / "w.pt"], "weights file not found"),
        "existing non-store folder": (["--model", "lt-tiny-rn", "--random-init"], "is not a label store"),
    }[case]
    if case == "existing non-store folder":
        store.mkdir()
        (store / "precious.txt").write_text("keep me")
    code, out, err = run_cli(capsys, *args, *expect[0])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expect[1] in err
    if case == "existing non-store folder":
        assert [p.name for p in store.iterdir()] == ["precious.txt"]
    else:
        assert not store.exists()


def test_overwrite_replaces_a_store_with_other_settings(data, tmp_path, capsys):
    root, pattern = data
    base = ["precompute", "--store", tmp_path / "s", "--shards", pattern, *TINY, "--labels", "none",
            "--grid", "whole", "--workers", "1"]
    assert run_cli(capsys, *base)[0] == 0
    code, _, err = run_cli(capsys, *base, "--residual", "renormalise")
    assert code == 2 and "encoding.residual: store has 'spread', run expects 'renormalise'" in err
    code, _, err = run_cli(capsys, *base, "--residual", "renormalise", "--overwrite")
    assert code == 0, err
    assert LabelStore.open(tmp_path / "s").attrs["encoding"]["residual"] == "renormalise"


def test_pseudo_labels_when_there_are_no_source_labels(data, tmp_path):
    """--labels none (RichSem Eq. 7): the hard label is the whole-image argmax above the threshold."""
    root, pattern = data
    results = {}
    for threshold in (0.0, 1.0):
        cfg = PrecomputeConfig(store=str(tmp_path / f"t{threshold}"), shards=pattern, labels="none", grid="coarse",
                               pseudo_threshold=threshold, workers=1, progress=False,
                               teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"))
        run_precompute(cfg, log=lambda _m: None)
        store = LabelStore.open(tmp_path / f"t{threshold}")
        done = store.group["rows/status"][:] == STATUS_DONE
        results[threshold] = (store.group["rows/hard_label"][:][done], store.group["labels/index"][:][done])
    hard, index = results[0.0]
    np.testing.assert_array_equal(hard, index[:, 0, 0])  # box 0 is the whole image
    assert (results[1.0][0] == -1).all()


def test_object_labels_for_annotation_boxes(crops_store, tmp_path, teacher):
    path, _ = crops_store
    images = tmp_path / "images" / "train2017"
    images.mkdir(parents=True)
    pics = {1: photo("astronaut")[:300, :400], 2: photo("coffee")[:200, :150]}
    for image_id, pic in pics.items():
        (images / f"{image_id:012d}.jpg").write_bytes(jpeg(pic, quality=95))
    ann = {
        "images": [{"id": i, "height": p.shape[0], "width": p.shape[1],
                    "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg"} for i, p in pics.items()]
        + [{"id": 3, "height": 10, "width": 10, "coco_url": "http://x/train2017/000000000003.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [10, 20, 100, 80], "category_id": 1},
                        {"id": 11, "image_id": 1, "bbox": [0, 0, 400, 300], "category_id": 1},
                        {"id": 14, "image_id": 2, "bbox": [30.5, 40.25, 60, 90], "category_id": 1},
                        {"id": 12, "image_id": 2, "bbox": [5, 5, 0, 10], "category_id": 1},
                        {"id": 13, "image_id": 3, "bbox": [1, 1, 5, 5], "category_id": 1}],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "lvis.json").write_text(json.dumps(ann))
    cfg = PrecomputeConfig(store=str(path), annotations=str(tmp_path / "lvis.json"), images=str(tmp_path / "images"),
                           teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"),
                           object_block_size=2, workers=2, progress=False)
    summary = run_precompute(cfg, log=lambda _m: None)["objects"]
    assert summary["num_objects"] == 5 and summary["done"] == 3 and summary["blocks"] == 3
    assert summary["failed_by_reason"] == {"too_small": 1, "undecodable": 1}
    reader = LabelReader(path)
    index, prob, valid = reader.objects([10, 11, 14, 12, 13])
    assert list(valid) == [True, True, True, False, False]
    for row, (image_id, (x, y, w, h)) in enumerate([(1, (10, 20, 100, 80)), (1, (0, 0, 400, 300)),
                                                     (2, (30.5, 40.25, 60, 90))]):
        pic = decode_image((images / f"{image_id:012d}.jpg").read_bytes())
        ph, pw = pic.shape[:2]
        p = teacher.score_pooled(pic, np.array([[x / pw, y / ph, (x + w) / pw, (y + h) / ph]]))[0].numpy()
        np.testing.assert_allclose(prob[row].astype(np.float32), p[index[row].astype(np.int64)], rtol=2e-3)
        assert int(index[row, 0]) == int(p.argmax())
    # rerun: every block is done, nothing is recomputed
    again = run_precompute(cfg, log=lambda _m: None)["objects"]
    assert again["blocks"] == 0 and again["done"] == 0


def test_objects_need_an_existing_store(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    (tmp_path / "img").mkdir()
    code, _, err = run_cli(capsys, "precompute", "--store", tmp_path / "none", "--annotations", tmp_path / "a.json",
                           "--images", tmp_path / "img", *TINY)
    assert code == 2 and "no label store at" in err


def test_inspect_draws_the_grid(crops_store, data, tmp_path, capsys):
    path, _ = crops_store
    root, pattern = data
    out = tmp_path / "inspect.png"
    code, stdout, err = run_cli(capsys, "inspect", path, "--shards", pattern, "--key", "s001_0002", "--out", out)
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as img:
        assert img.size[0] > 4 * img.size[1] * 0.8  # four panels side by side (one per grid level)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas
    code, _, err = run_cli(capsys, "inspect", path, "--shards", pattern, "--key", "nope", "--out", out)
    assert code == 2 and "no sample with key 'nope'" in err


def test_grid_boxes_recorded(crops_store):
    path, _ = crops_store
    attrs = LabelStore.open(path).attrs
    np.testing.assert_allclose(np.asarray(attrs["grid"]["boxes"]), GridSpec.parse("default").boxes())
    assert attrs["grid"]["spec"] == GridSpec.parse("default").spec
