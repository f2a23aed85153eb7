"""`lt-distill bench precompute` runs end to end on small generated shards and reports every figure."""

import json

import pytest

from lt_distill.cli import main


@pytest.mark.slow
def test_bench_precompute_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "precompute", "--shards", "2", "--images-per-shard", "4", "--grid", "coarse", "--workers", "1",
              "--batch-size", "4", "--engines", "eager,tensorrt", "--repeats", "1", "--json", str(out)])
    assert exit_info.value.code == 0
    results = json.loads(out.read_text())
    for mode in ("crops", "pooled"):
        r = results["modes"][mode]
        rates = r["rates_images_per_s"]
        assert set(rates) == {"decode", "teacher", "write", "job"} and min(rates.values()) > 0
        assert r["bound_shared_cores"] <= min(rates["decode"], rates["teacher"], rates["write"])
        assert r["efficiency"] == pytest.approx(rates["job"] / r[f"bound_{r['bound_used']}"])
    assert results["crops_over_pooled_teacher_cost"] > 0
    assert results["engines"]["eager"]["available"] and results["engines"]["eager"]["images_per_s"] > 0
    trt = results["engines"]["tensorrt"]
    assert trt["available"] or trt["reason"]  # unavailable engines say why
    assert "teacher images/s per engine" in capsys.readouterr().out


def test_bench_precompute_teacher_families():
    from lt_distill.bench.precompute import _teacher_config
    from lt_distill.errors import ConfigError

    clip = _teacher_config("clip", "lt-tiny-rn", "cpu")
    assert (clip.family, clip.model, clip.random_init) == ("clip", "lt-tiny-rn", True)
    real = _teacher_config("classifier", "", "cpu")  # real packaged weights, its own label space
    assert real.family == "classifier" and not real.random_init and real.weights is None
    assert real.model == "efficientnet-lite0" and real.vocab == "imagenet-1k"
    with pytest.raises(ConfigError, match="not one of"):
        _teacher_config("vit", "", "cpu")
