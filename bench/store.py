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
        image = torch.nn.functional.normalize(0.55 * mix + 0.45 * noise, dim=-1)
        return torch.softmax(100.0 * image @ self.text.T, dim=-1).numpy()


def _timed_reads(reader: LabelReader, rows: list[tuple[int, int]]) -> float:
    start = time.perf_counter()
    for s, p in rows:
        reader.labels(s, p)
    return len(rows) / (time.perf_counter() - start)


def run_store_benchmark(num_shards: int = 64, capacity: int = 1000, num_crops: int = 30, topk: int = 16,
                        num_reads: int = 50_000, workdir: Path | None = None, seed: int = 0,
                        console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lt-distill-bench-store-")
        workdir = Path(tmp.name)
    path = Path(workdir) / "bench.zarr"
    gen = ClipLikeLabels(seed, num_crops)
    layout = StoreLayout(num_shards=num_shards, shard_capacity=capacity, num_crops=num_crops, topk=topk,
                         num_classes=gen.num_classes)
    store = LabelStore.create(path, layout, teacher={"model": "synthetic CLIP-like generator"},
                              vocabulary=[f"class{i}" for i in range(gen.num_classes)],
                              grid_spec=f"synthetic:{num_crops}", grid_boxes=np.zeros((num_crops, 4)),
                              residual="spread", source={"generator": GENERATOR}, overwrite=True)
    kl_spread, kl_renorm, residuals, top1, entropy = [], [], [], [], []
    write_seconds, truth = 0.0, {}
    rng = np.random.default_rng(seed)
    console.print(f"writing {num_shards} shards x {capacity} images, K={num_crops}, k={topk}, "
                  f"C={gen.num_classes} ...")
    for shard in range(num_shards):
        probs = gen.draw(capacity)
        index, prob = encode_topk(probs, topk)
        if shard < 4:  # top-k loss on a sample of 4 shards (exact, full distributions)
            p = probs.reshape(-1, gen.num_classes)
            q_spread = decode_topk(index, prob, gen.num_classes, "spread").reshape(p.shape)
            kl_spread.append(kl_divergence(p, q_spread))
            kept = prob.astype(np.float64).sum(-1).ravel()
            kl_renorm.append(-np.log(np.clip(kept, 1e-12, 1.0)))  # KL(renormalised top-k || full)
            residuals.append(1.0 - kept)
            top1.append(p.max(-1))
            entropy.append(-(p * np.log(np.maximum(p, 1e-30))).sum(-1))
        result = ShardResult(
            keys=[f"n{shard:05d}_{i:06d}" for i in range(capacity)],
            sizes=rng.integers(200, 800, (capacity, 2)), hard_labels=rng.integers(-1, gen.num_classes, capacity),
            status=np.ones(capacity, np.uint8), reasons=np.zeros(capacity, np.uint8), index=index, prob=prob)
        start = time.perf_counter()
        store.write_shard(shard, result)
        write_seconds += time.perf_counter() - start
        for pos in (0, capacity // 2, capacity - 1):
            truth[(shard, pos)] = (index[pos].copy(), prob[pos].copy())
    total_images = num_shards * capacity
    size = store_bytes(path)

    reader = LabelReader(path)
    for (s, p), (want_i, want_p) in truth.items():  # correctness before speed
        got_i, got_p, valid = reader.labels(s, p)
        if not (valid and np.array_equal(got_i, want_i) and np.array_equal(got_p, want_p)):
            raise AssertionError(f"reader returned wrong labels for row ({s}, {p})")
    all_rows = [(s, p) for s in range(num_shards) for p in range(capacity)]
    random_rows = random.Random(seed).choices(all_rows, k=num_reads)
    cold = LabelReader(path, cache_bytes=0)
    _timed_reads(cold, random_rows[:2000])  # warm-up: shard indexes, file handles, row metadata
    rate_random_cold = _timed_reads(cold, random_rows)
    warm = LabelReader(path)
    rate_random = _timed_reads(warm, random_rows)
    shard_order = list(range(num_shards))
    random.Random(seed + 1).shuffle(shard_order)
    sequential_rows = [(s, p) for s in shard_order for p in range(capacity)]
    rate_sequential = _timed_reads(LabelReader(path), sequential_rows)
    zarr_rows = random_rows[:300]
    arr_i, arr_p = store.group["labels/index"], store.group["labels/prob"]
    start = time.perf_counter()
    for s, p in zarr_rows:
        arr_i[s * capacity + p], arr_p[s * capacity + p]
    rate_naive = len(zarr_rows) / (time.perf_counter() - start)

    results = {
        "shape": {"shards": num_shards, "images_per_shard": capacity, "crops_K": num_crops, "topk": topk,
                  "classes": gen.num_classes},
        "generator": GENERATOR,
        "bytes_per_image": size / total_images,
        "bytes_per_image_goal": 2048,
        "store_bytes": size,
        "write_images_per_s": total_images / write_seconds,
        "read_random_cold_cache_images_per_s": rate_random_cold,
        "read_random_images_per_s": rate_random,
        "read_shard_sequential_images_per_s": rate_sequential,
        "read_naive_zarr_images_per_s": rate_naive,
        "read_goal_images_per_s": 20_000,
        "kl_spread_mean_nats": float(np.concatenate(kl_spread).mean()),
        "kl_renormalise_mean_nats": float(np.concatenate(kl_renorm).mean()),
        "kl_goal_nats": 0.01,
        "residual_mass_mean": float(np.concatenate(residuals).mean()),
        "teacher_top1_prob_mean": float(np.concatenate(top1).mean()),
        "teacher_entropy_mean_nats": float(np.concatenate(entropy).mean()),
    }
    table = Table(title=f"bench store: {num_shards} shards x {capacity} images, K={num_crops}, k={topk}, "
                        f"C={gen.num_classes}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_row("bytes per image on disk", f"{results['bytes_per_image']:.0f}", "<= 2048")
    table.add_row("write (images/s)", f"{results['write_images_per_s']:,.0f}", "")
    table.add_row("read, random order, no chunk cache (img/s)", f"{rate_random_cold:,.0f}", ">= 20,000")
    table.add_row("read, random order, LRU chunk cache (img/s)", f"{rate_random:,.0f}", ">= 20,000")
    table.add_row("read, shard-sequential (img/s)", f"{rate_sequential:,.0f}", "")
    table.add_row("read, naive zarr indexing (img/s)", f"{rate_naive:,.0f}", "(reference)")
    table.add_row("KL(full || top-k, spread) mean (nats)", f"{results['kl_spread_mean_nats']:.4f}", "<= 0.01")
    table.add_row("KL(top-k renormalised || full) mean (nats)", f"{results['kl_renormalise_mean_nats']:.4f}",
                  "<= 0.01")
    table.add_row("residual mass mean", f"{results['residual_mass_mean']:.4f}", "")
    table.add_row("teacher top-1 prob / entropy", f"{results['teacher_top1_prob_mean']:.3f} / "
                  f"{results['teacher_entropy_mean_nats']:.3f}", "")
    console.print(table)
    console.print(f"label generator: {GENERATOR}")
    if tmp is not None:
        tmp.cleanup()
    return results
