"""`lt-distill shards`: round trips from class folders and a Detic-style JSON, resume after kill -9, and the
manifest feeding precompute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lt_distill.pipeline.data import check_label_store
from lt_distill.pipeline.shards import expand_shards, iter_tar_samples
from lt_distill.pipeline.teacher import TeacherConfig
from lt_distill.pipeline.vocab import load_class_list, load_synset_wnids, load_vocabulary
from lt_distill.stages import precompute as precompute_stage
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute
from lt_distill.stages.shards import ShardsConfig, make_shards, manifest_counts
from lt_distill.store import LabelReader, LabelStore, StoreError, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import jpeg, photo  # noqa: E402

WINTER = "imagenet21k-winter21"
DOG, ZEBRA, ENTITY = "n02084071", "n02391049", "n00004475"


def _png(image: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _folder_tree(root: Path) -> dict[str, tuple[bytes, str]]:
    """train/<wnid>/<wnid>_<n>.JPEG for three wnids (one PNG among them) and one corrupt file.
    Returns key -> (bytes, wnid) of the good files."""
    files = {}
    src = photo("astronaut")
    for w, wnid in enumerate((DOG, ZEBRA, ENTITY)):
        for n in range(4):
            key = f"{wnid}_{100 + n}"
            crop = src[40 * n:40 * n + 96 + w, 30 * w:30 * w + 80]
            data = _png(crop) if (w, n) == (1, 2) else jpeg(crop)
            path = root / "train" / wnid / f"{key}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[key] = (data, wnid)
    (root / "train" / DOG / f"{DOG}_999.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return files


def _read_all(manifest: dict) -> dict[str, dict[str, bytes]]:
    samples = {}
    for url in expand_shards(manifest["pattern"]):
        for s in iter_tar_samples(url):
            assert s.key not in samples and s.error is None
            samples[s.key] = s.fields
    return samples


def test_folder_tree_round_trip(tmp_path):
    files = _folder_tree(tmp_path / "in21k")
    cfg = ShardsConfig(input=str(tmp_path / "in21k"), out=str(tmp_path / "out"), class_list=WINTER, shard_size=5,
                       workers=2, progress=False)
    manifest = make_shards(cfg, log=lambda _m: None)
    winter = load_class_list(WINTER)
    samples = _read_all(manifest)
    assert sorted(samples) == sorted(files)
    for key, (data, wnid) in files.items():
        ext = "png" if data.startswith(b"\x89PNG") else "jpg"
        assert samples[key][ext] == data  # the file's own bytes
        assert int(samples[key]["cls"]) == winter.index(wnid)
        meta = json.loads(samples[key]["json"])
        assert meta["wnid"] == wnid and meta["source"] == f"train/{wnid}/{key}.JPEG"
    counts = [s["samples"] for s in manifest["shards"]]
    assert manifest["num_shards"] == 3 and sum(counts) == 12 and counts[2] <= 3  # 13 files in 5 + 5 + 3, one bad
    hist = {}
    for s in manifest["shards"]:
        for w, n in s["classes"].items():
            hist[w] = hist.get(w, 0) + n
    assert hist == {DOG: 4, ZEBRA: 4, ENTITY: 4}
    assert manifest["num_bad"] == 1 and manifest["bad"][0]["source"] == f"train/{DOG}/{DOG}_999.JPEG"
    assert manifest["class_list"] == WINTER
    assert manifest_counts(expand_shards(manifest["pattern"])) == counts
    # a shard changed since the manifest was written is not trusted
    first = expand_shards(manifest["pattern"])[0]
    with open(first, "ab") as f:
        f.write(b"\0" * 512)
    assert manifest_counts(expand_shards(manifest["pattern"])) is None


def test_detic_json_round_trip(tmp_path):
    lvis = load_vocabulary("lvis-v1")
    dog_id = lvis.categories[lvis.names.index("dog")].id
    zebra_id = lvis.categories[lvis.names.index("zebra")].id
    root = tmp_path / "ImageNet-LVIS"
    images, files = [], {}
    for i, (rel, cat) in enumerate([(f"{DOG}/{DOG}_1.JPEG", dog_id), (f"{ZEBRA}/{ZEBRA}_7.JPEG", zebra_id),
                                    ("misc/photo_3.jpg", zebra_id)]):
        data = jpeg(photo("coffee")[:64 + i, :80])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        images.append({"id": 10 + i, "file_name": rel, "pos_category_ids": [cat], "width": 80, "height": 64 + i})
        files[Path(rel).stem] = (data, 10 + i, cat)
    images.append({"id": 99, "file_name": f"{DOG}/{DOG}_404.JPEG", "pos_category_ids": [dog_id]})  # absent file
    info = tmp_path / "annotations" / "imagenet_lvis_image_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"images": images, "categories": [{"id": c.id, "name": c.name, "synset": c.synset}
                                                                   for c in lvis.categories], "annotations": []}))
    cfg = ShardsConfig(input=str(info), out=str(tmp_path / "out"), kind="detic", image_root=str(root),
                       class_list=WINTER, shard_size=2, workers=1, progress=False)
    manifest = make_shards(cfg, log=lambda _m: None)
    samples = _read_all(manifest)
    assert sorted(samples) == sorted(files)
    winter = load_class_list(WINTER)
    zebra_wnid = load_synset_wnids()[lvis.categories[lvis.names.index("zebra")].synset]
    for key, (data, image_id, cat) in files.items():
        meta = json.loads(samples[key]["json"])
        assert samples[key]["jpg"] == data and meta["image_id"] == image_id and meta["pos_category_ids"] == [cat]
        wnid = key.split("_")[0] if key.startswith("n") else zebra_wnid  # no wnid in the name: the category's
        assert meta["wnid"] == wnid and int(samples[key]["cls"]) == winter.index(wnid)
    assert [b["source"] for b in manifest["bad"]] == [f"{DOG}/{DOG}_404.JPEG"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lt_distill.cli", "shards", *args]


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_shards(tmp_path):
    src = tmp_path / "in21k"
    rng = np.random.default_rng(0)
    for n in range(240):  # many one-image shards, so that the kill lands mid-job
        wnid = (DOG, ZEBRA)[n % 2]
        path = src / wnid / f"{wnid}_{n}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), quality=95))
    args = [str(src), "--class-list", WINTER, "--shard-size", "1", "--workers", "1", "--no-progress"]
    ref = subprocess.run(_cli(*args, "--out", str(tmp_path / "ref")), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(*args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("shard-*.tar"))) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("shard-*.tar")))
    assert 5 <= done_before < 240 and not (out / "manifest.json").exists(), "the kill came too late to test resume"
    rerun = subprocess.run(_cli(*args, "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} already done" in rerun.stdout
    ref_files = sorted(p.name for p in (tmp_path / "ref").glob("shard-*.tar"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ref_files and len(ref_files) == 240
    for name in ref_files:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not list(out.glob("*.partial"))
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "ref"))
    assert a["shards"] == b["shards"] and a["num_samples"] == 240


def test_manifest_feeds_precompute(tmp_path, monkeypatch):
    _folder_tree(tmp_path / "in21k")
    manifest = make_shards(ShardsConfig(input=str(tmp_path / "in21k"), out=str(tmp_path / "shards"),
                                        class_list=WINTER, shard_size=5, workers=1, progress=False),
                           log=lambda _m: None)

    def no_counting(url):
        raise AssertionError(f"precompute counted {url} although the manifest lists it")

    monkeypatch.setattr(precompute_stage, "count_samples", no_counting)
    cfg = PrecomputeConfig(store=str(tmp_path / "store"), shards=manifest["pattern"], grid="whole", topk=4,
                           class_list=WINTER, workers=0, batch_size=8, progress=False,
                           teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"))
    summary = run_precompute(cfg, log=lambda _m: None)
    store = LabelStore.open(tmp_path / "store")
    assert store.layout.shard_capacity == 16  # the largest count (<= 5) rounded up to 16
    assert summary["classification"]["images_done"] == 12 and verify_store(tmp_path / "store") == []
    lvis = load_vocabulary("lvis-v1")
    keys = list(store.group["rows/key"][:])
    hard = store.group["rows/hard_label"][:]
    for row, key in enumerate(keys):
        if key.startswith(DOG):
            assert hard[row] == lvis.names.index("dog")
        elif key.startswith(ZEBRA):
            assert hard[row] == lvis.names.index("zebra")
    # training refuses the store under another class list (store_check.class_list)
    reader = LabelReader(tmp_path / "store")
    check_label_store(reader, class_list=WINTER)
    with pytest.raises(StoreError, match="precompute.class_list_sha256"):
        check_label_store(reader, class_list="imagenet21k-fall11")
