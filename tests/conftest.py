"""Shared test fixtures. Tests never read ../shared: they make their own data."""

import os

import numpy as np
import pytest
import torch

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
