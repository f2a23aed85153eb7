"""``lt-distill demo``: the whole job end to end on a small synthetic long-tailed dataset.

Steps, each the real code path of the corresponding command:

1. ``synthetic``: detection images (LVIS JSON, long-tailed r/c/f) and classification WebDataset shards;
2. ``precompute``: the tiny CLIP teacher (``lt-tiny-rn``, random weights: the labels mean nothing, the
   machinery is what is shown) labels every grid crop of the shards and every training box;
3. ``train``: the tiny DINO preset trains from the cached labels (1:1 detection / classification);
4. ``eval``: the final model runs over the validation split and lvis-api scores it; a chance
   baseline (random boxes and classes, as many per image) is scored the same way;
5. ``report``: PNG plots of the losses, AP by frequency group and the label store.

``methods`` (default ``["richsem"]``) trains and evaluates each long-tail method on the same data and
store (steps 3-4 per method, its training stages in turn, into ``run`` for one method and
``run_<method>`` for several); with several, step 5 also draws them side by side (``compare.png``).

The work directory is recreated on every run (it is only ever deleted when it holds the demo's
marker file).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...errors import LtDistillError
from ...pipeline.evaluate import evaluate_detections, load_annotations
from ...pipeline.report import write_report
from ...store import store_bytes
from .synthetic import SyntheticConfig, SyntheticDataset, make_synthetic_dataset

MARKER = "lt-distill-demo.json"


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo. ``small()`` is the reduced version the test suite runs."""

    data: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    max_iters: int = 400
    lr: float = 4e-4
    batch_size: int = 2
    image_scales: tuple[int, ...] = (160, 192)  # short side of training images; eval at the largest
    max_size: int = 256
    tile_size: int = 96  # classification mosaic tile (canvas 2x)
    topk: int = 8
    grid: str = "default"
    threads: int = 0  # torch threads (0 = leave torch's default)
    seed: int = 0
    methods: tuple[str, ...] = ("richsem",)  # pipeline.methods names, trained one after the other

    @classmethod
    def small(cls) -> "DemoConfig":
        return cls(data=SyntheticConfig(num_classes=12, train_images=64, val_images=16, cls_shards=2,
                                        cls_images_per_shard=16, image_size=(144, 192), cls_image_size=96),
                   max_iters=100, image_scales=(144,), max_size=192, tile_size=72)


