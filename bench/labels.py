"""`lt-distill bench labels`: what soft labels cost per training step, online teacher vs cached lookup.

One classification batch (mosaics of the preset's size) is made once; then, on that same batch and in
the same run, two ways of producing its tiles' soft labels are timed:

* cached: for every tile, read its image's (K, k) block from the label store, match the tile's visible
  region to the grid and decode (what the data loader does; the reader's chunk cache is off, so every
  lookup reads and decompresses from the store files),
* online: cut every tile from the canvas, resize it to the teacher's input and run the teacher
  (RichSem's online distillation), all on the teacher's device, in one engine call sized to the tiles
  (:class:`~lt_distill.pipeline.data.online.OnlineSoftLabeler`). Its time is also split into preprocess
  (canvas to the device, un-normalise, cut + resize), forward (the engine) and probs (logits, softmax, copy
  to the CPU), measured in separate repetitions that synchronise the device between phases, and the rows
  the engine ran per step (padding to its batch bucket included) are counted.

Without ``--store``/``--shards`` the bench writes its own: generated photos and a store with random
labels over the teacher's vocabulary (the lookup cost does not depend on the label values).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..pipeline.data import (
    CropSoftLabels,
    build_classification_dataset,
    build_classification_loader,
    data_config,
)
from ..pipeline.data import synthetic as S
from ..pipeline.data.online import OnlineSoftLabeler
from ..pipeline.teacher import TeacherConfig, build_teacher
from ..pipeline.vocab import load_vocabulary
from ..store import LabelReader


def _median_ms(fn, repeats: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def run_labels_bench(teacher_cfg: TeacherConfig, *, preset: str = "default", batch_size: int | None = None,
                     store: str | Path | None = None, shards: str | None = None, crop_match: str = "nearest",
                     repeats: int = 10, warmup: int = 2, seed: int = 0, workdir: str | Path | None = None,
                     ) -> dict[str, Any]:
    """Time cached vs online soft labels for one classification batch; returns the figures."""
    vocabulary = load_vocabulary(teacher_cfg.vocab)
    teacher = build_teacher(teacher_cfg, vocabulary)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if store is None or shards is None:
            bs = batch_size or data_config(preset).batch_size
            pattern, keys, _ = S.write_shards(Path(tmp) / "shards", 2, 4 * bs, seed=seed, size_range=(300, 500))
            S.write_label_store(Path(tmp) / "store", keys, num_classes=len(vocabulary),
                                topk=min(16, len(vocabulary)), seed=seed,
                                vocabulary=vocabulary.names)
            store, shards, generated = Path(tmp) / "store", pattern, True
        else:
            generated = False
        reader = LabelReader(store)
        overrides: dict[str, Any] = {"cls_shards": shards, "label_store": str(store), "num_workers": 0,
                                     "shuffle_buffer": 0, "seed": seed, "grid": reader.attrs["grid"]["spec"],
                                     "cls_aug": {"crop_match": crop_match},
                                     "cls_unlabelled": "keep"}  # the cost per step does not depend on hard labels
        if batch_size:
            overrides["batch_size"] = batch_size
        cfg = data_config(preset, overrides)
        random.seed(seed)
        batch = next(iter(build_classification_loader(cfg, build_classification_dataset(cfg, reader))))
        tiles = [(int(s), int(p), t["regions"][i].numpy()) for t in batch["targets"]
                 for i, (s, p) in enumerate(t["rows"].tolist())]

        cold = CropSoftLabels(LabelReader(store, cache_bytes=0), crop_match, cfg.cls_aug.iou_threshold,
                              cfg.cls_aug.interp_top_n)

        def cached() -> list:
            return [cold(s, p, r[None]) for s, p, r in tiles]

        labeler = OnlineSoftLabeler(teacher, cfg.pixel_mean, cfg.pixel_std)

        def online() -> None:
            labeler({**batch, "targets": [dict(t) for t in batch["targets"]]})
            if teacher.device.type == "cuda":
                torch.cuda.synchronize(teacher.device)

        cached_ms, _ = _median_ms(cached, repeats, warmup)
        online_ms, _ = _median_ms(online, max(3, repeats // 2), warmup)
        engine = teacher.engine("crops")
        rows_before = engine.rows_run
        labeler.profile = True
        labeler.reset_timings()
        for _ in range(max(3, repeats // 2)):
            online()
        split = labeler.mean_timings_ms()
        rows_per_step = (engine.rows_run - rows_before) / labeler.calls
    lay = reader.layout
    return {
        "teacher": {"model": teacher.model_name, "weights": teacher.weights_id, "device": str(teacher.device),
                    "engine": engine.name, "precision": teacher.precision, "input_size": teacher.input_size,
                    "engine_batch": engine.batch_size, "engine_buckets": engine.info.get("buckets")},
        "preset": preset,
        "data": {"batch_size": cfg.batch_size, "tile_size": cfg.cls_aug.tile_size,
                 "canvas": list(batch["images"].shape), "tiles": len(tiles), "crop_match": crop_match},
        "store": {"generated": generated, "num_classes": lay.num_classes, "num_crops": lay.num_crops,
                  "topk": lay.topk},
        "torch_threads": torch.get_num_threads(),
        "cached_ms_per_step": cached_ms,
        "online_ms_per_step": online_ms,
        "online_split_ms": split,  # mean per step, device synchronised between phases
        "engine_rows_per_step": rows_per_step,
        "speedup": online_ms / cached_ms,
        "goal_speedup": 50.0,
    }


def print_labels_bench(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t, d, s = result["teacher"], result["data"], result["store"]
    table = Table(title="soft labels per classification step: online teacher vs cached lookup (same batch)")
    table.add_column("path")
    table.add_column("ms / step", justify="right")
    table.add_column("what it does")
    table.add_row("cached", f"{result['cached_ms_per_step']:.3f}",
                  f"{d['tiles']} x (read K={s['num_crops']} x k={s['topk']} block, match '{d['crop_match']}', "
                  f"decode to C={s['num_classes']})")
    table.add_row("online", f"{result['online_ms_per_step']:.1f}",
                  f"{d['tiles']} tiles cut from {tuple(d['canvas'])} -> {t['input_size']}px -> {t['model']}")
    split = result["online_split_ms"]
    table.add_row("  preprocess", f"{split['preprocess']:.1f}", "canvas to the teacher's device, un-normalise, "
                  "cut + resize")
    table.add_row("  forward", f"{split['forward']:.1f}", f"engine {t['engine']}: {result['engine_rows_per_step']:.0f} "
                  f"rows per step for {d['tiles']} tiles")
    table.add_row("  probs", f"{split['probs']:.1f}", "logits, softmax, copy to the CPU")
    table.add_row("speedup", f"{result['speedup']:.0f}x", f"goal >= {result['goal_speedup']:.0f}x")
    console.print(table)
    console.print(f"teacher {t['model']} ({t['weights']}) on {t['device']}, engine {t['engine']}, {t['precision']}; "
                  f"data preset {result['preset']!r}, batch {d['batch_size']}, tile {d['tile_size']}px; "
                  f"torch threads {result['torch_threads']}; store {'generated' if s['generated'] else 'given'}")
