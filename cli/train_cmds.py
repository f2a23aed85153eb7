"""`lt-distill train`, `eval`, `report` and `demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..errors import LtDistillError
from .app import app

console = Console()

FORMATS = ("auto", "lvis", "coco")


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    from ..pipeline.evaluate import format_metric

    table = Table(title=title)
    for key in metrics:
        table.add_column(key, justify="right")
    table.add_row(*(format_metric(v) for v in metrics.values()))
    return table


@app.command("eval")
def eval_cmd(
    annotations: Annotated[Path, typer.Option("--annotations", help="LVIS or COCO annotation JSON (ground truth).")],
    detections: Annotated[Optional[Path], typer.Option(
        "--detections", help="Score this detections JSON (list of image_id/category_id/bbox/score) instead of "
                             "running a model.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Run this model checkpoint over the annotated images.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image folder (with --checkpoint).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Where the detections of --checkpoint go (default: detections.json next to it).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON here.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Evaluator: auto (LVIS if the file is LVIS), lvis, coco.")
                   ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK if available).")
                      ] = "auto",
    amp: Annotated[str, typer.Option(help="Autocast of backbone/encoder/decoder: off | auto | bf16 | fp16 (auto: "
                                          "bf16 on GPU, off on CPU); heads stay fp32.")] = "off",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass, per process.")] = 2,
    image_size: Annotated[Optional[int], typer.Option(
        help="Test short side in pixels (default: the largest training scale of the checkpoint).")] = None,
    max_size: Annotated[Optional[int], typer.Option(help="Cap on the long side (default: the checkpoint's).")] = None,
    max_images: Annotated[int, typer.Option(help="Evaluate only the first N images (0 = all).")] = 0,
) -> None:
    """Score detections with the official evaluator: LVIS JSON -> lvis-api (AP, AP50, AP75, APs/m/l,
    APr/c/f; 300 detections per image, score >= 1e-4), COCO JSON -> pycocotools. Runs under torchrun:
    each rank writes its detections to disk and rank 0 merges and scores them."""
    from ..stages.train.evaluation import evaluate_checkpoint, evaluate_file, write_metrics_json

    if fmt not in FORMATS:
        raise LtDistillError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (detections is None) == (checkpoint is None):
        raise LtDistillError("give exactly one of --detections FILE or --checkpoint CKPT (with --images DIR)")
    if detections is not None:
        result = evaluate_file(detections, annotations, fmt)
    else:
        if images is None:
            raise LtDistillError("--checkpoint needs --images DIR (the folder of the annotated images)")
        result = evaluate_checkpoint(checkpoint, annotations, images, out=out, device=device, amp=amp,
                                     batch_size=batch_size, image_size=image_size, max_size=max_size,
                                     max_images=max_images, fmt=fmt)
        if result is None:  # not rank 0
            return
    console.print(metrics_table(result.metrics, f"{result.format.upper()} box AP (%), {result.num_images} images"))
    if checkpoint is not None:
        console.print(f"detections: {result.detections}")
    if json_out is not None:
        write_metrics_json(json_out, result)
        console.print(f"wrote {json_out}")


@app.command("train")
def train_cmd(
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML/JSON training config (see configs/). With --resume and no --config, the run's "
                         "own config.json is used.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config value: --set optim.lr=2e-4 --set data.batch_size=4 (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Shortcut for --set output_dir=DIR.")
                          ] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in output_dir from its last checkpoint, exactly.")] = False,
    allow_config_changes: Annotated[bool, typer.Option(
        "--allow-config-changes", help="With --resume: apply config values that differ from the checkpoint's "
                                       "(method, model, data, optim, seed, amp) from here on, and record them; "
                                       "without it such a resume is refused.")] = False,
    finetune_from: Annotated[Optional[Path], typer.Option(
        "--finetune-from", "--init-from", help="Initialise from this checkpoint's weights; tensors whose name or "
        "shape differ (e.g. another vocabulary) are skipped and listed (BACL stage 2: the stage-1 model).")] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="Long-tail method: richsem (default), baseline, bacl, ... Shortcut for --set method=...")
    ] = None,
    stage: Annotated[Optional[str], typer.Option(
        "--stage", help="The method's training stage, e.g. bacl: representation | classifier. Shortcut for "
                        "--set method_options.stage=...")] = None,
    soft_labels: Annotated[Optional[str], typer.Option(
        "--soft-labels", help="cached: read the label store (data.label_store, default); online: the CLIP teacher "
                              "of the teacher section scores every batch's tiles and boxes during training "
                              "(RichSem's original set-up, for comparison; no store). Shortcut for "
                              "--set data.soft_labels=...")] = None,
) -> None:
    """Train the detector (stage 2) from cached soft labels, or with --soft-labels online from a CLIP teacher
    run on every batch. Under torchrun: DDP (NCCL on GPU, gloo on CPU). Logs: <output_dir>/metrics.jsonl,
    TensorBoard in <output_dir>/tensorboard; checkpoints in <output_dir>/checkpoints; final weights
    <output_dir>/model_final.pt."""
    from ..stages.train.config import train_config
    from ..stages.train.loop import train

    sets = list(overrides or [])
    if output_dir is not None:
        sets.append(f"output_dir={json.dumps(str(output_dir))}")
    if finetune_from is not None:
        sets.append(f"finetune_from={json.dumps(str(finetune_from))}")
    if soft_labels is not None:
        sets.append(f"data.soft_labels={json.dumps(soft_labels)}")
    if method is not None:
        sets.append(f"method={json.dumps(method)}")
    if stage is not None:
        sets.append(f"method_options.stage={json.dumps(stage)}")
    base = None
    if config is None:
        run_dir = output_dir or _output_dir_from(sets)
        if not resume or run_dir is None or not (run_dir / "config.json").is_file():
            raise LtDistillError("give --config FILE (or --resume --output-dir RUN_DIR of an existing run)")
        base = json.loads((run_dir / "config.json").read_text())
    cfg = train_config(config, sets, base=base)
    result = train(cfg, resume=resume, console=console, allow_config_changes=allow_config_changes)
    if result.final_model is None:  # not rank 0
        return
    table = Table(title=f"training done: {result.iterations} iterations", show_header=False)
    table.add_row("output", str(result.output_dir))
    table.add_row("final model", str(result.final_model))
    table.add_row("throughput", f"{result.images_per_s:.2f} images/s (all processes)")
    if result.losses:
        table.add_row("last loss", f"{result.losses.get('loss', float('nan')):.4f}")
    if result.skipped:
        table.add_row("skipped samples", ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    console.print(table)
    if result.eval_metrics:
        console.print(metrics_table(result.eval_metrics, "final evaluation, box AP (%)"))


def _output_dir_from(sets: list[str]) -> Optional[Path]:
    from ..config import parse_override

    for item in reversed(sets):
        keys, value = parse_override(item)
        if keys == ["output_dir"]:
            return Path(str(value))
    return None


@app.command("report")
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Training output directory (holds metrics.jsonl); "
                                                        "several: also side by side.")],
    store: Annotated[Optional[Path], typer.Option("--store", help="Also plot this label store's statistics.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder for the PNGs (default RUN_DIR/plots; several runs: the first run's parent/compare).")
    ] = None,
) -> None:
    """PNG plots of a run: loss terms over iterations (per batch source), learning rate / throughput,
    AP by frequency group (AP, APr, APc, APf), and label-store statistics when given --store. With several
    runs: each run's plots in its own folder, plus compare.png (AP/APr/APc/APf bars per run, from each
    run's eval.json) and compare.json."""
    from ..pipeline.report import final_metrics, run_label, write_comparison, write_report

    if len(run_dirs) == 1:
        for path in write_report(run_dirs[0], store=store, out_dir=out):
            console.print(f"wrote {path}")
        return
    for run_dir in run_dirs:
        for path in write_report(run_dir, store=store):
            console.print(f"wrote {path}")
    labels = [run_label(r) for r in run_dirs]
    if len(set(labels)) != len(labels):
        labels = [str(r) for r in run_dirs]
    compare_dir = out or run_dirs[0].resolve().parent / "compare"
    path = write_comparison(dict(zip(labels, run_dirs)), compare_dir / "compare.png")
    console.print(f"wrote {path}")
    keys = ("AP", "APr", "APc", "APf")
    rows = {label: final_metrics(r) for label, r in zip(labels, run_dirs)}
    console.print(metrics_table_runs(rows, keys))


