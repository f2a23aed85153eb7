"""PNG plots of a training run (``lt-distill report RUN_DIR``).

* ``losses.png``: the total loss and every final-layer loss term over iterations, per batch source
  (detection / classification), raw and smoothed;
* ``training.png``: learning rate, throughput (images/s) and data-loading time;
* ``ap_groups.png``: AP, APr, APc, APf of the evaluations (bars for the last one, curves over
  iterations when there are several);
* ``label_store.png`` (when given a store): top-1 probability and residual mass of the cached
  labels, row status, and how often each class is the teacher's top-1 on whole images.

Input: the run's ``metrics.jsonl`` (see ``stages.train.monitor``) and optional ``eval.json``.

Several runs side by side (``lt-distill report RUN_A RUN_B ...``): ``compare.png``, grouped bars of AP,
APr, APc, APf per run (each run's final ``eval.json``), and ``compare.json`` with the same numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

from ..errors import LtDistillError

AP_GROUPS = ("AP", "APr", "APc", "APf")
GROUP_COLOURS = {"AP": "#555555", "APr": "#d62728", "APc": "#ff7f0e", "APf": "#2ca02c"}
# Loss terms of earlier decoder layers / encoder / denoising end in _0, _1, _enc, _dn...: not plotted.
_AUX_TERM = re.compile(r"_(\d+|enc)$|_dn(_\d+)?$")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 3 or window < 2:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_losses(records: list[dict[str, Any]], out: Path) -> Path | None:
    train = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    if not train:
        return None
    terms = ["loss"] + sorted(k for k in train[0] if k.startswith("loss_") and not _AUX_TERM.search(k))
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    sources = sorted({r.get("source", "all") for r in train})
    for ax, term in zip(axes.flat, terms):
        values = []
        for source in sources:
            pts = [(r["iter"], r[term]) for r in train if r.get("source", "all") == source and term in r]
            if not pts:
                continue
            it, val = map(np.asarray, zip(*pts))
            values.append(val)
            line, = ax.plot(it, val, alpha=0.3, lw=0.8)
            ax.plot(it, _smooth(val, max(len(val) // 20, 1)), color=line.get_color(), lw=1.8, label=source)
        flat = np.concatenate(values) if values else np.ones(1)
        if flat.min() > 0 and flat.max() / flat.min() > 50:  # early losses of a fresh detector dwarf the rest
            ax.set_yscale("log")
        ax.set_title(term)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_training(records: list[dict[str, Any]], out: Path) -> Path | None:
    train = [r for r in records if r.get("kind", "train") == "train"]
    keys = [k for k in ("lr", "images_per_s", "data_time") if any(k in r for r in train)]
    if not keys:
        return None
    fig = Figure(figsize=(5 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["iter"], r[key]) for r in train if key in r]
        it, val = map(np.asarray, zip(*pts))
        ax.plot(it, val, lw=1.2)
        ax.set_title({"lr": "learning rate", "images_per_s": "images / s", "data_time": "data time (s / iter)"}[key])
        ax.set_xlabel("iteration")
        if key == "lr":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_ap_groups(evals: list[dict[str, Any]], out: Path) -> Path | None:
    """``evals``: metric dicts with ``iter`` (optional) and AP keys in [0, 1] (-1 = no such classes)."""
    evals = [e for e in evals if "AP" in e]
    if not evals:
        return None
    groups = [g for g in AP_GROUPS if g in evals[-1]]
    ncols = 2 if len(evals) > 1 else 1
    fig = Figure(figsize=(5.5 * ncols, 3.6))
    axes = fig.subplots(1, ncols, squeeze=False)
    last = evals[-1]
    values = [100 * last[g] if last[g] >= 0 else 0.0 for g in groups]
    bars = axes[0, 0].bar(groups, values, color=[GROUP_COLOURS[g] for g in groups])
    for bar, g in zip(bars, groups):
        label = f"{100 * last[g]:.1f}" if last[g] >= 0 else "n/a"
        axes[0, 0].annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    title = "box AP by frequency group" + (f" (iter {last['iter']})" if "iter" in last else "")
    axes[0, 0].set_title(title)
    axes[0, 0].set_ylabel("AP (%)")
    if ncols == 2:
        ax = axes[0, 1]
        for g in groups:
            pts = [(e.get("iter", i), 100 * e[g]) for i, e in enumerate(evals) if e.get(g, -1) >= 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=g, color=GROUP_COLOURS[g])
        ax.set_xlabel("iteration")
        ax.set_ylabel("AP (%)")
        ax.set_title("AP over training")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_label_store(store_path: str | Path, out: Path, max_rows: int = 100_000) -> Path:
    """Statistics of the cached labels of a store's done rows (a random sample of ``max_rows``)."""
    from ..store import REASONS, STATUS_DONE, STATUS_FAILED, STATUS_MISSING, LabelStore

    store = LabelStore.open(store_path, "r")
    group = store.group
    status = group["rows/status"][:]
    done = np.nonzero(status == STATUS_DONE)[0]
    if len(done) > max_rows:
        done = np.sort(np.random.default_rng(0).choice(done, max_rows, replace=False))
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    names = store.attrs["vocabulary"]["names"]
    if len(done):
        index = group["labels/index"].get_orthogonal_selection((done, slice(None), slice(None)))
        prob = group["labels/prob"].get_orthogonal_selection((done, slice(None), slice(None))).astype(np.float32)
        axes[0, 0].hist(prob[:, :, 0].ravel(), bins=40, color="#1f77b4")
        axes[0, 0].set_title(f"top-1 probability (all {prob.shape[1]} crops)")
        axes[0, 1].hist(np.clip(1 - prob.sum(-1), 0, 1).ravel(), bins=40, color="#9467bd")
        axes[0, 1].set_title(f"residual mass outside the top-{prob.shape[2]}")
        counts = np.bincount(index[:, 0, 0].astype(np.int64), minlength=len(names))
        order = np.argsort(-counts)
        axes[1, 1].bar(np.arange(len(names)), counts[order], width=1.0, color="#2ca02c")
        axes[1, 1].set_title("teacher top-1 class on the whole image (sorted)")
        axes[1, 1].set_xlabel("class rank")
        if len(names) <= 40:
            axes[1, 1].set_xticks(np.arange(len(names)), [names[i] for i in order], rotation=90, fontsize=6)
    failed = status == STATUS_FAILED
    reasons = group["rows/reason"][:][failed]
    labels = ["done", "missing"] + [f"failed: {REASONS.get(int(c), c)}" for c in np.unique(reasons)]
    values = [int((status == STATUS_DONE).sum()), int((status == STATUS_MISSING).sum())] + [
        int((reasons == c).sum()) for c in np.unique(reasons)]
    axes[1, 0].barh(labels, values, color="#7f7f7f")
    axes[1, 0].set_title("rows by status")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"label store {Path(store_path).name}: {int((status == STATUS_DONE).sum())} images done")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def write_report(run_dir: str | Path, store: str | Path | None = None, out_dir: str | Path | None = None
                 ) -> list[Path]:
    """All plots of a run directory (``metrics.jsonl``, optional ``eval.json``) into ``out_dir``
    (default ``<run_dir>/plots``); returns the files written."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file() and store is None:
        raise LtDistillError(f"{run} has no metrics.jsonl (is it a training output directory?)")
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    records = _read_jsonl(metrics) if metrics.is_file() else []
    evals = [r for r in records if r.get("kind") == "eval"]
    final_eval = run / "eval.json"
    if final_eval.is_file():
        final = json.loads(final_eval.read_text())
        metrics_final = final.get("metrics", final)
        if not evals or any(evals[-1].get(k) != metrics_final.get(k) for k in AP_GROUPS):
            evals.append({**metrics_final, **({"iter": final["iter"]} if "iter" in final else {})})
    for path in (plot_losses(records, out / "losses.png"), plot_training(records, out / "training.png"),
                 plot_ap_groups(evals, out / "ap_groups.png")):
        if path is not None:
            written.append(path)
    if store is not None:
        written.append(plot_label_store(store, out / "label_store.png"))
    return written


def run_label(run_dir: Path) -> str:
    """``<dir name> (<method>)`` from a run's ``config.json`` (just the name without one)."""
    config = run_dir / "config.json"
    method = json.loads(config.read_text()).get("method") if config.is_file() else None
    return f"{run_dir.name} ({method})" if method and method not in run_dir.name else run_dir.name


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The AP metrics of a run's final evaluation (``eval.json``)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        raise LtDistillError(f"{run_dir} has no eval.json (evaluate the run first: eval.every or lt-distill eval)")
    final = json.loads(path.read_text())
    return final.get("metrics", final)


