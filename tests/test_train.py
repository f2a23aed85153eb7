"""Stage-2 training: config, optimizer groups, checkpoints, and real short runs on CPU.

The runs use tests/train_helpers.py: a small synthetic long-tailed dataset plus a label store with random
labels (the ``run_data`` fixture), a few iterations of the tiny detector at ~128 px.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from lt_distill.pipeline.model import build_model, model_config
from lt_distill.stages.train.checkpoint import load_finetune_weights, rng_state, set_rng_state
from lt_distill.stages.train.config import OptimConfig, train_config
from lt_distill.stages.train.optim import build_optimizer, lr_factor
from lt_distill.store import StoreMismatchError
from train_helpers import run_config, run_killable, run_torchrun, train_records, write_random_store

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ units
def test_presets_are_overrides_and_bad_keys_are_named():
    cfg = train_config(None, ["model_preset=tiny", "model.transformer.num_queries=50", "optim.lr_drop=[10, 20]"])
    assert cfg.model_config().transformer.num_queries == 50
    assert cfg.model_config().transformer.hidden_dim == 64  # from the tiny preset
    assert cfg.resolved()["model"]["transformer"]["num_queries"] == 50
    with pytest.raises(Exception, match="transformer.bogus"):
        train_config(None, ["model.transformer.bogus=1"])
    with pytest.raises(Exception, match="lr_drop"):
        train_config(None, ["optim.lr_drop=[20, 10]"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = train_config(path)
    assert cfg.max_iters > 0 and cfg.model_config() is not None and cfg.data_config() is not None


def test_param_groups_and_step_schedule():
    model, _, _ = build_model(model_config("tiny"), torch.randn(5, 16))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = sum(p.requires_grad for p in model.parameters())
    # Default = DINO / RichSem (param_dict_type='default'): exactly two learning rates.
    dino = build_optimizer(model, OptimConfig(lr=1e-4, lr_backbone=1e-5)).param_groups
    assert [(g["name"], g["lr"]) for g in dino] == [("default", 1e-4), ("backbone", 1e-5)]
    assert any("sampling_offsets" in names[id(p)] for p in dino[0]["params"])
    assert sum(len(g["params"]) for g in dino) == trainable
    # Deformable DETR's recipe, a named option: offsets and reference points at 0.1 x lr.
    cfg = OptimConfig(lr=1e-4, lr_backbone=1e-5, param_groups="deformable_detr", lr_linear_proj_mult=0.1,
                      lr_drop=[10], warmup_iters=0)
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["default"]["lr"] == 1e-4 and groups["backbone"]["lr"] == 1e-5
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert all("sampling_offsets" in names[id(p)] for p in groups["linear_proj"]["params"])
    assert all(names[id(p)].startswith("features.backbone.") for p in groups["backbone"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == trainable
    assert [lr_factor(i, cfg) for i in (0, 9, 10, 50)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    warm = OptimConfig(warmup_iters=10, warmup_factor=0.1)
    assert lr_factor(0, warm) == pytest.approx(0.1) and lr_factor(5, warm) == pytest.approx(0.55)


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_finetune_skips_mismatched_tensors_by_name():
    source, _, _ = build_model(model_config("tiny"), torch.randn(7, 16))
    target, _, _ = build_model(model_config("tiny", {"transformer": {"num_queries": 50}}), torch.randn(5, 16))
    before = target.text_embeddings.clone()
    report = load_finetune_weights(target, source.state_dict())
    assert any(m.startswith("text_embeddings ") for m in report["mismatched"])  # other vocabulary: kept
    assert any(m.startswith("tgt_embed.weight") for m in report["mismatched"])  # 100 vs 50 queries
    assert torch.equal(target.text_embeddings, before)
    assert torch.equal(target.class_head.proj.weight, source.class_head.proj.weight)
    assert "class_head.proj.weight" in report["loaded"] and not report["unexpected"]


# ------------------------------------------------------------------------------------------ runs
def test_mismatched_store_is_refused_before_any_step(run_data, tmp_path):
    from lt_distill.stages.train.loop import train

    ds, _ = run_data
    other = write_random_store(tmp_path / "other.zarr", ds, vocabulary=[f"thing_{i}" for i in range(6)], grid="coarse")
    steps = []
    cfg = train_config(None, base=run_config(ds, tmp_path / "run", store=other))
    with pytest.raises(StoreMismatchError) as err:
        train(cfg, on_step=lambda it, v: steps.append(it))
    assert "vocabulary.sha256" in str(err.value) and "grid.spec" in str(err.value)
    assert not steps and not (tmp_path / "run" / "checkpoints").exists()
    cfg = train_config(None, ["store_check.topk=16"], base=run_config(ds, tmp_path / "run2", store=run_data[1]))
    with pytest.raises(StoreMismatchError, match="encoding.topk: store has 5, run expects 16"):
        train(cfg, on_step=lambda it, v: steps.append(it))
    assert not steps


@pytest.mark.slow
def test_short_run_lowers_loss_and_writes_logs_checkpoints(run_data, tmp_path):
    from lt_distill.stages.train.loop import train

    ds, store = run_data
    cfg = train_config(None, ["max_iters=16", "checkpoint_every=8", "optim.lr=2e-4", "tensorboard=true"],
                       base=run_config(ds, tmp_path / "run", store=store))
    result = train(cfg)
    records = train_records(tmp_path / "run")
    assert [r["iter"] for r in records] == list(range(1, 17))
    assert {r["source"] for r in records} == {"detection", "classification"}
    for source in ("detection", "classification"):
        losses = [r["loss"] for r in records if r["source"] == source]
        assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), (source, losses)
    first = records[0]
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_semantic", "lr", "images_per_s", "data_time"):
        assert key in first and np.isfinite(first[key])
    assert result.images_per_s > 0 and result.final_model.is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*.pt")) == \
        ["iter_0000008.pt", "iter_0000016.pt"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    ckpt = torch.load(result.final_model, weights_only=True)
    assert ckpt["config"]["model"]["transformer"]["hidden_dim"] == 64 and len(ckpt["categories"]) == 6

    # A new run with fewer queries starts from these weights; the tensors that differ are named.
    printed = io.StringIO()
    cfg = train_config(None, ["max_iters=1", f"finetune_from={json.dumps(str(result.final_model))}"],
                       base=run_config(ds, tmp_path / "finetune", store=store,
                                       model={"transformer": {"num_queries": 50}}))
    tuned = train(cfg, console=Console(file=printed, width=200))
    assert "tgt_embed.weight (100, 64) -> (50, 64)" in printed.getvalue()
    assert "class_head.proj.weight" in tuned.finetune_report["loaded"]


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(run_data, tmp_path):
    ds, store = run_data
    full = run_config(ds, tmp_path / "full", store=store)
    assert run_killable(full, -1, "fresh").returncode == 0
    killed = run_config(ds, tmp_path / "killed", store=store)
    proc = run_killable(killed, 4, "fresh")  # checkpoint at 3, killed after step 4
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "last").read_text().strip() == "iter_0000003.pt"
    proc = run_killable(killed, -1, "resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, got = train_records(tmp_path / "full"), train_records(tmp_path / "killed")
    assert [r["iter"] for r in got] == list(range(1, 7))  # the killed run's 4th record was replaced
    keys = [k for k in ref[0] if k.startswith("loss") or k == "grad_norm"]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["iter"]
    final_a = torch.load(tmp_path / "full" / "model_final.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "killed" / "model_final.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_average_gradients(run_data, tmp_path):
    from lt_distill.stages.train.evaluation import evaluate_checkpoint

    ds, store = run_data
    base = run_config(ds, tmp_path / "ddp", store=store, max_iters=4, checkpoint_every=4,
                      eval={"every": 4, "annotations": str(ds.val_annotations), "images": str(ds.val_images),
                            "batch_size": 1})
    r0, r1 = run_torchrun(base, tmp_path)
    # Each rank trained on its own images (different losses), yet after 4 steps the replicas are still
    # identical: every step applied the same, averaged gradient.
    assert all(a != b for a, b in zip(r0["losses"], r1["losses"]))
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    records = train_records(tmp_path / "ddp")
    assert [r["iter"] for r in records] == [1, 2, 3, 4]  # rank 0 logs the mean over ranks
    assert (tmp_path / "ddp" / "checkpoints" / "iter_0000004.pt").is_file()
    # Evaluation under torchrun: each rank scored half the images into its own file, rank 0 merged them;
    # the same model evaluated in one process gives the same detections and metrics.
    merged = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert not list((tmp_path / "ddp" / "eval").glob("detections.rank*"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes (OMP_NUM_THREADS=1): the same arithmetic
    try:
        single = evaluate_checkpoint(tmp_path / "ddp" / "model_final.pt", ds.val_annotations, ds.val_images,
                                     out=tmp_path / "single.json", device="cpu", batch_size=1)
    finally:
        torch.set_num_threads(threads)
    key = lambda d: (d["image_id"], d["category_id"], d["score"], d["bbox"])  # noqa: E731
    assert sorted(json.loads(Path(merged["detections"]).read_text()), key=key) == \
        sorted(json.loads((tmp_path / "single.json").read_text()), key=key)
    assert merged["metrics"] == single.metrics


def test_resume_refuses_a_changed_optimizer_by_name_unless_allowed(run_data, tmp_path):
    """Issue 15.7: --resume used to ignore a changed optim.lr while config.json recorded the new value."""
    from lt_distill.errors import LtDistillError
    from lt_distill.stages.train.loop import train

    ds, store = run_data
    base = run_config(ds, tmp_path / "run", store=store, max_iters=2, checkpoint_every=2)
    train(train_config(None, [], base=base))
    changed = ["max_iters=3", "optim.lr=5e-4", "data.batch_size=1"]     # max_iters alone may change
    with pytest.raises(LtDistillError, match=r"in 2 value\(s\) \(data.batch_size: .*optim.lr: checkpoint 0.0001, "
                                             r"config 0.0005\)"):
        train(train_config(None, changed, base=base), resume=True)
    train(train_config(None, ["max_iters=3", "checkpoint_every=1", "optim.lr=2e-4"], base=base), resume=True,
          allow_config_changes=True, console=Console(file=io.StringIO()))
    record = json.loads((tmp_path / "run" / "resume_changes.jsonl").read_text())
    assert record == {"iteration": 2, "changes": ["optim.lr: checkpoint 0.0001, config 0.0002"]}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "iter_0000003.pt", weights_only=True)
    assert ckpt["config"]["optim"]["lr"] == 2e-4