def metrics_table_runs(rows: dict[str, dict[str, float]], keys: tuple[str, ...]) -> Table:
    from ..pipeline.evaluate import format_metric

    table = Table(title="box AP (%) per run")
    table.add_column("run")
    for key in keys:
        table.add_column(key, justify="right")
    for label, metrics in rows.items():
        table.add_row(label, *(format_metric(metrics[k]) if k in metrics else "-" for k in keys))
    return table


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its data, store and run "
                                          "(recreated; only a previous demo directory is ever deleted).")
                       ] = Path("lt-distill-demo"),
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="Training iterations (default 400).")
                          ] = None,
    small: Annotated[bool, typer.Option("--small", help="The reduced demo of the test suite (about a minute).")
                     ] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (0 = torch's default).")] = 0,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="Long-tail method to train: richsem (default), baseline, bacl, ...")] = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated methods trained side by side on the same data and store "
                          "(e.g. richsem,baseline,bacl); the report adds compare.png.")] = None,
) -> None:
    """The built-in example, end to end on a synthetic long-tailed dataset: make data -> precompute
    (tiny CLIP teacher, random weights) -> train the tiny detector from the cached labels -> evaluate
    with lvis-api -> plots. Prints store size, throughput, AP/APr/APc/APf and where the plots are."""
    import dataclasses

    from ..stages.demo.driver import DemoConfig, run_demo

    cfg = DemoConfig.small() if small else DemoConfig()
    if iterations is not None:
        cfg = dataclasses.replace(cfg, max_iters=iterations)
    if threads:
        cfg = dataclasses.replace(cfg, threads=threads)
    if method is not None and methods is not None:
        raise LtDistillError("give --method or --methods, not both")
    chosen = [m.strip() for m in (methods or method or "richsem").split(",") if m.strip()]
    from ..pipeline.methods import build_method

    for name in chosen:
        build_method(name)  # an unknown name fails here, before any data is made
    cfg = dataclasses.replace(cfg, methods=tuple(chosen))
    summary = run_demo(workdir, cfg, log=console.print)
    console.print(demo_table(summary))


