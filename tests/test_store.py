import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_distill.store import (
    LabelReader,
    LabelStore,
    ObjectBlock,
    ShardLockedError,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    check_compatible,
    damaged_shards,
    decode_topk,
    encode_topk,
    kl_divergence,
    residual_mass,
    verify_store,
)

sys.path.insert(0, str(Path(__file__).parent))
from store_helpers import LAYOUT, NUM_CLASSES, make_result, make_store  # noqa: E402


def _assert_shard_equal(reader: LabelReader, shard: int, result) -> None:
    rows = reader.shard_rows(shard)
    n = len(result)
    assert rows.num_rows == n
    assert list(rows.keys[:n]) == result.keys
    np.testing.assert_array_equal(rows.sizes[:n], result.sizes)
    np.testing.assert_array_equal(rows.hard_labels[:n], result.hard_labels)
    np.testing.assert_array_equal(rows.status[:n], result.status)
    np.testing.assert_array_equal(rows.reasons[:n], np.where(result.status == 1, 0, result.reasons))
    assert (rows.status[n:] == 0).all()
    index, prob, valid = reader.labels_batch([shard] * n, range(n))
    done = result.status == 1
    np.testing.assert_array_equal(valid, done)
    np.testing.assert_array_equal(index[done], result.index[done])
    np.testing.assert_array_equal(prob[done], result.prob[done])
    assert (index[~done] == -1).all()


