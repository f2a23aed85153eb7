"""`lt-distill bench precompute`: stage rates, whole-job rate and pipeline efficiency of stage 1.

On generated shards (crops of scikit-image photos at ImageNet-like sizes, JPEG), in crops and in pooled
mode, it times each stage alone and then the real job (:func:`lt_distill.stages.precompute.label_shards`):

* read + decode + crop/resize: the DataLoader workers alone (teacher inputs discarded);
* teacher forward: the main-process step alone, on inputs held in memory;
* top-k + store write: encoding the teacher's probabilities and writing whole shards alone;
* job: all of it, overlapped.

Efficiency = job rate / the bound the stage rates allow: ``1 / sum(1 / rate)`` when the stages share the
same CPU cores (this machine without a GPU), ``min(teacher, 1 / (1/decode + 1/write))`` when the teacher
has a GPU of its own. Every figure is the best of ``repeats`` runs after a warm-up, in one process.
Also: teacher cost per image crops vs pooled, and teacher images/s per available engine.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..pipeline.shards import ShardChunks, count_samples
from ..pipeline.teacher import (
    TEACHER_FAMILIES,
    GridCrops,
    TeacherConfig,
    WholeImage,
    build_teacher,
    tensorrt_unavailable_reason,
)
from ..stages.precompute import (
    Dist,
    Job,
    PrecomputeConfig,
    label_shards,
    open_or_create_store,
    prepare_job,
    resolve_threads,
)
from ..store import STATUS_DONE, LabelStore, ShardResult

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def make_bench_shards(root: Path, num_shards: int, per_shard: int, seed: int = 0) -> str:
    """Shards of ImageNet-like JPEGs (300-500 px sides, q=90) cut from scikit-image photos."""
    import io
    import tarfile

    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        photos.append(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])
    root.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        with tarfile.open(root / f"bench-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                src = photos[int(rng.integers(len(photos)))]
                h, w = int(rng.integers(300, 501)), int(rng.integers(300, 501))
                y, x = int(rng.integers(0, src.shape[0] // 4)), int(rng.integers(0, src.shape[1] // 4))
                crop = Image.fromarray(np.ascontiguousarray(src[y:, x:])).resize((w, h), Image.BILINEAR)
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(int(rng.integers(21843))).encode())):
                    info = tarfile.TarInfo(f"{s:04d}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"bench-{{000000..{num_shards - 1:06d}}}.tar")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn: Callable[..., int], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """Best images/s of ``repeats`` timed calls; ``fn(setup())`` returns the images it handled, and the
    untimed ``setup`` prepares each call (e.g. a fresh store)."""
    rates = []
    for _ in range(repeats):
        args = () if setup is None else (setup(),)
        t0 = time.perf_counter()
        n = fn(*args)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def _decode_stage(job: Job, workers: int) -> tuple[Callable[[], int], list]:
    """The workers alone; keeps the first few chunks so the teacher can be timed on real inputs."""
    t = job.teacher
    prepare = GridCrops(job.grid.boxes(), t.preprocess) if job.cfg.mode == "crops" else WholeImage(t.pooled_preprocess)
    dataset = ShardChunks(list(enumerate(job.urls)), job.labeler, prepare, prepare.output_shape,
                          chunk_size=job.cfg.chunk_size, min_image_size=job.cfg.min_image_size)
    kept: list = []

    def run() -> int:
        n = 0
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=job.cfg.prefetch if workers else None)
        for chunk in loader:
            n += len(chunk.keys)
            if len(kept) < 8 and chunk.inputs.numel():
                kept.append(chunk)
        return n

    return run, kept


def _teacher_stage(job: Job, chunks: list, images: int) -> Callable[[], int]:
    """Teacher forward (and softmax) alone: ``images`` images (cycling through the inputs held in memory)
    in the job's batches."""
    t, cfg = job.teacher, job.cfg
    rows = len(job.grid.boxes()) if cfg.mode == "crops" else 1
    pool = torch.cat([c.inputs for c in chunks])
    pool_images = pool.shape[0] // rows
    batches = []
    for start in range(0, images, cfg.batch_size):
        take = [(start + i) % pool_images for i in range(min(cfg.batch_size, images - start))]
        batch = pool.view(pool_images, rows, *pool.shape[1:])[take].flatten(0, 1)
        batches.append(batch.pin_memory() if t.device.type == "cuda" else batch)
    boxes = torch.as_tensor(job.grid.boxes(), dtype=torch.float32)

    def run() -> int:
        for b in batches:
            if cfg.mode == "crops":
                t.score_crop_batch(b)
            else:
                t.score_pooled_batch(b, boxes)
        _sync(t.device)
        return images

    return run


