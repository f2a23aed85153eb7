"""`lt-distill shards`: WebDataset shards from class folders, Detic's image-info JSON or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .app import app

console = Console()


@app.command("shards")
def shards_cmd(
    input: Annotated[Path, typer.Argument(help="folders/images: the root folder; detic: the image-info JSON.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the shards and manifest.json.")],
    kind: Annotated[str, typer.Option("--kind", help="folders (ROOT/[split/]n########/*.JPEG), detic (Detic's "
                                      "imagenet_lvis_image_info.json) or images (a COCO/LVIS image folder, "
                                      "no class).")] = "folders",
    image_root: Annotated[str, typer.Option("--image-root", help="detic: folder the JSON's file_name values are "
                                            "relative to (default: the JSON's folder).")] = "",
    class_list: Annotated[str, typer.Option("--class-list", help="Write .cls = the wnid's index in this list "
                                            "(imagenet21k-winter21, imagenet21k-fall11, ... or a file); "
                                            "without it only .json carries the wnid.")] = "",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard.")] = 1000,
    prefix: Annotated[str, typer.Option("--prefix", help="Shard file names: PREFIX-000000.tar ...")] = "shard",
    seed: Annotated[int, typer.Option("--seed", help="Shuffle of the image order (-1: sorted order).")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Processes writing shards (0: this machine's "
                                         "CPUs).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """Write .jpg + .cls + .json WebDataset shards of a fixed size, in parallel and resumably (rerun the
    same command after an interruption), with manifest.json (per-shard counts and class histograms, the
    files that could not be read) that precompute uses instead of counting the shards."""
    from ..stages.shards import ShardsConfig, make_shards
    from ..workers import available_cpus

    cfg = ShardsConfig(input=str(input), out=str(out), kind=kind, image_root=image_root, class_list=class_list,
                       shard_size=shard_size, prefix=prefix, seed=seed, workers=workers or available_cpus(),
                       progress=progress)
    make_shards(cfg, log=lambda line: console.print(line, soft_wrap=True, highlight=False))
