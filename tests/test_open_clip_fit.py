"""Fitting the open_clip ecosystem: --pretrained tags, the workers default, the online example config, and
importing the training data pipeline without open_clip."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lt_distill.pipeline.teacher import TeacherConfig, TeacherError, build_teacher
from lt_distill.pipeline.teacher.pretrained import resolve_pretrained
from lt_distill.workers import available_cpus, default_workers

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_tag_not_cached_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    (tmp_path / "s.tar").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "lt_distill.cli", "precompute", "--store", str(tmp_path / "store"),
                           "--shards", str(tmp_path / "s.tar"), "--labels", "none", "--model", "RN50",
                           "--pretrained", "openai", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: open_clip weights RN50/openai are not "
                                                                     "in the local cache (HF_HUB_OFFLINE is set")
    assert "--weights FILE" in proc.stderr and not (tmp_path / "store").exists()


def test_pretrained_unknown_tag_and_conflicts():
    with pytest.raises(TeacherError, match=r"no pretrained tag 'nope' for 'RN50' \(its tags: openai, yfcc15m"):
        resolve_pretrained("RN50", "nope")
    with pytest.raises(TeacherError, match="no pretrained tag 'openai' for 'lt-tiny-rn' .it has no pretrained tags"):
        resolve_pretrained("lt-tiny-rn", "openai")
    with pytest.raises(TeacherError, match="give one of --pretrained TAG, --weights FILE or --random-init"):
        build_teacher(TeacherConfig(model="RN50", pretrained="openai", random_init=True))


def test_workers_default_follows_the_cpus(monkeypatch):
    for cpus, expected in ((1, 0), (2, 1), (3, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert available_cpus() == cpus and default_workers() == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: the CPUs are shared by the node's ranks
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert default_workers() == 3
    from lt_distill.stages.precompute import PrecomputeConfig

    assert PrecomputeConfig(store="s", shards="x").workers == 3


def test_online_example_config_is_a_valid_train_config():
    from lt_distill.stages.train.config import train_config

    path = ROOT / "configs" / "lvis_dino_r50_1x_online.toml"
    raw = tomllib.loads(path.read_text())
    cfg = train_config(path)
    assert cfg.data_config().soft_labels == "online" and raw["data"]["soft_labels"] == "online"
    assert cfg.teacher.pretrained == "openai" and cfg.teacher.model == "RN50"
    assert cfg.hard_labels.class_list == "imagenet21k-winter21"


def test_importing_the_data_pipeline_does_not_import_open_clip():
    code = ("import sys, lt_distill.pipeline.data, lt_distill.pipeline.shards, lt_distill.pipeline.vocab; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'open_clip' or m.startswith("
            "'lt_distill.pipeline.teacher')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
