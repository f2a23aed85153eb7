"""``lt-distill eval``: score a detections file, or run a checkpoint over an annotation file and score it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ...errors import LtDistillError
from ...pipeline.evaluate import Format, annotation_format, evaluate_detections, evaluate_model, load_annotations
from .runtime import cleanup, init_distributed, resolve_amp


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    detections: Path | None
    num_images: int
    format: str


def category_ids_for(ckpt: dict[str, Any], gt: dict[str, Any], num_classes: int) -> list[int]:
    """Dataset category id of every class index of a checkpoint's model: the checkpoint's own
    ``categories`` (training order) when it has them, else the annotation file's ids in sorted order."""
    if "categories" in ckpt:
        ids = [int(c["id"]) for c in ckpt["categories"]]
    else:
        ids = sorted(int(c["id"]) for c in gt["categories"])
    if len(ids) != num_classes:
        raise LtDistillError(f"the model has {num_classes} classes but {len(ids)} category ids are known "
                             "(checkpoint without 'categories' evaluated on a different category list?)")
    return ids


def eval_image_size(ckpt: dict[str, Any]) -> tuple[int, int]:
    """Test-time short side / long-side cap: the largest training scale of the checkpoint's data config
    (DETR evaluates at 800 / 1333), or 800 / 1333 when the checkpoint has no data config."""
    data = ckpt["config"].get("data") if isinstance(ckpt.get("config"), dict) else None
    if isinstance(data, dict) and isinstance(data.get("det_aug"), dict):
        aug = data["det_aug"]
        return int(max(aug.get("scales", [800]))), int(aug.get("max_size", 1333))
    return 800, 1333


def evaluate_checkpoint(
    checkpoint: str | Path,
    annotations: str | Path,
    images: str | Path,
    out: str | Path | None = None,
    device: str = "auto",
    amp: str = "off",
    batch_size: int = 2,
    image_size: int | None = None,
    max_size: int | None = None,
    max_images: int = 0,
    fmt: Format = "auto",
) -> EvalResult | None:
    """Run the checkpoint's detector over ``annotations``/``images`` (one shard per rank under
    torchrun; rank 0 merges from disk) and score it. Writes the detections to ``out`` (default:
    ``detections.json`` next to the checkpoint). Returns the result on rank 0, None elsewhere."""
    from ...pipeline.data.config import DataConfig
    from ...pipeline.model import PostProcess, load_checkpoint, load_model, model_config_from_checkpoint

    info = init_distributed(device)
    try:
        ckpt = load_checkpoint(checkpoint)
        gt = load_annotations(annotations)
        model = load_model(checkpoint, info.device)
        cfg = model_config_from_checkpoint(ckpt)
        category_ids = category_ids_for(ckpt, gt, model.num_classes)
        default_size, default_max = eval_image_size(ckpt)
        data = ckpt["config"].get("data") if isinstance(ckpt["config"], dict) else None
        mean, std = (tuple(data["pixel_mean"]), tuple(data["pixel_std"])) if isinstance(data, dict) \
            and "pixel_mean" in data else (DataConfig.pixel_mean, DataConfig.pixel_std)
        out_path = Path(out) if out else Path(checkpoint).with_name("detections.json")
        del ckpt
        metrics, dets_path = evaluate_model(
            model, PostProcess(cfg.num_select), annotations, images, category_ids,
            out_dir=out_path.parent / (out_path.stem + "_ranks"), device=info.device,
            image_size=image_size or default_size, max_size=max_size or default_max, batch_size=batch_size,
            max_images=max_images, amp_dtype=resolve_amp(amp, info.device), pixel_mean=mean, pixel_std=std,
            fmt=fmt,
        )
        if not info.is_main:
            return None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        dets_path.replace(out_path)
        if not any(dets_path.parent.iterdir()):  # the per-rank scratch folder, now empty
            dets_path.parent.rmdir()
        num_images = max_images or len(gt["images"])
        return EvalResult(metrics, out_path, min(num_images, len(gt["images"])), _format_of(gt, fmt))
    finally:
        cleanup(info)


def evaluate_file(detections: str | Path, annotations: str | Path, fmt: Format = "auto") -> EvalResult:
    gt = load_annotations(annotations)
    metrics = evaluate_detections(gt, detections, fmt)
    return EvalResult(metrics, Path(detections), len(gt["images"]), _format_of(gt, fmt))


def _format_of(gt: dict[str, Any], fmt: str) -> str:
    return annotation_format(gt) if fmt == "auto" else fmt


def write_metrics_json(path: str | Path, result: EvalResult, extra: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": result.metrics, "format": result.format, "num_images": result.num_images,
               "detections": str(result.detections) if result.detections else None, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2))
