"""precompute under faults and torchrun: kill -9 then rerun, and 2 gloo ranks, each give a store identical,
array by array, to one uninterrupted single-process run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lt_distill.store import LabelStore, StoreError, verify_store

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import TINY, make_shards, store_arrays  # noqa: E402

pytestmark = pytest.mark.slow
NUM_SHARDS = 10


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # same thread count everywhere (torchrun sets 1 per rank too)
    env.pop("WORLD_SIZE", None)
    return env


def _args(pattern: str, store: Path) -> list[str]:
    return ["precompute", "--store", str(store), "--shards", pattern, *TINY, "--labels", "none",
            "--grid", "default", "--batch-size", "4", "--workers", "1"]


def _cli(pattern: str, store: Path) -> list[str]:
    return [sys.executable, "-m", "lt_distill.cli", *_args(pattern, store)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    pattern = make_shards(root / "shards", num_shards=NUM_SHARDS, per_shard=6, seed=3)
    proc = subprocess.run(_cli(pattern, root / "reference"), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert verify_store(root / "reference") == []
    return root, pattern, store_arrays(root / "reference")


def _assert_identical(reference: dict[str, np.ndarray], path: Path) -> None:
    arrays = store_arrays(path)
    assert sorted(arrays) == sorted(reference)
    for name, ref in reference.items():
        np.testing.assert_array_equal(arrays[name], ref, err_msg=name)


def _shards_done(path: Path) -> int:
    try:
        return int(LabelStore.open(path).shards_done().sum())
    except (StoreError, KeyError, FileNotFoundError, ValueError):
        return 0  # not created yet, or being created


def test_kill_9_then_rerun_gives_an_identical_store(reference, tmp_path):
    root, pattern, ref = reference
    store = tmp_path / "killed"
    proc = subprocess.Popen(_cli(pattern, store), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while _shards_done(store) < 1:
            assert proc.poll() is None, f"job ended before it could be killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_at_kill = _shards_done(store)
    assert 1 <= done_at_kill < NUM_SHARDS, "the kill did not land in the middle of the job"
    rerun = subprocess.run(_cli(pattern, store), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_at_kill} already done, {NUM_SHARDS - done_at_kill} to label" in rerun.stdout
    assert verify_store(store) == []
    _assert_identical(ref, store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_give_an_identical_store(reference, tmp_path):
    root, pattern, ref = reference
    store = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "lt_distill.cli", *_args(pattern, store),
           "--summary-json", str(tmp_path / "summary.json")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_identical(ref, store)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["classification"]["shards"] == NUM_SHARDS and summary["classification"]["images_done"] == 60
