"""`lt-distill export` and `lt-distill bench model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .app import app, bench_app

console = Console()


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (.pth with 'model' and 'config').")],
    out: Annotated[Path, typer.Argument(help="Where to write the inference model.")],
) -> None:
    """Write an inference model: the checkpoint without the semantic branch (predictions are unchanged)."""
    from ..pipeline.model import export_inference_model

    dropped = export_inference_model(checkpoint, out)
    names = ", ".join(dropped) if dropped else "none (the checkpoint has no semantic branch)"
    console.print(f"wrote {out}; dropped {len(dropped)} semantic-branch tensors: {names}")


@bench_app.command("model")
def bench_model_cmd(
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON to this file.")] = None,
    preset: Annotated[str, typer.Option(help="Model preset to time.")] = "tiny",
    batch: Annotated[int, typer.Option(help="Images per step.")] = 2,
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 256,
    classes: Annotated[int, typer.Option(help="Number of classes (LVIS: 1203).")] = 1203,
    steps: Annotated[int, typer.Option(help="Timed steps (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Forward+backward time per image of a detector preset on the CPU and the share spent in MSDeformAttn."""
    import torch

    from ..bench.model import print_model_bench, run_model_bench

    if threads is not None:
        torch.set_num_threads(threads)
    result = run_model_bench(preset, batch, image_size, classes, steps=steps, warmup=warmup)
    print_model_bench(result, console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {json_out}")
