"""Small builders shared by the store tests (imported by path: tests/ is not a package)."""

from __future__ import annotations

import numpy as np

from lt_distill.store import LabelStore, ShardResult, StoreLayout, encode_topk

NUM_CLASSES = 40
LAYOUT = StoreLayout(num_shards=6, shard_capacity=24, num_crops=5, topk=4, num_classes=NUM_CLASSES)
VOCAB = [f"class_{i}" for i in range(NUM_CLASSES)]


def make_store(path, layout: StoreLayout = LAYOUT, residual: str = "spread", **kwargs) -> LabelStore:
    boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]]), (layout.num_crops, 1))
    return LabelStore.create(path, layout, teacher={"model": "tiny-test", "weights_sha256": "0" * 64},
                             vocabulary=VOCAB[: layout.num_classes], grid_spec="test-grid", grid_boxes=boxes,
                             residual=residual, source={"pattern": "test-{0..5}.tar"}, **kwargs)


def make_result(shard: int, n: int, layout: StoreLayout = LAYOUT, failed=(), seed: int | None = None) -> ShardResult:
    rng = np.random.default_rng(shard if seed is None else seed)
    probs = rng.dirichlet(np.full(layout.num_classes, 0.2), size=(n, layout.num_crops))
    index, prob = encode_topk(probs, layout.topk)
    status = np.ones(n, np.uint8)
    reasons = np.zeros(n, np.uint8)
    for i in failed:
        status[i], reasons[i] = 2, 2
    return ShardResult(keys=[f"s{shard:03d}_{i:04d}" for i in range(n)], sizes=rng.integers(10, 500, (n, 2)),
                       hard_labels=rng.integers(-1, layout.num_classes, n), status=status, reasons=reasons,
                       index=index, prob=prob)
