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