def _fresh_store(job: Job, store_dir: Path, name: str) -> Callable[[], tuple[Job, LabelStore]]:
    runs = [0]

    def setup() -> tuple[Job, LabelStore]:
        runs[0] += 1
        cfg = dataclasses.replace(job.cfg, store=str(store_dir / f"{name}-{runs[0]}"), overwrite=True)
        j = dataclasses.replace(job, cfg=cfg)
        return j, open_or_create_store(j, Dist())

    return setup


def _write_stage(job: Job, chunks: list) -> Callable[[tuple[Job, LabelStore]], int]:
    """Top-k of real teacher probabilities, then whole-shard writes, alone."""
    k = len(job.grid.boxes())
    rows = k if job.cfg.mode == "crops" else 1
    with torch.no_grad():
        x = torch.cat([c.inputs for c in chunks])[: job.cfg.batch_size * rows]
        if job.cfg.mode == "crops":
            probs = job.teacher.score_crop_batch(x).view(-1, k, len(job.teacher.vocabulary))
        else:
            probs = job.teacher.score_pooled_batch(x, torch.as_tensor(job.grid.boxes(), dtype=torch.float32))
    per_shard = count_samples(job.urls[0])
    shard_probs = probs.repeat(-(-per_shard // probs.shape[0]), 1, 1)[:per_shard]

    def run(state: tuple[Job, LabelStore]) -> int:
        _, store = state
        for s in range(len(job.urls)):
            prob, index = torch.topk(shard_probs, job.cfg.topk, dim=-1)
            n = prob.shape[0]
            result = ShardResult(keys=[f"{s}_{i}" for i in range(n)], sizes=np.full((n, 2), 400, np.int32),
                                 hard_labels=np.full(n, -1, np.int32), status=np.full(n, STATUS_DONE, np.uint8),
                                 reasons=np.zeros(n, np.uint8), index=index.cpu().numpy().astype(np.int16),
                                 prob=prob.float().cpu().numpy().astype(np.float16))
            store.write_shard(s, result)
        return len(job.urls) * per_shard

    return run


def _job_stage(job: Job) -> Callable[[tuple[Job, LabelStore]], int]:
    def run(state: tuple[Job, LabelStore]) -> int:
        j, store = state
        counts = label_shards(j, store, list(range(len(job.urls))), progress=False)
        _sync(job.teacher.device)
        return counts["done"] + sum(counts["failed"].values())

    return run


def bench_mode(job: Job, workers: int, repeats: int, store_dir: Path) -> dict[str, Any]:
    """Stage and job rates of one mode. The stages and the job are timed round-robin, ``repeats`` rounds
    after a warm-up round, and each keeps its best: load from other processes hits all of them alike."""
    decode_run, kept = _decode_stage(job, workers)
    decode_run()  # warm-up; fills ``kept``
    images = sum(count_samples(url) for url in job.urls)
    teacher_run = _teacher_stage(job, kept, images)
    write_run, write_setup = _write_stage(job, kept), _fresh_store(job, store_dir, f"{job.cfg.mode}-write")
    job_run, job_setup = _job_stage(job), _fresh_store(job, store_dir, f"{job.cfg.mode}-job")
    teacher_run(), write_run(write_setup()), job_run(job_setup())  # warm-up
    rates: dict[str, float] = {}
    for _ in range(repeats):
        for name, run, setup in (("decode", decode_run, None), ("teacher", teacher_run, None),
                                 ("write", write_run, write_setup), ("job", job_run, job_setup)):
            rates[name] = max(rates.get(name, 0.0), _best(run, 1, setup))
    shared = 1.0 / sum(1.0 / rates[s] for s in ("decode", "teacher", "write"))
    separate = min(rates["teacher"], 1.0 / (1.0 / rates["decode"] + 1.0 / rates["write"]))
    on_gpu = job.teacher.device.type == "cuda"
    bound = separate if on_gpu else shared
    return {
        "rates_images_per_s": rates,
        "bound_shared_cores": shared,
        "bound_separate_devices": separate,
        "bound_used": "separate_devices" if on_gpu else "shared_cores",
        "efficiency": rates["job"] / bound,
        "teacher_ms_per_image": 1000.0 / rates["teacher"],
    }


def bench_engines(base: TeacherConfig, engines: list[str], vocabulary, crops: torch.Tensor, k: int,
                  repeats: int) -> dict[str, Any]:
    """Teacher images/s (crops mode, K crops per image) per engine; unavailable ones say why."""
    out: dict[str, Any] = {}
    for name in engines:
        if name == "tensorrt":
            reason = tensorrt_unavailable_reason(torch.device(base.device if base.device != "auto" else
                                                              ("cuda" if torch.cuda.is_available() else "cpu")))
            if reason is not None:
                out[name] = {"available": False, "reason": reason}
                continue
        t0 = time.perf_counter()
        teacher = build_teacher(dataclasses.replace(base, engine=name), vocabulary)
        engine = teacher.engine("crops")
        build_s = time.perf_counter() - t0
        if engine.name != name:
            out[name] = {"available": False, "reason": f"refused or failed to build; fell back to {engine.name}"}
            continue

        def run() -> int:
            teacher.score_crop_batch(crops)
            _sync(teacher.device)
            return crops.shape[0] // k

        run()
        out[name] = {"available": True, "images_per_s": _best(run, repeats), "build_s": build_s,
                     "parity_max_abs_err": engine.info.get("parity_max_abs_err")}
    return out


def bench_precompute(model: str = "lt-tiny-rn", num_shards: int = 4, images_per_shard: int = 48,
                     grid: str = "default", workers: int = 2, batch_size: int = 16,
                     engines: list[str] | None = None, device: str = "auto", repeats: int = 2,
                     seed: int = 0, threads: int = 0, teacher: str = "clip") -> dict[str, Any]:
    """Run the benchmark (see module docstring) and return its results. Every stage and the job run with
    the torch thread count the job itself would pick (:func:`resolve_threads`). ``teacher``: ``clip`` (open_clip
    ``model`` with random weights) or ``classifier`` (``model`` with its real packaged weights, e.g. the
    EfficientNet-Lite0 ImageNet classifier; ``model = ""`` takes the family's default)."""
    engines = ["eager", "compile", "tensorrt"] if engines is None else engines
    threads_before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads, workers))
    try:
        return _bench(_teacher_config(teacher, model, device), num_shards, images_per_shard, grid, workers,
                      batch_size, engines, repeats, seed)
    finally:
        torch.set_num_threads(threads_before)