def _train_config_dict(cfg: DemoConfig, ds: SyntheticDataset, store: Path, run_dir: Path) -> dict[str, Any]:
    scales = list(cfg.image_scales)
    return {
        "output_dir": str(run_dir),
        "model_preset": "tiny",
        "data_preset": "tiny",
        "data": {
            "det_annotations": str(ds.train_annotations), "det_images": str(ds.train_images),
            "cls_shards": ds.cls_shards, "label_store": str(store), "grid": cfg.grid,
            "batch_size": cfg.batch_size, "seed": cfg.seed,
            "det_aug": {"scales": scales, "max_size": cfg.max_size, "crop_resize_scales": scales,
                        "crop_min_size": min(scales) // 2, "crop_max_size": max(scales)},
            "cls_aug": {"tile_size": cfg.tile_size, "scales": scales, "max_size": cfg.max_size},
        },
        "optim": {"lr": cfg.lr, "lr_drop": [max(int(cfg.max_iters * 0.8), 1)], "warmup_iters": 10},
        "store_check": {"topk": cfg.topk},
        "max_iters": cfg.max_iters,
        "checkpoint_every": max(cfg.max_iters // 2, 1),
        "log_every": 5,
        "seed": cfg.seed,
    }


def chance_detections(gt: dict[str, Any], per_image: int, seed: int = 0) -> list[dict[str, Any]]:
    """A detector that knows nothing: ``per_image`` boxes per image with uniform random positions,
    sizes, classes and scores."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        for _ in range(per_image):
            bw, bh = rng.uniform(0.05, 0.7) * w, rng.uniform(0.05, 0.7) * h
            dets.append({"image_id": im["id"], "category_id": int(rng.choice(cat_ids)), "score": float(rng.random()),
                         "bbox": [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)]})
    return dets


def _prepare_workdir(workdir: Path) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise LtDistillError(f"{workdir} is not empty and not a previous demo directory; "
                                 "choose another --workdir")
        names = ["data", "store.zarr", "run", "summary.json", "compare", MARKER]
        names += [p.name for p in workdir.glob("run_*")]
        for name in names:
            path = workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(json.dumps({"what": "lt-distill demo work directory"}))


def run_demo(workdir: str | Path, cfg: DemoConfig | None = None, log: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, Any]:
    """Run the five steps in ``workdir``; returns (and writes to ``workdir/summary.json``) the summary."""
    import torch

    cfg = cfg or DemoConfig()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(Path(workdir), cfg, log, progress)
    finally:
        torch.set_num_threads(threads)


def _run(workdir: Path, cfg: DemoConfig, log: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from ...pipeline.teacher import TeacherConfig
    from ...pipeline.methods import build_method
    from ...pipeline.report import write_comparison
    from ..precompute import PrecomputeConfig, run_precompute

    _prepare_workdir(workdir)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    log(f"[1/5] synthetic data: {cfg.data.num_classes} classes, {cfg.data.train_images} + {cfg.data.val_images} "
        f"detection images, {cfg.data.cls_shards} x {cfg.data.cls_images_per_shard} classification images")
    ds = make_synthetic_dataset(workdir / "data", cfg.data)
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[2/5] precompute: tiny CLIP teacher (lt-tiny-rn, random weights) -> label store")
    store = workdir / "store.zarr"
    teacher = TeacherConfig(model="lt-tiny-rn", random_init=True, seed=cfg.seed, vocab=str(ds.categories),
                            templates="simple", device="cpu", engine="eager")
    pre = run_precompute(PrecomputeConfig(
        store=str(store), shards=ds.cls_shards, teacher=teacher, mode="crops", grid=cfg.grid, topk=cfg.topk,
        labels="cls", class_list=str(ds.class_list), synset_wnids=str(ds.synset_wnids), batch_size=16,
        workers=1, annotations=str(ds.train_annotations), images=str(ds.train_images), progress=progress,
    ), log=log)
    timings["precompute_s"] = time.perf_counter() - t0

    per_method: dict[str, dict[str, Any]] = {}
    for name in cfg.methods:
        run_dir = workdir / ("run" if len(cfg.methods) == 1 else f"run_{name}")
        per_method[name] = _train_and_evaluate(name, build_method(name), cfg, ds, store, run_dir, log, progress,
                                               timings)

    log("[5/5] report: plots")
    plots: list[Path] = []
    for name in cfg.methods:
        run_dir = Path(per_method[name]["run_dir"])
        plots += write_report(run_dir, store=store if name == cfg.methods[0] else None)
    if len(cfg.methods) > 1:
        plots.append(write_comparison({n: Path(m["run_dir"]) for n, m in per_method.items()},
                                      workdir / "compare" / "compare.png"))
    timings["total_s"] = time.perf_counter() - t_all

    images_labelled = pre["classification"]["images_done"]
    size = store_bytes(store)
    summary = {
        "workdir": str(workdir),
        "classes": cfg.data.num_classes,
        "store": {"path": str(store), "bytes": size, "images": images_labelled,
                  "bytes_per_image": size / max(images_labelled, 1), "objects": pre.get("objects", {}).get("done", 0)},
        "precompute_images_per_s": pre["classification"]["images_per_s"],
        "train": per_method[cfg.methods[0]]["train"],
        "eval": per_method[cfg.methods[0]]["eval"],
        "methods": per_method,
        "plots": [str(p) for p in plots],
        "timings_s": timings,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train_and_evaluate(name: str, method: Any, cfg: DemoConfig, ds: SyntheticDataset, store: Path, run_dir: Path,
                        log: Callable[[str], None], progress: bool, timings: dict[str, float]) -> dict[str, Any]:
    """Steps 3-4 for one method: its training stages in turn (each from the previous final model; the last
    one in ``run_dir``, earlier ones in ``run_dir/stage_<name>``), then lvis-api on the validation split
    beside a chance baseline."""
    from ..train.config import train_config
    from ..train.evaluation import evaluate_checkpoint
    from ..train.loop import train

    stages = method.training_stages()
    t0 = time.perf_counter()
    previous = None
    iterations = 0
    for i, stage in enumerate(stages):
        iters = max(int(round(cfg.max_iters * stage.iters_fraction)), 1)
        stage_dir = run_dir if i == len(stages) - 1 else run_dir / f"stage_{stage.name}"
        log(f"[3/5] train ({name}{', ' + stage.name if len(stages) > 1 else ''}): tiny DINO, {iters} iterations")
        base = _train_config_dict(dataclasses.replace(cfg, max_iters=iters), ds, store, stage_dir)
        base.update(method=name)
        base = _merge(base, stage.overrides)
        if previous is not None:
            base["finetune_from"] = str(previous)
        result = train(train_config(None, [f"progress={'true' if progress else 'false'}"], base=base))
        previous, iterations = result.final_model, iterations + result.iterations
    timings[f"train_{name}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[4/5] eval ({name}): lvis-api on the validation split")
    ev = evaluate_checkpoint(result.final_model, ds.val_annotations, ds.val_images, out=run_dir / "detections.json",
                             device="cpu", image_size=max(cfg.image_scales), max_size=cfg.max_size)
    (run_dir / "eval.json").write_text(json.dumps({"iter": result.iterations, "metrics": ev.metrics}, indent=2))
    gt = load_annotations(ds.val_annotations)
    per_image = max(len(json.loads(Path(ev.detections).read_text())) // max(len(gt["images"]), 1), 1)
    chance = evaluate_detections(gt, chance_detections(gt, per_image, cfg.seed))
    timings[f"eval_{name}_s"] = time.perf_counter() - t0
    return {"run_dir": str(run_dir),
            "train": {"iterations": iterations, "images_per_s": result.images_per_s,
                      "final_model": str(result.final_model), "last_loss": result.losses.get("loss")},
            "eval": {"metrics": ev.metrics, "detections": str(ev.detections), "chance": chance}}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    from ...config import deep_merge

    return deep_merge(base, overrides)
