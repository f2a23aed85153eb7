"""`lt-distill inspect`: draw one classification image with its crop grid and each crop's top classes.

One panel per grid level (scale), so that overlapping boxes of different scales stay readable; each box
is labelled with the top classes of its cached soft label and their probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import LtDistillError
from ..pipeline.grid import GridSpec
from ..pipeline.shards import IMAGE_EXTS, expand_shards, iter_tar_samples
from ..pipeline.teacher import decode_image
from ..store import REASONS, LabelReader


def read_sample_image(url: str, key: str) -> np.ndarray:
    """Decode the image of sample ``key`` in shard ``url``."""
    for raw in iter_tar_samples(url):
        if raw.key == key:
            ext = next((e for e in IMAGE_EXTS if e in raw.fields), None)
            if ext is None:
                raise LtDistillError(f"sample {key!r} in {url} has no image member")
            return decode_image(raw.fields[ext])
    raise LtDistillError(f"sample {key!r} is not in shard {url}")


def render_labels(store: str | Path, shards: str, key: str, out: str | Path, top: int = 3) -> Path:
    """Write a PNG of sample ``key``: its image, grid boxes and the ``top`` classes of every crop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reader = LabelReader(store)
    attrs = reader.attrs
    try:
        shard, pos = reader.locate(key)
    except KeyError:
        raise LtDistillError(f"label store {store} has no sample with key {key!r}") from None
    urls = expand_shards(shards)
    if len(urls) != reader.layout.num_shards:
        raise LtDistillError(f"--shards names {len(urls)} shards but the store was made from "
                             f"{reader.layout.num_shards} ({attrs['source'].get('pattern')})")
    image = read_sample_image(urls[shard], key)
    index, prob, valid = reader.top_labels(shard, pos, max(top, 1))  # embedding stores: decoded
    rows = reader.shard_rows(shard)
    names = attrs["vocabulary"]["names"]
    grid = GridSpec.parse(attrs["grid"]["spec"])
    boxes = np.asarray(attrs["grid"]["boxes"], dtype=np.float64)
    h, w = image.shape[:2]
    hard = int(rows.hard_labels[pos])
    title = f"{key}  (shard {shard}, row {pos})  hard label: {names[hard] if hard >= 0 else 'none'}"
    if not valid:
        title += f"  FAILED: {REASONS.get(int(rows.reasons[pos]), '?')}"

    levels = len(grid.levels)
    fig, axes = plt.subplots(1, levels, figsize=(4.2 * levels, 4.6), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    start = 0
    for ax, (scale, n) in zip(axes[0], grid.levels):
        ax.imshow(image)
        ax.set_title(f"scale {scale:g}: {n}x{n} crops", fontsize=9)
        ax.set_axis_off()
        fontsize = max(4.0, 9.0 - 1.2 * n)
        for j in range(start, start + n * n):
            x0, y0, x1, y1 = boxes[j] * [w, h, w, h]
            colour = colours[(j - start) % len(colours)]
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2))
            if valid:
                text = "\n".join(f"{names[int(c)]} {float(p):.2f}" for c, p in zip(index[j][:top], prob[j][:top])
                                 if c >= 0)
                ax.text(x0 + 2, y0 + 2, text, fontsize=fontsize, va="top", ha="left", color="white",
                        bbox={"facecolor": colour, "alpha": 0.6, "pad": 1, "linewidth": 0})
        start += n * n
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