def plot_comparison(runs: dict[str, dict[str, float]], out: Path) -> Path:
    """Grouped bars: one group per AP key (AP, APr, APc, APf), one bar per run; ``runs`` label -> metrics
    in [0, 1] (-1 = no such classes, drawn as 0 and labelled n/a)."""
    if not runs:
        raise LtDistillError("no runs to compare")
    labels = list(runs)
    groups = [g for g in AP_GROUPS if all(g in m for m in runs.values())]
    width = 0.8 / len(labels)
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(len(labels), 2) / 2), 4.0))
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        raw = [runs[label][g] for g in groups]
        bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, [100 * v if v >= 0 else 0.0 for v in raw],
                      width, label=label)
        for bar, v in zip(bars, raw):
            text = "n/a" if v < 0 else f"{100 * v:.1f}" if 100 * v >= 10 else f"{100 * v:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(x, groups)
    ax.set_ylabel("AP (%)")
    ax.set_title("box AP by frequency group, per run")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def write_comparison(runs: dict[str, Path] | list[Path], out: str | Path) -> Path:
    """``compare.png`` (at ``out``) and ``compare.json`` beside it for several runs; ``runs``: label -> run
    directory, or directories (labelled by :func:`run_label`)."""
    if not isinstance(runs, dict):
        runs = {run_label(Path(r)): Path(r) for r in runs}
    metrics = {label: final_metrics(Path(run)) for label, run in runs.items()}
    out = Path(out)
    path = plot_comparison(metrics, out)
    table = {label: {g: m[g] for g in AP_GROUPS if g in m} for label, m in metrics.items()}
    out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    return path
