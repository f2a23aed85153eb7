"""Shared test fixtures. Tests never read ../shared: they make their own data."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The helper modules next to the tests (train_helpers, precompute_helpers, ...) import by name under
# --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))

# Two cores: keep every test single-threaded unless it says otherwise, so parallel helpers don't fight.
torch.set_num_threads(int(os.environ.get("LT_DISTILL_TEST_THREADS", "2")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Engine and text-embedding caches (XDG_CACHE_HOME/lt-distill) in a folder of this session, not ~/.cache:
    a test never reads what another run (or another checkout) left there. Subprocesses inherit it."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """(dataset, store): the small synthetic dataset of train_helpers and a store of random labels for it."""
    from train_helpers import small_dataset, write_random_store

    root = tmp_path_factory.mktemp("run_data")
    ds = small_dataset(root / "data")
    return ds, write_random_store(root / "store.zarr", ds)
