"""`lt-distill clis-regions`: CLIS's pre-defined regions from a trained detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .app import app

console = Console()


@app.command("clis-regions")
def clis_regions_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Trained detector (e.g. a baseline run's model_final.pt).")],
    shards: Annotated[str, typer.Option(help="The classification shards, the pattern the label store was made from.")],
    store: Annotated[Path, typer.Option(help="The label store (rows and hard labels).")],
    out: Annotated[Path, typer.Option(help="Regions file to write (.npz); set clis.regions to it.")],
    image_size: Annotated[int, typer.Option(help="Short side the images are resized to.")] = 800,
    max_size: Annotated[int, typer.Option(help="Longest side at most.")] = 1333,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
) -> None:
    """For every labelled classification row, the detector's highest-scoring box for the row's class
    (normalised xyxy of the original image); CLIS anchors each tile query there (whole tile when none)."""
    from ..errors import LtDistillError
    from ..pipeline.methods.clis_regions import compute_predefined_regions, file_sha256
    from ..pipeline.model import load_model
    from ..pipeline.shards import expand_shards
    from ..store import LabelReader

    if not store.exists():
        raise LtDistillError(f"label store not found: {store}")
    model = load_model(checkpoint)
    reader = LabelReader(store)
    try:
        regions, counts = compute_predefined_regions(
            model, expand_shards(shards), reader, image_size=image_size, max_size=max_size,
            batch_size=batch_size, device=device, source=f"{checkpoint} sha256:{file_sha256(checkpoint)}")
    except ValueError as exc:
        raise LtDistillError(str(exc)) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    regions.save(out)
    console.print(f"wrote {out}: {counts.get('regions', 0)} regions; skipped " +
                  ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "regions"))
