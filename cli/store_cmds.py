"""`lt-distill store info|verify|stats` and `lt-distill bench store`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..store import store_info, store_stats, verify_store
from .app import bench_app, store_app

console = Console()
StorePath = Annotated[Path, typer.Argument(help="Path of the label store (a Zarr v3 group).")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON to this file.")]


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
        console.print(f"wrote {path}")


@store_app.command("info")
def info_cmd(store: StorePath, json_out: JsonOut = None) -> None:
    """Attributes, array shapes, and rows done / failed / missing."""
    info = store_info(store)
    attrs = info["attributes"]
    table = Table(title=f"label store {store}", show_header=False)
    table.add_row("format", f"{attrs['format']['name']} v{attrs['format']['version']}")
    table.add_row("layout", ", ".join(f"{k}={v}" for k, v in attrs["layout"].items()))
    table.add_row("teacher", json.dumps(attrs.get("teacher", {}))[:300])
    table.add_row("vocabulary", f"{attrs['vocabulary']['num_names']} classes, sha256 {attrs['vocabulary']['sha256'][:16]}…")
    mirror = ", + a mirror row per box (flip labels)" if attrs["grid"].get("flip_labels") else ""
    table.add_row("grid", f"{attrs['grid']['spec']} ({attrs['grid']['num_boxes']} boxes{mirror})")
    table.add_row("encoding", ", ".join(f"{k}={v}" for k, v in attrs["encoding"].items()
                                        if k not in ("probabilities", "embedding")))
    emb = attrs["encoding"].get("embedding")
    if emb:
        table.add_row("embedding", f"D={emb['dim']} {emb['dtype']}, logit_scale={emb['logit_scale']:.4g}, "
                                   f"temperature={emb['temperature']:g}, "
                                   + (f"classifier head {json.dumps(emb['head'])}" if "head" in emb
                                      else f"text tower {json.dumps(emb['text_tower'])}"))
    table.add_row("source", json.dumps(attrs.get("source", {}))[:300])
    table.add_row("shards", f"{info['shards']['done']} / {info['shards']['total']} done (files present; "
                  "`store verify` checks every chunk)")
    for shard, problem in info["damaged_shards"].items():
        table.add_row(f"  damaged shard {shard}", problem)
    table.add_row("rows", ", ".join(f"{k} {v}" for k, v in info["rows"].items()))
    if info["failed_by_reason"]:
        table.add_row("failed by reason", ", ".join(f"{k} {v}" for k, v in info["failed_by_reason"].items()))
    if "objects" in info:
        table.add_row("objects", f"{info['objects']['done']} / {info['objects']['num_objects']} done")
    table.add_row("bytes on disk", f"{info['bytes_on_disk']:,}")
    for name, shape in info["arrays"].items():
        table.add_row(f"  {name}", str(tuple(shape)))
    console.print(table)
    _write_json(json_out, info)


@store_app.command("verify")
def verify_cmd(store: StorePath) -> None:
    """Check every row and attribute; exit 1 on any inconsistency."""
    problems = verify_store(store)
    if problems:
        for p in problems:
            console.print(f"[red]problem[/red] {p}")
        console.print(f"{store}: {len(problems)} problem(s)")
        raise typer.Exit(1)
    console.print(f"{store}: OK")


@store_app.command("stats")
def stats_cmd(store: StorePath, json_out: JsonOut = None,
              top: Annotated[int, typer.Option(help="How many frequent top-1 classes to list.")] = 10) -> None:
    """Bytes per image on disk, mean label entropy, most frequent top-1 classes."""
    stats = store_stats(store, top=top)
    table = Table(title=f"label store statistics: {store}", show_header=False)
    for key in ("images_done", "bytes_on_disk", "bytes_per_image", "encoding", "mean_entropy_nats", "mean_residual_mass",
                "mean_top1_prob", "residual_policy", "embedding_dim", "embedding_dtype", "mean_embedding_norm",
                "mean_quantisation_step", "embedding_mean_entropy_nats"):
        if key in stats:
            value = stats[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for item in stats.get("top1_classes", stats.get("embedding_top1_classes", [])):
        table.add_row(f"  top-1 {item['name']}", str(item["count"]))
    console.print(table)
    _write_json(json_out, stats)


@bench_app.command("store")
def bench_store_cmd(
    json_out: JsonOut = None,
    shards: Annotated[int, typer.Option(help="Source shards in the benchmark store.")] = 64,
    capacity: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    crops: Annotated[int, typer.Option(help="Grid crops per image (K).")] = 30,
    topk: Annotated[int, typer.Option(help="Classes kept per crop (k).")] = 16,
    reads: Annotated[int, typer.Option(help="Random single-image reads to time.")] = 50_000,
    workdir: Annotated[Optional[Path], typer.Option(help="Where to write the store (default: a temp dir).")] = None,
    seed: int = 0,
    real_photos: Annotated[str, typer.Option(
        help="Photos for the real teacher's top-k KL rows: skimage, coco8, a folder ('none': skip).")] = "skimage",
    embedding: Annotated[bool, typer.Option(help="Also measure the embedding encoding (bytes for each D and "
                                            "dtype, KL of int8/fp16, read rate, decode cost).")] = True,
    embed_dims: Annotated[str, typer.Option(help="Embedding widths D to size, comma-separated.")] = "512,1024",
    embed_shards: Annotated[int, typer.Option(help="Shards of each embedding store (of --capacity images; "
                                              "int8 D=512 is 15 KB per image).")] = 4,
    step_time: Annotated[bool, typer.Option(help="Time a tiny-preset training step to compare the decode "
                                            "cost with.")] = True,
) -> None:
    """Write a store of realistic shape with CLIP-like labels; time writes and reads; measure size and KL; the
    same for the embedding encoding; top-k KL for k = 8, 16, 32 on the synthetic and a real teacher's
    distributions."""
    from ..bench.store import run_store_benchmark

    embed = {"num_shards": embed_shards, "capacity": capacity, "num_reads": min(reads, 20_000),
             "dims": tuple(int(d) for d in embed_dims.split(",") if d.strip()), "step_time": step_time,
             "classifier_photos": None if real_photos == "none" else real_photos} \
        if embedding else None
    results = run_store_benchmark(num_shards=shards, capacity=capacity, num_crops=crops, topk=topk,
                                  num_reads=reads, workdir=workdir, seed=seed, console=console, embedding=embed,
                                  real_photos=None if real_photos == "none" else real_photos)
    _write_json(json_out, results)
