"""WebDataset shard reading (pipeline/shards): patterns, damaged tars, decoding, the worker dataset."""

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lt_distill.pipeline.shards import (
    ShardChunks,
    ShardError,
    count_samples,
    decode_sample,
    expand_shards,
    iter_tar_samples,
)
from lt_distill.pipeline.teacher import GridCrops
from lt_distill.pipeline.vocab import HardLabeler, LabelSource, WnidMapper, load_vocabulary
from lt_distill.store import REASON_CODES

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import jpeg, make_shards, photo, write_tar  # noqa: E402


@pytest.fixture(scope="module")
def labeler():
    vocab = load_vocabulary("lvis-v1")
    return HardLabeler(LabelSource.parse("cls"), WnidMapper(vocab), ["n02084071", "n02391049"])


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"a-{i:03d}.tar").write_bytes(b"")
    urls = expand_shards(str(tmp_path / "a-{000..002}.tar"))
    assert urls == [str(tmp_path / f"a-{i:03d}.tar") for i in range(3)]
    both = expand_shards(f"{tmp_path}/a-000.tar::{tmp_path}/a-{{001..002}}.tar")
    assert both == urls
    with pytest.raises(ShardError, match="1 of 4 shard files do not exist.*a-003.tar"):
        expand_shards(str(tmp_path / "a-{000..003}.tar"))
    with pytest.raises(ShardError, match="no shard pattern"):
        expand_shards("  ")
    with pytest.raises(ShardError, match="more than once"):
        expand_shards(f"{tmp_path}/a-000.tar::{tmp_path}/a-000.tar")
    assert expand_shards("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]  # not checked


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_iter_tar_samples_groups_by_key(tmp_path):
    write_tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.cls", b"2"), ("__meta__", b"m"), ("dir/b.seg.png", b"3"),
                                   ("dir/b.JSON", b"{}"), ("c.jpg", b"4")])
    samples = list(iter_tar_samples(str(tmp_path / "s.tar")))
    assert [s.key for s in samples] == ["a", "dir/b", "c"]
    assert samples[0].fields == {"jpg": b"1", "cls": b"2"}
    assert samples[1].fields == {"seg.png": b"3", "json": b"{}"}
    assert all(s.error is None for s in samples)
    assert count_samples(str(tmp_path / "s.tar")) == 3


def test_truncated_member_and_garbage(tmp_path):
    raw = _tar_bytes([("a.jpg", b"x" * 3000), ("a.cls", b"1"), ("b.jpg", b"y" * 5000), ("b.cls", b"2")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: 512 * 9 + 512 + 1000])  # ends inside b.jpg's data
    notes = []
    samples = list(iter_tar_samples(str(cut), notes))
    assert [(s.key, s.error) for s in samples] == [("a", None), ("b", "truncated")]
    assert len(notes) == 1 and "b.jpg is cut short" in notes[0]
    assert count_samples(str(cut)) == 2
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 50)
    notes = []
    assert list(iter_tar_samples(str(junk), notes)) == [] and "not a readable tar" in notes[0]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    notes = []
    assert list(iter_tar_samples(str(empty), notes)) == [] and count_samples(str(empty)) == 0


def test_decode_sample_reasons(tmp_path, labeler):
    from lt_distill.pipeline.shards import RawSample

    good = jpeg(photo("coffee")[:100, :120])
    image, size, label, reason = decode_sample(RawSample("k", {"jpg": good, "cls": b"1"}), labeler)
    assert reason == 0 and size == (100, 120) and image.shape == (100, 120, 3) and label >= 0
    cases = {
        "truncated": RawSample("k", {"jpg": good}, "truncated"),
        "undecodable": RawSample("k", {"jpg": b"\xff\xd8garbage", "cls": b"0"}),
        "missing_label": RawSample("k", {"jpg": good}),
        "unparsable_label": RawSample("k", {"jpg": good, "cls": b"x"}),
        "unknown_label": RawSample("k", {"jpg": good, "cls": b"7"}),
        "too_small": RawSample("k", {"png": _png(4, 30), "cls": b"0"}),
    }
    for name, raw in cases.items():
        assert decode_sample(raw, labeler)[3] == REASON_CODES[name], name
    assert decode_sample(RawSample("k", {"cls": b"0"}), labeler)[3] == REASON_CODES["undecodable"]  # no image


def _png(h, w):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_chunks_workers_take_whole_shards(tmp_path, labeler, workers):
    pattern = make_shards(tmp_path, num_shards=3, per_shard=5, class_indices=[0, 1])
    urls = expand_shards(pattern)
    boxes = np.array([[0, 0, 1, 1.0], [0, 0, 0.5, 0.5]])
    ds = ShardChunks(list(enumerate(urls)), labeler, GridCrops(boxes, 16), (3, 16, 16), chunk_size=2)
    chunks = list(DataLoader(ds, batch_size=None, num_workers=workers))
    by_shard = {}
    for c in chunks:
        by_shard.setdefault(c.shard, []).append(c)
    assert sorted(by_shard) == [0, 1, 2]
    for s, cs in by_shard.items():
        assert [c.end for c in cs] == [False, False, True]
        assert cs[-1].num_samples == 5
        positions = torch.cat([c.positions for c in cs]).tolist()
        assert positions == list(range(5))
        assert [k for c in cs for k in c.keys] == [f"s{s:03d}_{i:04d}" for i in range(5)]
        inputs = torch.cat([c.inputs for c in cs])
        assert inputs.shape == (10, 3, 16, 16) and inputs.dtype == torch.uint8
        assert all(bool(c.ok.all()) for c in cs)
