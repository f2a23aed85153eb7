"""`lt-distill export` and `lt-distill bench model` from the command line."""

import json

import pytest
import torch

from lt_distill.bench.model import _Clock, run_model_bench, timed_msda
from lt_distill.cli import main
from lt_distill.cuda_ops import MSDeformAttn
from lt_distill.pipeline.model import build_model, model_config, save_checkpoint


def test_export_command(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model, _, _ = build_model(cfg, torch.randn(3, 16))
    save_checkpoint(tmp_path / "ckpt.pth", model, cfg)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "ckpt.pth"), str(tmp_path / "model.pth")])
    assert exc.value.code == 0
    semantic = [k for k in model.state_dict() if k.startswith("semantic_head.")]
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert semantic and f"dropped {len(semantic)} semantic-branch tensors" in printed
    exported = torch.load(tmp_path / "model.pth", weights_only=True)
    assert not any(k.startswith("semantic_head.") for k in exported["model"])


def test_export_command_reports_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "nope.pth"), str(tmp_path / "out.pth")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint not found")


def test_timed_msda_matches_the_op_and_its_gradients():
    torch.manual_seed(0)
    layer = MSDeformAttn(16, 2, 2, 2)
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    query, feats = torch.randn(1, 5, 16, requires_grad=True), torch.randn(1, 20, 16, requires_grad=True)
    refs = torch.rand(1, 5, 2, 2)
    plain = layer(query, refs, feats, shapes, starts)
    plain.square().sum().backward()
    expected = (plain.detach(), query.grad.clone(), feats.grad.clone())
    query.grad = feats.grad = None
    clock = _Clock()
    with timed_msda(clock):
        timed = layer(query, refs, feats, shapes, starts)
        timed.square().sum().backward()
    torch.testing.assert_close((timed.detach(), query.grad, feats.grad), expected)
    assert clock.calls == 1 and clock.forward > 0 and clock.backward > 0


def test_bench_model_runs_and_reports(tmp_path, capsys):
    torch.manual_seed(0)
    result = run_model_bench("tiny", batch=1, image_size=128, num_classes=20, steps=1, warmup=0)
    assert 0 < result["msda_share"] < 1
    assert result["shapes"]["encoder_tokens"] == 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2
    assert result["shapes"]["msda_calls_per_step"] == 4  # 2 encoder + 2 decoder layers
    with pytest.raises(SystemExit) as exc:
        main(["bench", "model", "--image-size", "128", "--classes", "20", "--steps", "1", "--warmup", "0",
              "--batch", "1", "--json", str(tmp_path / "b.json")])
    assert exc.value.code == 0
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["step_ms_per_image"] > out["msda_forward_ms_per_image"] + out["msda_backward_ms_per_image"]
    assert "MSDeformAttn op" in capsys.readouterr().out
