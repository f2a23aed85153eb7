"""`lt-distill train`, `eval`, `report` and `demo`."""

from __future__ import annotations

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
    amp: Annotated[str, typer.Option(help="auto | off | bf16 | fp16 (auto: bf16 on GPU, off on CPU).")] = "auto",
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