def test_round_trip_every_array(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    results = {0: make_result(0, 24), 3: make_result(3, 7, failed=(2, 5)), 5: make_result(5, 0)}
    for shard, result in results.items():
        store.write_shard(shard, result)
    store.create_objects(10, block_size=4, source="ann.json")
    rng = np.random.default_rng(1)
    oidx, oprob = encode_topk(rng.dirichlet(np.full(NUM_CLASSES, 0.3), size=10), LAYOUT.topk)
    ann_ids = np.arange(100, 110) * 7
    for block in range(3):
        sl = slice(4 * block, min(4 * block + 4, 10))
        n = sl.stop - sl.start
        store.write_objects_block(block, ObjectBlock(ann_ids[sl], ann_ids[sl] // 2, rng.random((n, 4)) * 100,
                                                     oidx[sl], oprob[sl], np.ones(n, np.uint8)))
    emb = rng.standard_normal((NUM_CLASSES, 8)).astype(np.float16)
    store.write_text_embeddings(emb, {"model": "tiny-test"})

    assert store.shards_done().tolist() == [True, False, False, True, False, True]
    assert store.objects_blocks_done().all()
    reader = LabelReader(tmp_path / "s.zarr")
    for shard, result in results.items():
        _assert_shard_equal(reader, shard, result)
    assert reader.locate("s003_0004") == (3, 4)
    with pytest.raises(KeyError):
        reader.locate("s003_0002x")
    index, prob, valid = reader.objects(np.array([ann_ids[3], 5, ann_ids[9]]))
    assert valid.tolist() == [True, False, True]
    np.testing.assert_array_equal(index[[0, 2]], oidx[[3, 9]])
    np.testing.assert_array_equal(prob[[0, 2]], oprob[[3, 9]])
    np.testing.assert_array_equal(reader.text_embeddings(), emb)
    assert reader.text_fingerprint() == {"model": "tiny-test"}
    assert reader.attrs["vocabulary"]["names"][3] == "class_3"
    assert reader.attrs["grid"]["spec"] == "test-grid"
    assert verify_store(tmp_path / "s.zarr") == []
    # The reader pickles (DataLoader workers) and reopens lazily in the new process.
    clone = pickle.loads(pickle.dumps(reader))
    _assert_shard_equal(clone, 0, results[0])


class _RowsDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 24

    def __getitem__(self, i):
        index, prob, valid = self.reader.labels(0, i)
        return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(prob.astype(np.float32)), valid


def test_reader_in_dataloader_workers(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    result = make_result(0, 24)
    store.write_shard(0, result)
    loader = torch.utils.data.DataLoader(_RowsDataset(LabelReader(tmp_path / "s.zarr")), batch_size=5,
                                         num_workers=2, multiprocessing_context="fork")
    index = torch.cat([b[0] for b in loader]).numpy()
    np.testing.assert_array_equal(index, result.index.astype(np.int64))


def test_killed_between_labels_and_status_leaves_shard_missing(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from store_helpers import make_result
        from lt_distill.store import LabelStore
        store = LabelStore.open({str(path)!r}, "r+")
        # Die exactly between the label writes and the status commit.
        LabelStore._commit_status = lambda self, lo, hi, status: os.kill(os.getpid(), signal.SIGKILL)
        store.write_shard(2, make_result(2, 20))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = LabelStore.open(path, "r+")
    assert not store.shards_done()[2]
    reader = LabelReader(path)
    assert not reader.labels(2, 0)[2]                        # labels are there but not valid
    assert verify_store(path) == []                          # a crash is not an inconsistency
    # The dead writer's lock is stale: a rewrite takes it over and commits the shard.
    assert (path / "shards/num_rows/locks/shard-000002.lock").exists()
    result = make_result(2, 20)
    store.write_shard(2, result)
    assert store.shards_done()[2]
    _assert_shard_equal(LabelReader(path), 2, result)


def _write_shards(path: str, shards: list[int]) -> None:
    store = LabelStore.open(path, "r+")
    for shard in shards:
        store.write_shard(shard, make_result(shard, 24 - shard))


def test_two_processes_write_different_shards(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shards, args=(str(path), shards)) for shards in ([0, 2, 4], [1, 3, 5])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reader = LabelReader(path)
    for shard in range(6):
        _assert_shard_equal(reader, shard, make_result(shard, 24 - shard))
    assert LabelStore.open(path).shards_done().all()


def _hold_lock(path: str, ready, release) -> None:
    store = LabelStore.open(path, "r+")
    with store.shard_lock(1):
        ready.set()
        release.wait(60)


def test_second_writer_of_a_shard_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        store = LabelStore.open(path, "r+")
        with pytest.raises(ShardLockedError, match=f"pid {holder.pid}"):
            store.write_shard(1, make_result(1, 5))
        store.write_shard(2, make_result(2, 5))              # other shards are free
    finally:
        release.set()
        holder.join(60)
    store.write_shard(1, make_result(1, 5))                  # released: now it works
    assert store.shards_done()[[1, 2]].all()


def test_compatibility_check_names_each_field(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    check_compatible(store.attrs, {"grid.spec": "test-grid", "encoding.topk": 4, "teacher.model": "tiny-test"})
    with pytest.raises(StoreMismatchError) as err:
        check_compatible(store.attrs, {"vocabulary.sha256": "abc", "grid.spec": "default", "encoding.topk": 4,
                                       "encoding.residual": "renormalise"})
    msg = str(err.value)
    assert "vocabulary.sha256: store has '" in msg and "run expects 'abc'" in msg
    assert "grid.spec: store has 'test-grid', run expects 'default'" in msg
    assert "encoding.residual: store has 'spread', run expects 'renormalise'" in msg
    assert "encoding.topk" not in msg


@pytest.mark.parametrize("residual", ["spread", "renormalise"])
def test_topk_round_trip_loses_at_most_the_residual(residual):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(300, 0.05), size=(64, 3))
    index, prob = encode_topk(probs, 8)
    assert index.dtype == np.int16 and prob.dtype == np.float16
    assert (np.diff(prob.astype(np.float32), axis=-1) <= 0).all()   # descending
    np.testing.assert_array_equal(np.sort(probs, -1)[..., ::-1][..., :8].astype(np.float16), prob)
    full = decode_topk(index, prob, 300, residual)
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=2e-3)
    r = residual_mass(prob)
    fp16 = 8 * 2.0**-11                                              # rounding of k float16 values
    l1 = np.abs(full - probs).sum(-1)
    assert (l1 <= 2 * r + fp16).all()
    kept = np.take_along_axis(full, index.astype(np.int64), -1)
    if residual == "renormalise":
        # KL(decoded || full) is exactly -log(1 - residual), up to float16 rounding.
        np.testing.assert_allclose(kl_divergence(full, probs), -np.log(1 - r), atol=5e-3)
        np.testing.assert_allclose(kept, prob / prob.astype(np.float32).sum(-1, keepdims=True), rtol=1e-6)
    else:
        np.testing.assert_allclose(kept, prob.astype(np.float32), rtol=1e-6)
        assert (kl_divergence(probs, full) <= -np.log(1 - r) + r * np.log(300) + 5e-3).all()


def test_encode_rejects_int16_overflow_and_bad_k():
    with pytest.raises(StoreError):
        encode_topk(np.ones((1, 10)) / 10, 11)
    with pytest.raises(StoreError):
        StoreLayout(num_shards=1, shard_capacity=4, num_crops=1, topk=2, num_classes=40000)


def test_existing_store_needs_overwrite_and_foreign_dirs_are_never_touched(tmp_path):
    make_store(tmp_path / "s.zarr").write_shard(0, make_result(0, 3))
    with pytest.raises(StoreError, match="--overwrite"):
        make_store(tmp_path / "s.zarr")
    assert LabelStore.open(tmp_path / "s.zarr").shards_done()[0]
    fresh = make_store(tmp_path / "s.zarr", overwrite=True)
    assert not fresh.shards_done().any()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a label store"):
        make_store(foreign, overwrite=True)
    assert (foreign / "keep.jpg").exists()


def test_bad_shard_results_are_rejected(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    result = make_result(0, 30)                                      # capacity is 24
    with pytest.raises(StoreError, match="capacity"):
        store.write_shard(0, result)
    result = make_result(0, 4)
    result.index[0, 0, 0] = NUM_CLASSES
    with pytest.raises(StoreError, match="out of range"):
        store.write_shard(0, result)
    with pytest.raises(StoreError, match="read-only"):
        LabelStore.open(tmp_path / "s.zarr").write_shard(0, make_result(0, 4))


def test_verify_finds_corruption(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    store.write_shard(0, make_result(0, 10))
    g = LabelStore.open(path, "r+").group
    bad = g["labels/prob"][0:24]
    bad[3, 1, 0] = 0.9
    bad[3, 1, 1] = 0.9                                               # sums above one
    g["labels/prob"].with_config({"write_empty_chunks": True})[0:24] = bad  # as the writer does
    attrs = dict(g.attrs)
    del attrs["lt_distill_version"]
    g.attrs.put(attrs)
    problems = verify_store(path)
    assert any("row 3: probabilities of a crop sum above 1" in p for p in problems), problems
    assert "attribute lt_distill_version is absent" in problems


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lt_distill.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_bad_paths_give_one_error_line(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path):
        for command in ("info", "verify", "stats"):
            proc = _cli("store", command, str(path))
            assert proc.returncode == 2
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "does not exist" in _cli("store", "info", str(tmp_path / "nowhere")).stderr
    assert "not an lt-distill label store" in _cli("store", "info", str(tmp_path)).stderr


def test_cli_info_verify_stats(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    store.write_shard(0, make_result(0, 10, failed=(1,)))
    proc = _cli("store", "info", str(path), "--json", str(tmp_path / "info.json"))
    assert proc.returncode == 0, proc.stderr
    assert "1 / 6 done" in proc.stdout and "done 9, failed 1" in proc.stdout
    assert _cli("store", "verify", str(path)).returncode == 0
    proc = _cli("store", "stats", str(path), "--json", str(tmp_path / "stats.json"))
    assert proc.returncode == 0, proc.stderr
    import json
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["images_done"] == 9 and stats["bytes_per_image"] > 0 and stats["top1_classes"]
    g = LabelStore.open(path, "r+").group
    idx = g["labels/index"][0:24]
    idx[0, 0, 0] = 999
    g["labels/index"].with_config({"write_empty_chunks": True})[0:24] = idx
    proc = _cli("store", "verify", str(path))
    assert proc.returncode == 1 and "row 0: class index out of range" in proc.stdout


def test_bench_store_small(tmp_path):
    from lt_distill.bench.store import run_store_benchmark

    result = run_store_benchmark(num_shards=2, capacity=16, num_crops=5, topk=4, num_reads=200, workdir=tmp_path)
    assert result["shape"] == {"shards": 2, "images_per_shard": 16, "crops_K": 5, "topk": 4, "classes": 1203}
    assert 0 < result["bytes_per_image"] < 5 * 4 * 4 + 2048   # labels + per-row metadata and chunk indexes
    assert min(result[k] for k in result if k.startswith("read_") and k.endswith("_per_s")) > 0
    # k=4 of a CLIP-like distribution leaves mass behind; KL(renormalised) is -log(1 - residual) >= residual
    assert result["kl_renormalise_mean_nats"] >= result["residual_mass_mean"] > 0
    assert 0 < result["teacher_top1_prob_mean"] <= 1


# ---------------------------------------------------------------------------------------------------- integrity
def _flip_byte(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def _chunk_extent(path, chunks_per_shard: int, chunk: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk ``chunk`` from a shard file's index (Zarr v3 sharding, index at end)."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(chunks_per_shard * 16 + 4):-4], dtype="<u8").reshape(-1, 2)
    return int(index[chunk, 0]), int(index[chunk, 1])


@pytest.mark.parametrize("array", ["labels/index", "labels/prob"])
def test_flipped_byte_in_a_label_chunk_is_refused_by_reader_and_verify(tmp_path, array):
    """Issue 15.1: a damaged label chunk used to read as valid labels and verify said OK."""
    path = tmp_path / "s.zarr"
    store = make_store(path)
    for s in range(3):
        store.write_shard(s, make_result(s, 20))
    shard_file = path / array / "c" / "1" / "0" / "0"
    offset, nbytes = _chunk_extent(shard_file, LAYOUT.shard_capacity // LAYOUT.rows_per_chunk, 1)
    _flip_byte(shard_file, offset + nbytes // 2)          # inside chunk 1 of shard 1 (rows 8-15)
    reader = LabelReader(path)
    reader.labels(1, 0)                                    # other chunks of the shard still read
    reader.labels(2, 9)
    with pytest.raises(StoreError, match=r"shard 1 \(positions 8-15\) is corrupt \(chunk crc32c mismatch\)"):
        reader.labels(1, 9)
    problems = verify_store(path)
    assert problems == [f"{array} shard 1: 1 inner chunk(s) fail their crc32c (first: chunk 1)"], problems
    proc = _cli("store", "verify", str(path))
    assert proc.returncode == 1 and f"{array} shard 1" in proc.stdout


def test_flipped_byte_in_row_metadata_and_shard_index_is_found(tmp_path):
    path = tmp_path / "s.zarr"
    store = make_store(path)
    store.write_shard(0, make_result(0, 20))
    store.write_shard(1, make_result(1, 20))
    _flip_byte(path / "rows" / "hard_label" / "c" / "0", 3)       # inside the only chunk of shard 0
    size = (path / "labels" / "index" / "c" / "1" / "0" / "0").stat().st_size
    _flip_byte(path / "labels" / "index" / "c" / "1" / "0" / "0", size - 10)  # shard 1's index
    problems = verify_store(path)
    assert "rows/hard_label shard 0: 1 inner chunk(s) fail their crc32c (first: chunk 0)" in problems
    assert "labels/index shard 1: shard index is truncated or corrupt (crc32c mismatch)" in problems
    reader = LabelReader(path)
    with pytest.raises(StoreError, match="shard 0: rows/hard_label is corrupt"):
        reader.hard_label(0, 3)
    with pytest.raises(StoreError, match="shard index is corrupt"):
        reader.labels(1, 3)


def test_deleted_label_shard_file_is_refused_by_reader_and_verify(tmp_path):
    """Issue 15.2: a deleted label shard file used to read as all-zero labels marked valid."""
    path = tmp_path / "s.zarr"
    store = make_store(path)
    for s in range(3):
        store.write_shard(s, make_result(s, 20))
    (path / "labels" / "prob" / "c" / "2" / "0" / "0").unlink()
    (path / "rows" / "size" / "c" / "1" / "0").unlink()
    reader = LabelReader(path)
    with pytest.raises(StoreError, match="shard 2 was written but its labels/prob file is missing"):
        reader.labels(2, 0)
    with pytest.raises(StoreError, match="shard 1 was written but its rows/size file is missing"):
        reader.labels(1, 0)
    reader.labels(0, 0)
    problems = verify_store(path)
    assert "labels/prob shard 2: file labels/prob/c/2/0/0 is missing although the shard was written" in problems
    assert "rows/size shard 1: file rows/size/c/1/0 is missing although the shard was written" in problems
    assert damaged_shards(path).keys() == {1, 2}


def test_format_1_and_incomplete_stores_are_refused(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    (path / "rows" / "status" / "zarr.json").unlink()
    with pytest.raises(StoreError, match="incomplete label store .*rows/status is missing"):
        LabelStore.open(path)
    path = tmp_path / "old.zarr"
    make_store(path)
    g = LabelStore.open(path, "r+").group
    attrs = dict(g.attrs)
    attrs["format"] = {"name": "lt-distill-labels", "version": 1}
    g.attrs.put(attrs)
    with pytest.raises(StoreError, match="format version 1 has no per-chunk checksums"):
        LabelReader(path)


def test_object_rows_must_be_full(tmp_path):
    """Issue 10.10: a done object row with fewer than k valid entries is refused."""
    store = make_store(tmp_path / "s.zarr")
    store.create_objects(3, block_size=4)
    k = LAYOUT.topk
    index = np.tile(np.arange(k, dtype=np.int16), (3, 1))
    prob = np.full((3, k), 0.1, np.float16)
    index[1, 2:] = -1
    block = ObjectBlock(ann_ids=np.arange(3), image_ids=np.zeros(3), boxes=np.ones((3, 4)), index=index, prob=prob,
                        status=np.array([1, 1, 2], np.uint8))
    with pytest.raises(StoreError, match="must hold k class indices"):
        store.write_objects_block(0, block)
    block.status[1] = 2
    block.boxes[0, 0] = np.nan
    with pytest.raises(StoreError, match="non-finite box"):
        store.write_objects_block(0, block)
    block.boxes[0, 0] = 1.0
    store.write_objects_block(0, block)
    assert verify_store(tmp_path / "s.zarr") == []


def test_spread_divides_by_the_classes_not_kept():
    """Issue 10.10: a row with 2 valid entries of 4 spreads its residual over C - 2 classes (sum 1)."""
    index = np.array([[3, 7, -1, -1], [1, 2, 4, 5]], np.int16)
    prob = np.array([[0.5, 0.3, 0, 0], [0.4, 0.3, 0.1, 0.1]], np.float16)
    full = decode_topk(index, prob, 10, "spread")
    np.testing.assert_allclose(full.sum(-1), [1.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(full[0, 0], (1 - 0.5 - 0.3) / 8, rtol=1e-3)
    np.testing.assert_allclose(full[1, 0], (1 - 0.9) / 6, rtol=1e-2)
