"""Short training runs for the tests: a small synthetic long-tailed dataset (stages.demo.synthetic), a label
store with random labels for it, a config for a few iterations of the tiny detector at ~128 px, and the two
subprocess drivers (kill -9 mid-run then resume; torchrun with two gloo processes)."""

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import torch

from lt_distill.pipeline.data.synthetic import write_label_store
from lt_distill.stages.demo.synthetic import SyntheticConfig, make_synthetic_dataset

SMALL_DATA = {  # ~128 px images so that a step takes well under a second on one core
    "det_aug": {"scales": [128], "max_size": 160, "crop_resize_scales": [96, 128], "crop_min_size": 64,
                "crop_max_size": 128},
    "cls_aug": {"tile_size": 64, "scales": [128], "max_size": 160},
}


def small_dataset(root):
    """Six classes, 16 training images, 2 classification shards of 8 images."""
    return make_synthetic_dataset(Path(root), SyntheticConfig(
        num_classes=6, train_images=16, val_images=4, image_size=(128, 160), cls_shards=2,
        cls_images_per_shard=8, cls_image_size=96))


def write_random_store(path, ds, *, vocabulary=None, grid="default", seed=0):
    """A store with random labels for every classification sample and every training box."""
    cats = json.loads(ds.categories.read_text())
    keys, hard = [], []
    for shard in ds.cls_shard_paths:
        with tarfile.open(shard) as tar:
            names = [m.name[:-4] for m in tar.getmembers() if m.name.endswith(".jpg")]
            keys.append(names)
            hard.append([int(tar.extractfile(n + ".cls").read()) for n in names])
    ann_ids = [a["id"] for a in json.loads(ds.train_annotations.read_text())["annotations"]]
    store = write_label_store(path, keys, num_classes=len(cats), hard_labels=hard, topk=5, seed=seed, grid=grid,
                              vocabulary=vocabulary or [c["name"] for c in cats], objects=ann_ids)
    emb = np.random.default_rng(seed).normal(size=(len(cats), 32)).astype(np.float16)
    store.write_text_embeddings(emb, {"model": "random"})
    return path


def run_config(ds, out, *, store=None, data=None, **top):
    """A training config dict: 6 iterations, checkpoints every 3, reading ``store`` (cached soft labels)."""
    data = {"det_annotations": str(ds.train_annotations), "det_images": str(ds.train_images),
            "cls_shards": ds.cls_shards, **({"label_store": str(store)} if store is not None else {}),
            **SMALL_DATA, **(data or {})}
    return {"output_dir": str(out), "model_preset": "tiny", "data_preset": "tiny", "data": data,
            "max_iters": 6, "checkpoint_every": 3, "log_every": 1, "seed": 0, "progress": False,
            "tensorboard": False, **top}


def train_records(out):
    """The per-step records of a run's metrics.jsonl."""
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import train
    cfg = train_config(None, base=json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    def on_step(iteration, losses):
        if iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the run
    train(cfg, resume=sys.argv[3] == "resume", on_step=on_step)
""")


def run_killable(base, kill_at, mode):
    """Train ``base`` in a subprocess (``mode`` fresh or resume), killed with -9 after step ``kill_at`` (-1: never)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(base), str(kill_at), mode],
                          env=env, capture_output=True, text=True, timeout=600)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from lt_distill.stages.train.config import train_config
    from lt_distill.stages.train.loop import train
    cfg = train_config(None, base=json.loads(sys.argv[1]))
    seen = []
    result = train(cfg, on_step=lambda it, losses: seen.append(losses["loss"]))
    torch.save({"state": result.model.state_dict(), "criterion": result.criterion.state_dict(), "losses": seen},
               sys.argv[2] + f"/rank{os.environ['RANK']}.pt")
""")


def run_torchrun(base, work, timeout=600):
    """Train ``base`` under torchrun with two gloo processes -> each rank's final model state ("state"),
    criterion state ("criterion") and per-step losses ("losses")."""
    script = Path(work) / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(base), str(work)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(Path(work) / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def check_decoded_soft_labels(data, reference, num_classes, *, atol, rtol=0.0, rows_sum_to_one=False):
    """Walk a run's loader (``build_train_data``) until detection and classification batches both carried soft
    labels; every target's device-decoded soft labels must equal ``reference(batch)`` (one (n, C) array per
    target). ``rows_sum_to_one``: valid rows are distributions."""
    from lt_distill.stages.train.loop import move_batch

    seen = {"detection": 0, "classification": 0}
    for batch in data.loader:
        batch = data.embedded(move_batch(batch, "cpu"))
        for t, ref in zip(batch["targets"], reference(batch)):
            assert t["soft_labels"].shape == (len(t["labels"]), num_classes)
            np.testing.assert_allclose(t["soft_labels"].numpy(), ref, rtol=rtol, atol=atol)
            mask = t["soft_mask"]
            if rows_sum_to_one:
                torch.testing.assert_close(t["soft_labels"][mask].sum(-1), torch.ones(int(mask.sum())))
            seen[batch["source"]] += int(mask.sum())
        if min(seen.values()) > 0:
            break
    assert min(seen.values()) > 0, seen


def train_two_steps(cfg):
    """Train ``cfg`` (max_iters 2): finite losses, a positive semantic loss, a final model file."""
    from lt_distill.stages.train.loop import train

    steps = []
    result = train(cfg, on_step=lambda it, v: steps.append(v))
    assert len(steps) == 2 and all(np.isfinite(v["loss"]) and v["loss_semantic"] > 0 for v in steps)
    assert result.final_model.is_file()