def demo_table(summary: dict) -> Table:
    from ..pipeline.evaluate import format_metric

    store, tr, ev = summary["store"], summary["train"], summary["eval"]
    table = Table(title="lt-distill demo", show_header=False)
    table.add_row("label store", f"{store['path']}: {store['bytes'] / 1024:.1f} KiB on disk, {store['images']} "
                                 f"images ({store['bytes_per_image']:.0f} B/image), {store['objects']} object labels")
    table.add_row("precompute", f"{summary['precompute_images_per_s']:.1f} images/s (tiny teacher, CPU)")
    table.add_row("training", f"{tr['iterations']} iterations, {tr['images_per_s']:.2f} images/s, "
                              f"last loss {tr['last_loss']:.3f}")
    chance = ev["chance"]
    for name, result in summary.get("methods", {}).items():
        m = result["eval"]["metrics"]
        table.add_row(f"box AP (%) {name}", "  ".join(f"{k} {format_metric(m[k])}" for k in ("AP", "APr", "APc", "APf")))
    table.add_row("chance AP (%)", "  ".join(f"{k} {format_metric(chance[k])}" for k in ("AP", "APr", "APc", "APf"))
                  + "  (random boxes and classes)")
    table.add_row("plots", "\n".join(summary["plots"]))
    table.add_row("time", ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in summary["timings_s"].items()))
    return table