def _teacher_config(family_name: str, model: str, device: str) -> TeacherConfig:
    """clip teachers are timed with random weights (the cost does not depend on them); classifier teachers
    with their real weights (the packaged file), over their own label space."""
    if family_name not in TEACHER_FAMILIES:
        raise ConfigError(f"--teacher {family_name!r} is not one of {', '.join(TEACHER_FAMILIES)}")
    family = TEACHER_FAMILIES[family_name]
    return TeacherConfig(family=family_name, model=model or family.default_model, random_init=family_name == "clip",
                         vocab=family.default_vocab, templates="single", engine="eager", device=device)


def _bench(teacher_cfg: TeacherConfig, num_shards: int, images_per_shard: int, grid: str, workers: int,
           batch_size: int, engines: list[str], repeats: int, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {"model": teacher_cfg.model, "teacher": teacher_cfg.family,
                               "weights": "random" if teacher_cfg.random_init else "real (packaged)",
                               "device": None, "torch_threads": torch.get_num_threads(),
                               "workers": workers, "shards": num_shards, "images_per_shard": images_per_shard}
    with tempfile.TemporaryDirectory(prefix="lt-bench-precompute-") as tmp:
        root = Path(tmp)
        pattern = make_bench_shards(root / "shards", num_shards, images_per_shard, seed)
        modes = {}
        vocabulary = None
        for mode in ("crops", "pooled"):
            cfg = PrecomputeConfig(store=str(root / "store"), shards=pattern, teacher=teacher_cfg, mode=mode,
                                   grid=grid, labels="cls", class_list="imagenet21k-fall11", workers=workers,
                                   batch_size=batch_size, progress=False,
                                   shard_capacity=-(-images_per_shard // 16) * 16)
            job = prepare_job(cfg)
            vocabulary = job.teacher.vocabulary
            t = job.teacher
            modes[mode] = bench_mode(job, workers, repeats, root)
            k = job.grid.num_boxes
            modes[mode]["shapes"] = (
                f"{batch_size} images x K={k} crops of 3x{t.input_size}x{t.input_size} per forward, C={len(vocabulary)}"
                if mode == "crops" else
                f"{batch_size} images of 3x{t.pooled_size}x{t.pooled_size} per forward, K={k} RoIs of "
                f"{t.roi_size}x{t.roi_size} each, C={len(vocabulary)}")
            results["device"] = str(t.device)
            if mode == "crops":
                crops_job = job
        results["modes"] = modes
        results["crops_over_pooled_teacher_cost"] = (modes["crops"]["teacher_ms_per_image"]
                                                     / modes["pooled"]["teacher_ms_per_image"])
        t = crops_job.teacher
        gen = torch.Generator().manual_seed(seed)
        k = crops_job.grid.num_boxes
        crops = torch.randint(0, 256, (batch_size * k, 3, t.input_size, t.input_size), generator=gen, dtype=torch.uint8)
        base = dataclasses.replace(teacher_cfg, crop_batch=batch_size * k, pooled_batch=batch_size)
        results["engines"] = bench_engines(base, engines, vocabulary, crops, k, repeats)
        results["engines_shape"] = f"{batch_size} images x K={k} crops of 3x{t.input_size}x{t.input_size}"
    return results


def print_results(results: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title=f"bench precompute: {results['model']} ({results.get('weights', 'random')} weights) on {results['device']}, "
                        f"{results['shards']} shards x {results['images_per_shard']} images, "
                        f"{results['workers']} workers, {results['torch_threads']} torch threads")
    table.add_column("mode")
    for col in ("decode", "teacher", "write", "job", "bound", "eff."):
        table.add_column(col, justify="right")
    table.caption = ("images/s of each stage alone (decode = read + decode + crop/resize in the workers; write = "
                     "top-k + store write), of the whole job, and the job's efficiency = job / bound")
    for mode, r in results["modes"].items():
        rates = r["rates_images_per_s"]
        bound = r["bound_separate_devices"] if r["bound_used"] == "separate_devices" else r["bound_shared_cores"]
        table.add_row(mode, *(f"{rates[s]:.1f}" for s in ("decode", "teacher", "write", "job")), f"{bound:.1f}",
                      f"{r['efficiency']:.2f}")
    console.print(table)
    for mode, r in results["modes"].items():
        console.print(f"  {mode}: {r['shapes']}; bound = {r['bound_used'].replace('_', ' ')}")
    console.print(f"  teacher cost per image, crops / pooled: {results['crops_over_pooled_teacher_cost']:.2f}x")
    engines = Table(title=f"teacher images/s per engine ({results['engines_shape']})")
    for col in ("engine", "images/s", "build s", "parity |err|"):
        engines.add_column(col)
    for name, r in results["engines"].items():
        if r["available"]:
            err = r["parity_max_abs_err"]
            engines.add_row(name, f"{r['images_per_s']:.1f}", f"{r['build_s']:.1f}", "-" if err is None else f"{err:.2g}")
        else:
            engines.add_row(name, "unavailable", "", r["reason"])
    console.print(engines)
