"""Class text embeddings computed once: the disk cache, and a second precompute run that encodes nothing."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lt_distill.pipeline.teacher import TeacherConfig, build_teacher
from lt_distill.pipeline.teacher import model as teacher_model
from lt_distill.pipeline.teacher.textcache import resolve_text_cache, text_cache_key
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import make_shards, store_arrays  # noqa: E402


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts every text encoding (the spy wraps the real function)."""
    calls = []
    real = teacher_model.encode_class_texts

    def spy(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(teacher_model, "encode_class_texts", spy)
    return calls


def _cfg(tmp_path, **kw) -> TeacherConfig:
    args = {"model": "lt-tiny-rn", "random_init": True, "templates": "single", "text_cache": str(tmp_path / "text")}
    return TeacherConfig(**{**args, **kw})


def test_cache_hits_are_bit_exact_and_the_key_sees_every_input(tmp_path, encode_calls):
    first = build_teacher(_cfg(tmp_path))
    second = build_teacher(_cfg(tmp_path))
    assert encode_calls == [1203] and not first.text_from_cache and second.text_from_cache
    assert torch.equal(first.text_embeddings, second.text_embeddings)
    assert first.fingerprint == second.fingerprint
    # other templates, synonyms, or weights: another entry
    build_teacher(_cfg(tmp_path, templates="a {}"))
    build_teacher(_cfg(tmp_path, synonyms=True))
    build_teacher(_cfg(tmp_path, seed=1))
    assert len(encode_calls) == 4
    # "off" never reads or writes
    off = build_teacher(TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single", text_cache="off"))
    assert not off.text_from_cache and len(encode_calls) == 5 and torch.equal(off.text_embeddings, first.text_embeddings)


def test_a_damaged_entry_is_computed_again(tmp_path, encode_calls):
    teacher = build_teacher(_cfg(tmp_path))
    entries = list((tmp_path / "text").glob("*.npy"))
    assert len(entries) == 1
    entries[0].write_bytes(b"not an npy file")
    again = build_teacher(_cfg(tmp_path))
    assert len(encode_calls) == 2 and not again.text_from_cache
    assert torch.equal(again.text_embeddings, teacher.text_embeddings)
    assert build_teacher(_cfg(tmp_path)).text_from_cache  # rewritten


def test_key_and_folder():
    base = dict(model="RN50", weights_id="abc", prompts=[["a dog"], ["a cat"]], precision="fp32",
                device=torch.device("cpu"))
    key = text_cache_key(**base)
    assert key["sha256"] == text_cache_key(**base)["sha256"]
    for change in ({"prompts": [["a dog"], ["a cat."]]}, {"precision": "fp16"}, {"weights_id": "abd"},
                   {"device": torch.device("meta")}):
        assert text_cache_key(**{**base, **change})["sha256"] != key["sha256"], change
    assert resolve_text_cache("", "/x/engines") == Path("/x/engines/text")
    assert resolve_text_cache("off", "/x/engines") is None and resolve_text_cache("/t", None) == Path("/t")


def test_second_precompute_run_encodes_no_text(tmp_path, encode_calls):
    pattern = make_shards(tmp_path / "shards", num_shards=2, per_shard=3)
    runs = []
    for name in ("a", "b"):
        cfg = PrecomputeConfig(store=str(tmp_path / name), shards=pattern, labels="none", grid="whole", topk=4,
                               workers=0, progress=False, teacher=_cfg(tmp_path))
        runs.append(run_precompute(cfg, log=lambda _m: None))
    assert encode_calls == [1203]  # the second store (a fresh job) read the first job's embeddings
    a, b = store_arrays(tmp_path / "a"), store_arrays(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
