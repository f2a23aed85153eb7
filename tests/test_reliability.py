"""Issue 15, "nothing silently wrong": each case reproduced through real files (shards, stores, configs)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lt_distill.pipeline.shards import decode_sample, iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig
from lt_distill.pipeline.vocab import HardLabeler, LabelSource, WnidMapper, load_synset_wnids, load_vocabulary
from lt_distill.stages.precompute import PartialShardsError, PrecomputeConfig, run_precompute
from lt_distill.store import (
    REASON_CODES,
    STATUS_DONE,
    STATUS_FAILED,
    LabelReader,
    LabelStore,
    ShardLock,
    StoreError,
    StoreExistsError,
    is_label_store,
    verify_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import jpeg, photo, write_tar  # noqa: E402
from store_helpers import make_result, make_store  # noqa: E402

DOG, ENTITY, ZEBRA = "n02084071", "n00004475", "n02391049"


def _sample(key: str, name: str, cls: bytes = b"0") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg(photo(name)[:96, :128])), (f"{key}.cls", cls)]


def _cfg(tmp_path: Path, pattern: str, **kw) -> PrecomputeConfig:
    (tmp_path / "classes.txt").write_text(f"{DOG}\n{ENTITY}\n{ZEBRA}\n")
    return PrecomputeConfig(store=str(tmp_path / "store"), shards=pattern, grid="whole", shard_capacity=8,
                            class_list=str(tmp_path / "classes.txt"), workers=0, progress=False,
                            teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"), **kw)


def _quiet(lines: list[str]):
    return lines.append


# ---------------------------------------------------------------------------------------------------- case 4
@pytest.mark.slow
def test_cut_and_empty_shards_are_not_done_and_a_changed_shard_is_relabelled(tmp_path):
    """Issue 15.4: a shard cut at a header boundary and a zero-byte shard used to be committed as done
    ("4 done, 0 failed"), and the rerun skipped them after the files were restored."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    full = [m for i, n in enumerate(names) for m in _sample(f"k{i}", n)]
    write_tar(tmp_path / "s-0.tar", full[:4])
    write_tar(tmp_path / "s-1.tar", full)
    raw = (tmp_path / "s-1.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("k2.jpg").offset  # a header boundary: tarfile itself reports nothing
    (tmp_path / "s-1.tar").write_bytes(raw[:cut])
    (tmp_path / "s-2.tar").write_bytes(b"")
    cfg = _cfg(tmp_path, str(tmp_path / "s-{0..2}.tar"))
    lines: list[str] = []
    with pytest.raises(PartialShardsError, match="2 shard"):
        run_precompute(cfg, log=_quiet(lines))
    assert any("not done: shard 1" in line and "without the end-of-archive marker" in line for line in lines), lines
    assert any("not done: shard 2" in line and "the file is empty" in line for line in lines), lines
    store = LabelStore.open(cfg.store)
    assert list(store.shards_done()) == [True, False, False]
    rec = store.shard_read_records()[0]
    assert rec["end"] == "complete" and rec["members"] == 4 and rec["size"] == (tmp_path / "s-0.tar").stat().st_size

    write_tar(tmp_path / "s-1.tar", full)          # restored
    write_tar(tmp_path / "s-2.tar", full[:2])
    lines.clear()
    summary = run_precompute(cfg, log=_quiet(lines))["classification"]
    assert summary["shards"] == 2 and summary["store"]["shards_done"] == 3
    assert list(LabelStore.open(cfg.store).shard_num_rows()) == [2, 4, 1]

    write_tar(tmp_path / "s-0.tar", full[4:8])      # same name, other content
    lines.clear()
    summary = run_precompute(cfg, log=_quiet(lines))["classification"]
    assert any("shard 0" in line and "changed since it was labelled" in line for line in lines), lines
    assert summary["shards"] == 1
    assert list(LabelStore.open(cfg.store).group["rows/key"][:2]) == ["k2", "k3"]
    assert verify_store(cfg.store) == []


@pytest.mark.slow
def test_partial_shard_is_kept_when_accepted(tmp_path):
    full = [m for i, n in enumerate(("astronaut", "coffee", "chelsea")) for m in _sample(f"k{i}", n)]
    write_tar(tmp_path / "s-0.tar", full)
    raw = (tmp_path / "s-0.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        cut = tar.getmember("k1.cls").offset
    (tmp_path / "s-0.tar").write_bytes(raw[:cut])
    cfg = _cfg(tmp_path, str(tmp_path / "s-{0..0}.tar"), accept_partial_shards=True)
    run_precompute(cfg, log=lambda _m: None)
    store = LabelStore.open(cfg.store)
    assert store.shards_done().all() and store.shard_read_records()[0]["accepted"] is True
    assert store.shard_read_records()[0]["end"] == "no_end_marker"


# ---------------------------------------------------------------------------------------------------- cases 5, 11, 13
@pytest.mark.slow
def test_duplicate_keys_bad_labels_and_huge_images_fail_those_samples(tmp_path):
    """Issue 15.5 (a,a,b: one image silently overwritten), 15.11 (a 5000-digit .cls stopped the job),
    15.13 (no pixel cap)."""
    members = (_sample("a", "astronaut") + _sample("a", "coffee") + _sample("b", "chelsea", b"2")
               + _sample("c", "rocket", b"9" * 5000) + [("d.jpg", jpeg(photo("camera")[:200, :300])), ("d.cls", b"1")])
    write_tar(tmp_path / "s-0.tar", members)
    write_tar(tmp_path / "s-1.tar", _sample("b", "coins", b"1"))       # b again, in another shard
    cfg = _cfg(tmp_path, str(tmp_path / "s-{0..1}.tar"), max_image_pixels=200 * 299)
    summary = run_precompute(cfg, log=lambda _m: None)["classification"]
    store = LabelStore.open(cfg.store)
    assert list(store.group["rows/key"][:5]) == ["a", "a", "b", "c", "d"]
    codes = REASON_CODES
    assert list(store.group["rows/reason"][:5]) == [codes["duplicate_key"], codes["duplicate_key"], 0,
                                                    codes["unparsable_label"], codes["too_large"]]
    assert list(store.group["rows/status"][:5]) == [STATUS_FAILED, STATUS_FAILED, STATUS_DONE, STATUS_FAILED,
                                                    STATUS_FAILED]
    assert summary["failed_by_reason"] == {"duplicate_key": 2, "too_large": 1, "unparsable_label": 1}
    reader = LabelReader(cfg.store)
    with pytest.raises(StoreError, match=r"key 'b' is ambiguous: 2 rows .*\(0, 2\), \(1, 0\)"):
        reader.locate("b")
    with pytest.raises(StoreError, match="key 'a' is ambiguous"):
        reader.locate("a")
    assert reader.locate("d") == (0, 4)


def test_any_label_parse_error_fails_only_that_sample(tmp_path):
    vocab = load_vocabulary("lvis-v1")
    mapper = WnidMapper(vocab, load_synset_wnids(None))
    labeler = HardLabeler(LabelSource.parse("json"), mapper, [DOG, ENTITY])
    image = jpeg(photo("astronaut")[:64, :64])
    write_tar(tmp_path / "j.tar", [("x.jpg", image), ("x.json", b"[" * 100_000 + b"]" * 100_000),
                                   ("y.jpg", image), ("y.json", b'{"wnid": ' + b"1" * 5000 + b"}"),
                                   ("z.jpg", image), ("z.json", json.dumps({"wnid": DOG}).encode())])
    reasons = [decode_sample(raw, labeler)[3] for raw in iter_tar_samples(str(tmp_path / "j.tar"))]
    assert reasons == [REASON_CODES["unparsable_label"], REASON_CODES["unparsable_label"], 0]


# ---------------------------------------------------------------------------------------------------- cases 2, 3
@pytest.mark.slow
def test_rerun_recomputes_damaged_shards_and_lost_text_embeddings(tmp_path):
    """Issue 15.2/15.3: a deleted label shard or lost text embeddings used to pass verify, and the rerun said
    "already done"."""
    for s in range(3):
        write_tar(tmp_path / f"s-{s}.tar", _sample(f"k{s}a", "astronaut") + _sample(f"k{s}b", "coffee"))
    cfg = _cfg(tmp_path, str(tmp_path / "s-{0..2}.tar"))
    run_precompute(cfg, log=lambda _m: None)
    path = Path(cfg.store)
    before = {s: LabelReader(path).labels(s, 1)[:2] for s in range(3)}
    emb = LabelReader(path).text_embeddings()
    (path / "labels" / "index" / "c" / "1" / "0" / "0").unlink()
    shard2 = path / "labels" / "prob" / "c" / "2" / "0" / "0"
    raw = bytearray(shard2.read_bytes())
    raw[20] ^= 0xFF
    shard2.write_bytes(bytes(raw))
    for f in (path / "text" / "embeddings" / "c").rglob("*"):
        if f.is_file():
            f.unlink()                                   # as if killed during their write
    problems = verify_store(path)
    assert any(p.startswith("labels/index shard 1: file") for p in problems), problems
    assert any(p.startswith("labels/prob shard 2:") and "crc32c" in p for p in problems), problems
    assert any(p.startswith("text/embeddings:") for p in problems), problems

    lines: list[str] = []
    summary = run_precompute(cfg, log=_quiet(lines))["classification"]   # plain rerun: presence only
    assert summary["shards"] == 1 and any("shard 1" in line and "recomputing" in line for line in lines), lines
    assert any("text embeddings" in line and "rewrote" in line for line in lines), lines
    lines.clear()
    summary = run_precompute(_cfg(tmp_path, cfg.shards, repair=True), log=_quiet(lines))["classification"]
    assert summary["shards"] == 1 and any("shard 2" in line and "crc32c" in line for line in lines), lines
    assert verify_store(path) == []
    reader = LabelReader(path)
    for s in range(3):
        np.testing.assert_array_equal(reader.labels(s, 1)[0], before[s][0])
        np.testing.assert_array_equal(reader.labels(s, 1)[1], before[s][1])
    np.testing.assert_array_equal(reader.text_embeddings(), emb)


# ---------------------------------------------------------------------------------------------------- cases 9, 11
def test_kill_during_creation_leaves_no_store_and_a_rerun_creates_it(tmp_path):
    """Issue 15.9: a kill during creation left a store every command crashed on (KeyError)."""
    path = tmp_path / "s.zarr"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import zarr
        from store_helpers import make_store
        real = zarr.Group.create_array
        calls = []
        def dying(self, *a, **k):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        zarr.Group.create_array = dying
        make_store({str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not path.exists() and not is_label_store(path)
    assert len(list(tmp_path.glob(".s.zarr.creating-*"))) == 1      # the killed build, beside it
    store = make_store(path)
    store.write_shard(0, make_result(0, 5))
    assert verify_store(path) == [] and not list(tmp_path.glob(".s.zarr.creating-*"))


def _create_at_once(path: str, barrier, results) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from store_helpers import make_store as mk

    barrier.wait()
    try:
        mk(path)
        results.put("created")
    except StoreExistsError:
        results.put("exists")


def test_concurrent_creators_one_wins_the_other_is_told_it_exists(tmp_path):
    """Issue 15.11: two starts on one new store could die with "Directory not empty"."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_create_at_once, args=(str(tmp_path / "s.zarr"), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=600) for _ in procs)  # spawned interpreters start slowly when loaded
    for p in procs:
        p.join(600)
    assert outcomes.count("created") >= 1 and set(outcomes) <= {"created", "exists"}
    assert all(p.exitcode == 0 for p in procs)
    assert verify_store(tmp_path / "s.zarr") == [] and not list(tmp_path.glob(".s.zarr.*"))


# ---------------------------------------------------------------------------------------------------- case 10
@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe"])
def test_empty_or_unreadable_lock_is_stale_and_taken_over(tmp_path, content, caplog):
    """Issue 15.10: a disk-full run left 0-byte locks that blocked every later run."""
    store = make_store(tmp_path / "s.zarr")
    lock = store.shard_lock(2)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_bytes(content)
    with caplog.at_level("WARNING", logger="lt_distill.store"):
        store.write_shard(2, make_result(2, 4))
    assert "stale" in caplog.text and str(lock.path) in caplog.text
    assert store.shards_done()[2] and not lock.path.exists()
    held = ShardLock(lock.path, "x")
    with held:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(StoreError, match="already being written by pid"):
            ShardLock(lock.path, "x").acquire()


# ---------------------------------------------------------------------------------------------------- cases 6, 12
def _gt_and_dets():
    cats = [{"id": 1, "name": "a", "frequency": "f", "image_count": 1},
            {"id": 2, "name": "b", "frequency": "r", "image_count": 1}]
    images = [{"id": i, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400}]
    dets = [{"image_id": 1, "category_id": 1, "bbox": [11, 10, 30, 30], "score": 0.9},
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.8},
            {"image_id": 2, "category_id": 2, "bbox": [50, 51, 20, 20], "score": 0.3}]
    return {"images": images, "annotations": anns, "categories": cats}, dets


@pytest.mark.parametrize("field, value, message", [
    ("score", float("nan"), "score must be a finite number"),
    ("score", -0.5, "score must be a finite number >= 0"),
    ("score", "0.9", "score must be a finite number"),
    ("bbox", [float("inf"), 0, 5, 5], "four finite numbers"),
    ("bbox", [0, 0, -5, 5], "negative width or height"),
    ("bbox", 7, r"bbox must be \[x, y, w, h\]"),
    ("bbox", "0 0 5 5", r"bbox must be \[x, y, w, h\]"),
    ("image_id", [1], "image_id must be an integer"),
])
def test_invalid_detections_are_refused_by_name(field, value, message):
    """Issue 15.6/15.12: a NaN score silently moved AP (0.61 -> 0.68); malformed detections raised tracebacks."""
    from lt_distill.pipeline import evaluate as ev

    gt, dets = _gt_and_dets()
    ev.evaluate_detections(gt, dets)
    dets[2] = dict(dets[2], **{field: value})
    with pytest.raises(ev.EvaluationError, match=f"detection 2: .*{message}"):
        ev.evaluate_detections(gt, dets)


@pytest.mark.parametrize("change, message", [
    (lambda gt: gt["annotations"][1].update(bbox=[50, 50, -20, 20]), r"annotations\[1\] \(id 2\): bbox has a negative"),
    (lambda gt: gt["annotations"][0].update(bbox=[float("nan"), 1, 2, 3]), "four finite numbers"),
    (lambda gt: gt["annotations"][0].pop("category_id"), r"annotations\[0\] lacks category_id"),
    (lambda gt: gt["annotations"][0].update(image_id="1"), "image_id must be an integer"),
    (lambda gt: gt.update(images=[]), "lists no images"),
])
def test_invalid_annotations_are_refused_by_name(change, message):
    from lt_distill.pipeline import evaluate as ev

    gt, dets = _gt_and_dets()
    change(gt)
    with pytest.raises(ev.EvaluationError, match=message):
        ev.evaluate_detections(gt, dets)


def test_eval_cli_malformed_files_give_one_error_line(tmp_path):
    gt, dets = _gt_and_dets()
    dets[0]["score"] = float("nan")
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    proc = subprocess.run([sys.executable, "-m", "lt_distill.cli", "eval", "--annotations", str(tmp_path / "gt.json"),
                           "--detections", str(tmp_path / "dets.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: detection 0: score must be a finite number >= 0, got nan"], proc.stderr


# ---------------------------------------------------------------------------------------------------- case 8
def test_annotations_without_usable_boxes_are_refused_and_skips_are_named(tmp_path, caplog):
    """Issue 15.8: annotations with no bbox / no category_id trained with every detection loss 0.0."""
    from lt_distill.errors import LtDistillError
    from lt_distill.pipeline.data.detection import load_detection_annotations

    doc = {"images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.jpg"}],
           "categories": [{"id": 3, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3}, {"id": 2, "image_id": 1, "bbox": [1, 1, 5, 5]},
                           {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, float("nan"), 5]}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LtDistillError, match=r"no usable box among 3 annotations \(bad_bbox 1, missing_bbox 1, "
                                             r"missing_category_id 1\)"):
        load_detection_annotations(path)
    doc["annotations"].append({"id": 4, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]})
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="lt_distill.data"):
        records, _, skipped = load_detection_annotations(path)
    assert skipped == {"bad_bbox": 1, "missing_bbox": 1, "missing_category_id": 1}
    assert "skipped bad_bbox 1, missing_bbox 1, missing_category_id 1" in caplog.text
    assert records[0].ann_ids.tolist() == [4]


# ---------------------------------------------------------------------------------------------------- case 12
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lt_distill.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_store_commands_on_damaged_stores_give_one_line_or_name_the_problem(tmp_path):
    """Issue 15.12: verify/info raised tracebacks on a truncated shard index, a 0-byte shard file, an undecodable
    status chunk and a missing zarr.json, and info reported "done" for a store verify rejects."""
    path = tmp_path / "s.zarr"
    store = make_store(path)
    for s in range(3):
        store.write_shard(s, make_result(s, 10))
    index_file = path / "labels" / "index" / "c" / "0" / "0" / "0"
    index_file.write_bytes(index_file.read_bytes()[:-30])                   # truncated shard index
    (path / "rows" / "key" / "c" / "1").write_bytes(b"")                    # 0-byte shard file
    status = path / "rows" / "status" / "c" / "2"
    raw = bytearray(status.read_bytes())
    raw[2] ^= 0xFF                                                           # undecodable status chunk
    status.write_bytes(bytes(raw))
    proc = _cli("store", "verify", path)
    assert proc.returncode == 1 and not proc.stderr, proc.stderr
    for needle in ("labels/index shard 0: shard index is truncated", "rows/key shard 1: shard index is truncated",
                   "rows/status shard 2: 1 inner chunk(s) fail their crc32c"):
        assert needle in proc.stdout, proc.stdout
    proc = _cli("store", "info", path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "row status is damaged" in proc.stderr
    status.write_bytes(bytes(raw[:2] + bytearray([raw[2] ^ 0xFF]) + raw[3:]))   # repaired; shard 1 is still bad
    (path / "rows" / "key" / "c" / "1").unlink()
    proc = _cli("store", "info", path, "--json", tmp_path / "info.json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["shards"]["done"] == 2 and info["shards"]["damaged"] == 1 and "1" in info["damaged_shards"]
    (path / "labels" / "prob" / "zarr.json").unlink()
    for command in ("info", "verify", "stats"):
        proc = _cli("store", command, path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "incomplete label store (array labels/prob is missing)" in proc.stderr


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    """Issue 15.12: disk full while saving, a foreign pickle, and a truncated newest checkpoint."""
    import fractions

    import torch

    from lt_distill.errors import LtDistillError
    from lt_distill.pipeline.model.checkpoint import load_checkpoint
    from lt_distill.stages.train.checkpoint import checkpoint_dir, load_resume_checkpoint, save_training_checkpoint

    state = {"model": {"w": torch.ones(3)}, "config": {}, "iteration": 1, "optimizer": {}, "scheduler": {}}
    save_training_checkpoint(tmp_path, state)
    directory = checkpoint_dir(tmp_path)
    (directory / "iter_0000002.pt.tmp").symlink_to("/dev/full")          # a real ENOSPC on write
    with pytest.raises(LtDistillError, match=r"cannot write checkpoint .*iter_0000002.pt: no space left on device"):
        save_training_checkpoint(tmp_path, dict(state, iteration=2))
    assert not (directory / "iter_0000002.pt.tmp").exists()
    save_training_checkpoint(tmp_path, dict(state, iteration=2))
    good = (directory / "iter_0000002.pt").read_bytes()
    (directory / "iter_0000002.pt").write_bytes(good[: len(good) // 2])   # newest cut short
    path, loaded, notes = load_resume_checkpoint(tmp_path)
    assert path.name == "iter_0000001.pt" and loaded["iteration"] == 1
    assert "skipping iter_0000002.pt" in notes[0] and "previous intact checkpoint iter_0000001.pt" in notes[1]
    with pytest.raises(LtDistillError, match="truncated or not a PyTorch file") as info:
        load_checkpoint(directory / "iter_0000002.pt")
    assert "\n" not in str(info.value)

    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "foreign.pt")
    with pytest.raises(LtDistillError, match="not an lt-distill checkpoint: it holds Python objects") as info:
        load_checkpoint(tmp_path / "foreign.pt")
    assert "weights_only=False" not in str(info.value) and "weights_only" not in str(info.value).replace(
        "weights_only=True", "")


@pytest.mark.parametrize("name, content, message", [
    ("bad.toml", b"[optim]\nlr = 1e-4 # caf\xe9\n", "is not UTF-8 text"),
    ("list.json", b"[1, 2]", "must hold an object of sections and keys, got a list"),
])
def test_config_file_errors_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    proc = _cli("train", "--config", tmp_path / name)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_config_numbers_are_refused(value):
    from lt_distill.errors import ConfigError
    from lt_distill.stages.train.config import train_config

    with pytest.raises(ConfigError, match=f"optim.lr: expected a finite number, got {value.lstrip('+')}"):
        train_config(None, [f"optim.lr={value}"])


def test_deleted_object_label_file_is_refused_and_recomputed(tmp_path):
    from lt_distill.store import ObjectBlock

    store = make_store(tmp_path / "s.zarr")
    store.create_objects(6, block_size=4)
    k = store.layout.topk
    for block, n in ((0, 4), (1, 2)):
        store.write_objects_block(block, ObjectBlock(
            ann_ids=np.arange(n) + 4 * block, image_ids=np.zeros(n), boxes=np.ones((n, 4)),
            index=np.tile(np.arange(k, dtype=np.int16), (n, 1)), prob=np.full((n, k), 0.1, np.float16),
            status=np.ones(n, np.uint8)))
    (tmp_path / "s.zarr" / "objects" / "index" / "c" / "1" / "0").unlink()
    assert list(store.objects_blocks_done()) == [True, False]
    assert "objects/index shard 1: file objects/index/c/1/0 is missing although the shard was written" \
        in verify_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="object labels marked done are missing"):
        LabelReader(tmp_path / "s.zarr").objects([0, 4])
