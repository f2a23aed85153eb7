"""`lt-distill bench fidelity` and `lt-distill bench labels` (stage-2 data: cached vs online soft labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .app import bench_app

console = Console(width=160)
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.")]
Device = Annotated[str, typer.Option("--device", help="Teacher device: auto (cuda:LOCAL_RANK if available), "
                                                      "cpu, cuda:N.")]
Precision = Annotated[str, typer.Option("--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")]
Engine = Annotated[str, typer.Option("--engine", help="Teacher engine: eager, compile, tensorrt or auto.")]
Preset = Annotated[str, typer.Option("--preset", help="Data preset (sizes of tiles and canvas): default, tiny.")]


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        console.print(f"wrote {path}")


@bench_app.command("fidelity")
def bench_fidelity_cmd(
    store: Annotated[Optional[Path], typer.Argument(
        help="Label store to check (made by `lt-distill precompute`); omit with --photos.")] = None,
    shards: Annotated[Optional[str], typer.Option("--shards", help="The shard pattern the store was made from.")] = None,
    photos: Annotated[Optional[str], typer.Option(
        "--photos", help="Real-photo mode instead of STORE: skimage (scikit-image's sample photos), coco8 "
        "(../shared/refdata/coco8), or a folder; comma-separated. A store is filled per --grids with the "
        "--teacher and measured (the grid study).")] = None,
    grids: Annotated[str, typer.Option("--grids", help="With --photos: grids to fill and compare, ';'-separated "
                                                      "(named or specs).")] = "default",
    teacher_family: Annotated[str, typer.Option("--teacher", help="With --photos: clip or classifier.")] = "classifier",
    model: Annotated[Optional[str], typer.Option("--model", help="With --photos: the teacher model (default: the "
                                                                 "family's).")] = None,
    topk: Annotated[int, typer.Option("--topk", help="With --photos: classes kept per crop.")] = 16,
    flip_labels: Annotated[bool, typer.Option(
        "--flip-labels", help="With --photos: fill the stores with mirror rows (precompute --flip-labels), so "
        "flipped tiles read the mirrored crop's label.")] = False,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0: leave as is).")] = 0,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", help="The teacher weights file the store was made with (random-init stores need none).")] = None,
    vocab: Annotated[str, typer.Option("--vocab", help="The store's vocabulary: lvis-v1, an LVIS annotation JSON "
                                                       "or a categories JSON (checked by SHA-256).")] = "lvis-v1",
    tiles: Annotated[int, typer.Option("--tiles", help="Augmented tiles scored per match mode.")] = 500,
    modes: Annotated[str, typer.Option("--modes", help="Match modes, comma-separated.")] = "exact,nearest,interp",
    crop_prob: Annotated[float, typer.Option("--crop-prob", help="Share of tiles that are cropped (the rest show "
                                                                 "the whole image).")] = 1.0,
    iou_threshold: Annotated[float, typer.Option("--iou-threshold", help="Below it the soft loss is masked.")] = 0.5,
    top_n: Annotated[int, typer.Option("--top-n", help="Grid crops mixed in interp mode.")] = 4,
    reproduce: Annotated[int, typer.Option("--reproduce", help="Stored images whose grid crops are re-scored "
                                                               "first, to check the teacher matches the store.")] = 4,
    preset: Preset = "default",
    device: Device = "auto",
    precision: Precision = "auto",
    engine: Engine = "eager",
    seed: Annotated[int, typer.Option("--seed", help="Augmentation seed.")] = 0,
    json_out: JsonOut = None,
) -> None:
    """KL(online teacher on the actual tile || cached label), top-1 agreement and top-5 overlap per crop-match
    mode, for flipped and unflipped tiles (goal: exact >= 99% top-1, KL <= 0.02 nats). The teacher is rebuilt
    from the store's provenance and must reproduce its text fingerprint. With --photos, stores are filled from
    real photos by a real teacher, one per grid, and compared (fidelity against store bytes)."""
    import tempfile

    import torch

    from ..bench.fidelity import print_fidelity, print_grid_study, run_fidelity, run_grid_study
    from ..errors import LtDistillError
    from ..pipeline.teacher import TEACHER_FAMILIES, TeacherConfig

    if threads > 0:
        torch.set_num_threads(threads)
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    if photos is not None:
        if store is not None or shards is not None:
            raise LtDistillError("give either STORE --shards, or --photos (which makes its own stores)")
        if teacher_family not in TEACHER_FAMILIES:
            raise LtDistillError(f"--teacher {teacher_family!r} is not one of {', '.join(TEACHER_FAMILIES)}")
        family = TEACHER_FAMILIES[teacher_family]
        cfg = TeacherConfig(family=teacher_family, model=model or family.default_model,
                            weights=str(weights) if weights else None,
                            vocab=vocab if teacher_family == "clip" else family.default_vocab,
                            device=device, precision=precision, engine=engine)
        with tempfile.TemporaryDirectory(prefix="lt-fidelity-") as work:
            result = run_grid_study(photos, [g.strip() for g in grids.split(";") if g.strip()], cfg, work_dir=work,
                                    topk=topk, flip_labels=flip_labels, num_tiles=tiles, modes=mode_list, preset=preset, crop_prob=crop_prob,
                                    iou_threshold=iou_threshold, interp_top_n=top_n, seed=seed, reproduce=reproduce)
        print_grid_study(result, console)
        _write_json(json_out, result)
        return
    if store is None or shards is None:
        raise LtDistillError("give a label STORE and its --shards (or --photos for the real-photo grid study)")
    base = TeacherConfig(vocab=vocab, device=device, precision=precision, engine=engine)
    result = run_fidelity(store, shards, base, weights=str(weights) if weights else None, num_tiles=tiles,
                          modes=mode_list, preset=preset,
                          crop_prob=crop_prob, iou_threshold=iou_threshold, interp_top_n=top_n, seed=seed,
                          reproduce=reproduce)
    print_fidelity(result, console)
    _write_json(json_out, result)


@bench_app.command("labels")
def bench_labels_cmd(
    model: Annotated[str, typer.Option("--model", help="Teacher architecture (open_clip name).")] = "RN50",
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Teacher weights file.")] = None,
    random_init: Annotated[bool, typer.Option(
        "--random-init", help="Random teacher weights (the cost per step does not depend on them).")] = False,
    vocab: Annotated[str, typer.Option("--vocab", help="Teacher vocabulary (sets C).")] = "lvis-v1",
    templates: Annotated[str, typer.Option("--templates", help="Prompt templates (text embeddings only; no "
                                                               "effect on the per-step cost).")] = "single",
    store: Annotated[Optional[Path], typer.Option("--store", help="A label store (default: generated).")] = None,
    shards: Annotated[Optional[str], typer.Option("--shards", help="Its shard pattern (with --store).")] = None,
    preset: Preset = "default",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch (default: the "
                                                                           "preset's).")] = None,
    crop_match: Annotated[str, typer.Option("--crop-match", help="exact, nearest or interp.")] = "nearest",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repetitions (median reported).")] = 10,
    device: Device = "auto",
    precision: Precision = "auto",
    engine: Engine = "auto",
    json_out: JsonOut = None,
) -> None:
    """Per-step cost of the soft labels of one classification batch: online teacher vs cached lookup, on the
    same batch in the same run (goal >= 50x)."""
    from ..bench.labels import print_labels_bench, run_labels_bench
    from ..errors import LtDistillError
    from ..pipeline.teacher import TeacherConfig

    if (store is None) != (shards is None):
        raise LtDistillError("give --store and --shards together (or neither, to generate both)")
    cfg = TeacherConfig(model=model, weights=str(weights) if weights else None, random_init=random_init, vocab=vocab,
                        templates=templates, device=device, precision=precision, engine=engine)
    result = run_labels_bench(cfg, preset=preset, batch_size=batch_size, store=store, shards=shards,
                              crop_match=crop_match, repeats=repeats)
    print_labels_bench(result, console)
    _write_json(json_out, result)
