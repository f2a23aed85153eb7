"""Training logs: JSON lines, TensorBoard scalars and a rich progress bar with ETA (rank 0 only).

``<output_dir>/metrics.jsonl`` gets one record per logged iteration, e.g.::

    {"iter": 200, "kind": "train", "lr": 1e-4, "loss": 12.3, "loss_ce": 0.8, ..., "images_per_s": 6.1,
     "data_time": 0.01, "iter_time": 0.33}

and one ``"kind": "eval"`` record per evaluation (the metrics of ``pipeline.evaluate``). On resume,
records after the resumed iteration (written by the interrupted run) are dropped so every iteration
appears once; TensorBoard purges them the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (or of ``<run_dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


class TrainMonitor:
    def __init__(self, output_dir: str | Path, max_iters: int, start_iter: int = 0, enabled: bool = True,
                 tensorboard: bool = True, progress: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.progress = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / METRICS_FILE
        self._truncate_after(start_iter)
        self.file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and rank 0 only

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_iter or None)
        if progress:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console or Console(stderr=True),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=max_iters, completed=start_iter, info="")
            self.progress.start()

    def _truncate_after(self, start_iter: int) -> None:
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("iter", 0) <= start_iter]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, iteration: int, record: dict[str, Any], kind: str = "train") -> None:
        """Append one record (scalars only) and mirror it to TensorBoard as ``<kind>/<key>``."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in record.items()}
        self.file.write(json.dumps({"iter": iteration, "kind": kind, **clean}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, iteration)

    def advance(self, iteration: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration, info=info)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        self.file.close()
