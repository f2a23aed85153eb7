"""Stage-2 training with online soft labels (``data.soft_labels = "online"``): the tiny random-init CLIP
teacher (``lt-tiny-rn``) scores every batch; no label store exists.

The data is the small synthetic long-tailed set of tests/train_helpers.py (~128 px images).
"""

import json
import math
import tarfile

import numpy as np
import pytest
import torch

from lt_distill.errors import LtDistillError
from lt_distill.pipeline.teacher import TeacherConfig, build_teacher
from lt_distill.pipeline.vocab import load_vocabulary
from lt_distill.stages.train.config import HardLabelConfig, train_config
from lt_distill.stages.train.loop import train
from lt_distill.stages.train.online import build_hard_labeler
from train_helpers import run_config, run_torchrun, small_dataset, train_records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("train_online") / "data")


def _teacher(ds, vocab=None):
    return {"model": "lt-tiny-rn", "random_init": True, "seed": 3, "vocab": str(vocab or ds.categories),
            "templates": "single", "engine": "eager"}


def _config(ds, out, **top):
    hard = {"source": "cls", "class_list": str(ds.class_list), "synset_wnids": str(ds.synset_wnids)}
    return run_config(ds, out, data={"soft_labels": "online", "label_store": ""},
                      **{"teacher": _teacher(ds), "hard_labels": hard, **top})


def _samples(ds):
    for shard in ds.cls_shard_paths:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n[:-4] for n in members if n.endswith(".jpg")):
            yield {"cls": members[name + ".cls"], "json": members[name + ".json"]}


def test_hard_labels_map_each_samples_wnid_to_its_category(dataset):
    vocab = load_vocabulary(str(dataset.categories))
    index_of = {c.wnid: i for i, c in enumerate(vocab.categories)}
    by_cls = build_hard_labeler(HardLabelConfig("cls", str(dataset.class_list), str(dataset.synset_wnids)), vocab)
    by_json = build_hard_labeler(HardLabelConfig("json:wnid", synset_wnids=str(dataset.synset_wnids)), vocab)
    seen = 0
    for fields in _samples(dataset):
        expected = index_of[json.loads(fields["json"])["wnid"]]
        assert by_cls(fields) == (expected, 0) and by_json(fields) == (expected, 0)
        seen += 1
    assert seen == 16
    with pytest.raises(Exception, match="bogus"):
        train_config(None, ["hard_labels.source=bogus"])


def test_online_run_scores_both_sources_without_a_store(dataset, tmp_path):
    cfg = train_config(None, base=_config(dataset, tmp_path / "run"))
    steps = []
    result = train(cfg, on_step=lambda it, v: steps.append(v))
    assert len(steps) == 6 and all(math.isfinite(v) for s in steps for v in s.values())
    records = train_records(tmp_path / "run")
    assert [r["source"] for r in records] == ["detection", "classification"] * 3
    for r in records:
        assert r["loss_semantic"] > 0 and math.isfinite(r["loss"]), r  # every batch had teacher soft labels
        assert r["label_time"] > 0
    # The language classifier is the teacher's class text embeddings.
    teacher = build_teacher(TeacherConfig(**_teacher(dataset), device="cpu"))
    assert torch.allclose(result.model.text_embeddings.cpu(), teacher.text_embeddings.cpu())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["soft_labels"] == "online" and saved["teacher"]["model"] == "lt-tiny-rn"


def test_online_run_refuses_another_vocabulary_before_any_step(dataset, tmp_path):
    cats = json.loads(dataset.categories.read_text())
    renamed = [dict(c) for c in cats]
    renamed[2]["name"] = "purple_thing"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    (tmp_path / "short.json").write_text(json.dumps(cats[:-1]))
    steps = []
    for vocab, message in ((tmp_path / "renamed.json", f"class 2: teacher 'purple_thing', detection "
                                                       f"'{cats[2]['name']}'"),
                           (tmp_path / "short.json", f"5 teacher classes vs 6 detection categories \\(first extra "
                                                     f"detection class 5: '{cats[5]['name']}'\\)")):
        cfg = train_config(None, base=_config(dataset, tmp_path / "run", teacher=_teacher(dataset, vocab)))
        with pytest.raises(LtDistillError, match=message) as err:
            train(cfg, on_step=lambda it, v: steps.append(it))
        assert "teacher.vocab" in str(err.value)
    assert not steps and not (tmp_path / "run" / "checkpoints").exists()


def test_online_resume_continues_exactly(dataset, tmp_path):
    full = train_config(None, base=_config(dataset, tmp_path / "full", max_iters=4, checkpoint_every=2))
    train(full)
    part = _config(dataset, tmp_path / "part", max_iters=2, checkpoint_every=2)
    train(train_config(None, base=part))
    train(train_config(None, base={**part, "max_iters": 4}), resume=True)
    ref, got = train_records(tmp_path / "full"), train_records(tmp_path / "part")
    assert [r["iter"] for r in got] == [1, 2, 3, 4]
    keys = [k for k in ref[0] if k.startswith("loss") or k == "grad_norm"]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]
    a = torch.load(tmp_path / "full" / "model_final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "model_final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A different teacher is a different run: resuming with it is refused, naming the field.
    other = {**part, "max_iters": 6, "teacher": {**part["teacher"], "seed": 4}}
    with pytest.raises(LtDistillError, match="teacher.seed: checkpoint 3, config 4"):
        train(train_config(None, base=other), resume=True)
    assert np.isfinite([r["loss"] for r in got]).all()


@pytest.mark.slow
def test_online_run_under_torchrun_two_gloo_processes(dataset, tmp_path):
    base = _config(dataset, tmp_path / "ddp", max_iters=4, checkpoint_every=4)
    r0, r1 = run_torchrun(base, tmp_path)
    # Each rank scored and trained on its own images, and every step applied the same averaged gradient.
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"]))
    assert all(torch.equal(t, r1["state"][name]) for name, t in r0["state"].items())
    records = train_records(tmp_path / "ddp")
    assert [r["iter"] for r in records] == [1, 2, 3, 4] and all(r["loss_semantic"] > 0 for r in records)
