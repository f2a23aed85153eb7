"""`lt-distill build-ops` and `lt-distill bench msda`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .app import app, bench_app

console = Console()


@app.command("build-ops")
def build_ops_cmd(
    cuda: Annotated[
        Optional[bool],
        typer.Option("--cuda/--cpu-only",
                     help="Also build the CUDA kernels (default: when a CUDA toolkit is found and a GPU is visible "
                          "or TORCH_CUDA_ARCH_LIST is set)."),
    ] = None,
    arch: Annotated[
        Optional[str],
        typer.Option(help='GPU architectures, e.g. "8.0;9.0+PTX" (default: $TORCH_CUDA_ARCH_LIST, else the '
                          "visible GPUs)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the compiler commands and output.")] = False,
) -> None:
    """Compile the MSDeformAttn kernels ahead of time into the extension cache and load them once."""
    import os

    import torch

    from ..cuda_ops import build

    if cuda is None:
        cuda = build.cuda_toolkit_problem() is None and (
            torch.cuda.is_available() or bool(arch or os.environ.get("TORCH_CUDA_ARCH_LIST"))
        )
    info = build.build(with_cuda=cuda, arch_list=arch, verbose=verbose)
    console.print(f"built {info.describe()}")
    console.print(f"library: {info.library}")
    if info.with_cuda:
        console.print(f"GPU code in the library: {', '.join(build.embedded_kernel_images(info.library))}")


@bench_app.command("msda")
def bench_msda_cmd(
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON to this file.")] = None,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 2,
    hidden: Annotated[int, typer.Option(help="Model width (heads x channels per head).")] = 64,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    points: Annotated[int, typer.Option(help="Sampling points per head and level.")] = 4,
    image_size: Annotated[int, typer.Option(help="Square input image size in pixels (levels at strides 8-64).")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed calls per measurement (the median is reported).")] = 20,
    threads: Annotated[int, typer.Option(help="torch CPU threads for the CPU timings.")] = 1,
) -> None:
    """Time the compiled MSDeformAttn op against the PyTorch reference (CPU; and CUDA where a GPU exists)."""
    from ..bench.msda import MsdaShape, run_msda_benchmark

    shape = MsdaShape(batch=batch, hidden=hidden, heads=heads, points=points, image_size=(image_size, image_size))
    results = run_msda_benchmark(shape, repeats=repeats, threads=threads, console=console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {json_out}")
