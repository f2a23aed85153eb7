"""Long-tail methods as plug-ins: every registered method builds, trains a step, checkpoints and evaluates
through the shared code; method-specific properties live in tests/test_method_<name>.py."""

import sys
from pathlib import Path

import pytest
import torch

from lt_distill.config import to_dict
from lt_distill.errors import ConfigError
from lt_distill.pipeline.methods import METHODS, build_method
from lt_distill.pipeline.model import build_model, load_model, model_config
from lt_distill.pipeline.report import plot_comparison, write_comparison
from lt_distill.stages.train.config import train_config

sys.path.insert(0, str(Path(__file__).parent))
from test_model import C, E, batch, make_targets  # noqa: E402


def _tiny(method_name, options=None):
    torch.manual_seed(0)
    method = build_method(method_name, options)
    cfg = model_config("tiny", method.model_overrides())
    model, criterion, post = build_model(cfg, torch.randn(C, E), torch.arange(1, C + 1), method=method)
    return method, cfg, model, criterion, post


def test_unknown_method_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(ConfigError, match="method_options"):
        train_config(None, ["method=richsem", "method_options.stage=classifier"])


def test_method_overrides_land_in_the_resolved_config_and_beat_the_run_sections():
    cfg = train_config(None, ["method=baseline", "model.head.semantic_branch=true"])
    assert cfg.model_config().head.semantic_branch is False  # the method defines it
    resolved = cfg.resolved()
    assert resolved["method"] == "baseline" and resolved["model"]["head"]["semantic_branch"] is False
    assert train_config(None, []).model_config().head.semantic_branch is True  # richsem is the default


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_step_and_reloads_for_eval(name, tmp_path):
    method, cfg, model, criterion, post = _tiny(name)
    method.prepare_model(model)
    g = torch.Generator().manual_seed(1)
    images, mask = batch(g)
    targets = make_targets(g)
    model.train()
    out = model(images, mask, targets)
    losses = criterion(out, targets)
    assert set(losses) <= set(criterion.weight_dict)
    total = criterion.weighted_total(losses)
    assert torch.isfinite(total)
    total.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    # A checkpoint whose config names the method rebuilds the same detector (extensions included), and
    # the post-processor scores it the same way as the live model.
    torch.save({"model": model.state_dict(), "config": {"model": to_dict(cfg), "method": name,
                                                        "method_options": to_dict(method.options)}},
               tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    model.eval()
    with torch.no_grad():
        a, b = model(images, mask), loaded(images, mask)
    sizes = torch.tensor([[480, 640], [480, 640]])
    for da, db in zip(post(a, sizes), post(b, sizes)):
        torch.testing.assert_close(da["scores"], db["scores"])
        torch.testing.assert_close(da["boxes"], db["boxes"])


def test_baseline_has_no_semantic_branch_and_no_soft_loss():
    _, _, model, criterion, _ = _tiny("baseline")
    assert model.semantic_head is None
    g = torch.Generator().manual_seed(2)
    images, mask = batch(g)
    targets = make_targets(g)
    model.train()
    losses = criterion(model(images, mask, targets), targets)
    assert not any(k.startswith("loss_semantic") for k in losses)
    assert "loss_ce" in losses


def test_comparison_plot_and_table(tmp_path):
    import json

    runs = {}
    for i, name in enumerate(("a", "b", "c")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"method": "baseline" if name == "b" else "richsem"}))
        (run / "eval.json").write_text(json.dumps({"metrics": {"AP": 0.1 * i, "APr": -1.0, "APc": 0.2, "APf": 0.3}}))
        runs[name] = run
    path = write_comparison(list(runs.values()), tmp_path / "cmp" / "compare.png")
    assert path.is_file() and path.stat().st_size > 1000
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(table) == ["a (richsem)", "b (baseline)", "c (richsem)"]
    assert table["c (richsem)"]["AP"] == pytest.approx(0.2) and table["a (richsem)"]["APr"] == -1.0
    with pytest.raises(Exception, match="no runs"):
        plot_comparison({}, tmp_path / "x.png")


def test_resume_refuses_another_method_or_other_method_options(tmp_path):
    from lt_distill.errors import LtDistillError
    from lt_distill.stages.train.checkpoint import save_training_checkpoint
    from lt_distill.stages.train.loop import _checkpoint_to_resume

    saved = train_config(None, [f"output_dir={tmp_path}", "method=bacl"])
    save_training_checkpoint(tmp_path, {"model": {}, "config": saved.resolved(), "iteration": 3, "optimizer": {},
                                        "scheduler": {}})
    same = train_config(None, [f"output_dir={tmp_path}", "method=bacl"])
    assert _checkpoint_to_resume(same, same.resolved(), resume=True)[0]["iteration"] == 3
    for sets, needle in ((["method=richsem"], "method: checkpoint 'bacl', config 'richsem'"),
                         (["method=bacl", "method_options.fcbl_alpha=0.5"], "method_options.fcbl_alpha")):
        other = train_config(None, [f"output_dir={tmp_path}", *sets])
        with pytest.raises(LtDistillError, match=needle):
            _checkpoint_to_resume(other, other.resolved(), resume=True)
