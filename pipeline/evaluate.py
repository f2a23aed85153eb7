"""Detection evaluation: LVIS JSON -> the official lvis-api, COCO JSON -> pycocotools.

Detections are the usual results list, one dict per box::

    {"image_id": int, "category_id": int, "bbox": [x, y, w, h] (pixels), "score": float}

:func:`evaluate_detections` scores such a list (or a JSON file of it) against an annotation file
and returns a flat dict of metrics (``AP, AP50, AP75, APs, APm, APl`` and, for LVIS, ``APr, APc,
APf``; AP values in [0, 1], ``-1`` where a group has no ground truth, as both evaluators report).
LVIS protocol: at most 300 detections per image (lvis-api keeps the 300 best) and a score
threshold of 1e-4 applied when detections are produced (:func:`predictions_to_detections`).

lvis-api 0.5.3 (the PyPI release) still calls ``np.float``, which NumPy 1.24 removed. Rather than
putting the alias back into NumPy for every caller, :class:`LVISEvalCompat` re-binds the methods of
``LVISEval`` to a private module namespace in which ``np`` is a view of NumPy that also carries the
removed aliases; NumPy itself and the ``lvis`` package are left untouched.

Under ``torchrun`` every rank writes its own detections file (:func:`write_rank_detections`) and
rank 0 merges them from disk (:func:`merge_rank_detections`), so no rank ever holds every other
rank's detections in memory through a collective.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import types
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
from lvis import LVIS, LVISEval, LVISResults
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..config import read_json_file
from ..errors import LtDistillError

MAX_DETS_PER_IMAGE = 300
SCORE_THRESHOLD = 1e-4
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300")
Format = Literal["auto", "lvis", "coco"]


class EvaluationError(LtDistillError):
    """Annotation or detection files that cannot be evaluated (missing, malformed, inconsistent)."""


# ---------------------------------------------------------------------------------------------
# lvis-api on NumPy 2
# ---------------------------------------------------------------------------------------------

class _NumpyWithAliases(types.ModuleType):
    """A read-only view of NumPy plus the builtin-type aliases NumPy 1.24 removed (``np.float`` ...)."""

    def __init__(self) -> None:
        super().__init__("numpy")
        for name, builtin in {"float": float, "int": int, "bool": bool, "object": object,
                              "str": str, "complex": complex}.items():
            setattr(self, name, builtin)

    def __getattr__(self, name: str) -> Any:  # only called for names not set above
        return getattr(np, name)


def _rebind_numpy(fn: types.FunctionType, numpy_view: types.ModuleType) -> types.FunctionType:
    """A copy of ``fn`` whose global ``np`` is ``numpy_view`` (other globals: those of ``fn``'s module)."""
    namespace = dict(fn.__globals__)
    namespace["np"] = numpy_view
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__doc__ = fn.__doc__
    new.__qualname__ = fn.__qualname__
    return new


class LVISEvalCompat(LVISEval):
    """``lvis.LVISEval`` whose methods see NumPy with the removed aliases; results are identical."""


_NUMPY_VIEW = _NumpyWithAliases()
for _name, _member in vars(LVISEval).items():
    if isinstance(_member, types.FunctionType):
        setattr(LVISEvalCompat, _name, _rebind_numpy(_member, _NUMPY_VIEW))


class _LVISFromDict(LVIS):
    """``lvis.LVIS`` built from an already-loaded annotation dict (the upstream class takes a path)."""

    def __init__(self, dataset: dict[str, Any]):
        self.logger = logging.getLogger("lvis.lvis")
        self.dataset = dataset
        self._create_index()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def load_annotations(path: str | Path) -> dict[str, Any]:
    """Read a COCO/LVIS annotation JSON; :class:`EvaluationError` when missing or malformed."""
    data = read_json_file(path, "annotation file", EvaluationError)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise EvaluationError(f"annotation file {path} lacks {', '.join(missing)} (not COCO/LVIS format)")
    return data


def load_detections(path: str | Path) -> list[dict[str, Any]]:
    """Read a detections JSON (a list of result dicts)."""
    data = read_json_file(path, "detections file", EvaluationError)
    if not isinstance(data, list):
        raise EvaluationError(f"detections file {path} must hold a JSON list of detections")
    return data


def annotation_format(gt: dict[str, Any]) -> Literal["lvis", "coco"]:
    """``"lvis"`` when categories carry a frequency group and images their federated label lists."""
    cats, imgs = gt.get("categories", []), gt.get("images", [])
    is_lvis = bool(cats) and all("frequency" in c for c in cats) and all(
        "neg_category_ids" in im and "not_exhaustive_category_ids" in im for im in imgs)
    return "lvis" if is_lvis else "coco"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _box_problem(bbox: Any) -> str | None:
    """Why ``bbox`` is not an [x, y, w, h] of four finite numbers with w, h >= 0 (None when it is)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox must be [x, y, w, h], got {bbox!r}"
    if not all(_is_number(v) for v in bbox):
        return f"bbox must hold four finite numbers, got {bbox!r}"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"bbox has a negative width or height: {bbox!r}"
    return None


def check_annotations(gt: dict[str, Any]) -> None:
    """Refuse an annotation dict an evaluator would misread: no images, ids that are not integers,
    annotations missing fields or with a box that is not four finite numbers of non-negative size."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"annotations: '{key}' must be a list")
    if not gt["images"]:
        raise EvaluationError("annotations: the file lists no images")
    for key in ("images", "categories"):
        for i, item in enumerate(gt[key]):
            if not isinstance(item, dict) or not _is_int(item.get("id")):
                raise EvaluationError(f"annotations: {key}[{i}] needs an integer 'id', got {item!r:.120}")
    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, a in enumerate(gt["annotations"]):
        if not isinstance(a, dict):
            raise EvaluationError(f"annotations[{i}] must be an object, got {a!r:.120}")
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in a]
        if missing:
            raise EvaluationError(f"annotations[{i}] lacks {', '.join(missing)}")
        for k in ("id", "image_id", "category_id"):
            if not _is_int(a[k]):
                raise EvaluationError(f"annotations[{i}]: {k} must be an integer, got {a[k]!r:.80}")
        if a["image_id"] not in img_ids:
            raise EvaluationError(f"annotations[{i}]: image_id {a['image_id']} is not among the images")
        if a["category_id"] not in cat_ids:
            raise EvaluationError(f"annotations[{i}]: category_id {a['category_id']} is not among the categories")
        problem = _box_problem(a["bbox"])
        if problem:
            raise EvaluationError(f"annotations[{i}] (id {a['id']}): {problem}")


def _check_detections(gt: dict[str, Any], dets: list[dict[str, Any]]) -> None:
    """Refuse detections that would be scored wrongly: NaN/inf or negative scores, boxes that are not
    four finite numbers of non-negative size, ids that are not integers of the annotations."""
    img_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, d in enumerate(dets):
        if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(d):
            raise EvaluationError(f"detection {i} must have image_id, category_id, bbox and score: {d!r:.200}")
        problem = _box_problem(d["bbox"])
        if problem:
            raise EvaluationError(f"detection {i}: {problem}")
        if not _is_number(d["score"]) or d["score"] < 0:
            raise EvaluationError(f"detection {i}: score must be a finite number >= 0, got {d['score']!r:.80}")
        for k in ("image_id", "category_id"):
            if not _is_int(d[k]):
                raise EvaluationError(f"detection {i}: {k} must be an integer, got {d[k]!r:.80}")
        if d["image_id"] not in img_ids:
            raise EvaluationError(f"detection {i}: image_id {d['image_id']} is not in the annotations")
        if d["category_id"] not in cat_ids:
            raise EvaluationError(f"detection {i}: category_id {d['category_id']} is not in the annotations")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def evaluate_detections(
    annotations: str | Path | dict[str, Any],
    detections: str | Path | list[dict[str, Any]],
    fmt: Format = "auto",
) -> dict[str, float]:
    """Box AP of ``detections`` against ``annotations`` with the official evaluator of the format.

    Returns ``{"AP": .., "AP50": .., ...}`` (keys :data:`LVIS_KEYS` or :data:`COCO_KEYS`) as plain
    floats. The inputs are not modified. With no detections at all every metric is 0.
    """
    gt = annotations if isinstance(annotations, dict) else load_annotations(annotations)
    dets = detections if isinstance(detections, list) else load_detections(detections)
    kind = annotation_format(gt) if fmt == "auto" else fmt
    if kind == "lvis" and annotation_format(gt) != "lvis":
        raise EvaluationError("annotations are not LVIS format (categories need 'frequency', images "
                              "'neg_category_ids' and 'not_exhaustive_category_ids')")
    check_annotations(gt)
    _check_detections(gt, dets)
    keys = LVIS_KEYS if kind == "lvis" else COCO_KEYS
    if not dets:
        warnings.warn("no detections to evaluate: every metric is 0", stacklevel=2)
        return {k: 0.0 for k in keys}
    dets = copy.deepcopy(dets)  # both evaluators add fields (id, area, segmentation) to the dicts
    return evaluate_lvis(gt, dets) if kind == "lvis" else evaluate_coco(gt, dets)


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    """Raise one logger's level for the duration of the block, then restore it."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def evaluate_lvis(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, float]:
    """lvis-api box evaluation (300 detections per image); ``dets`` is consumed (modified)."""
    lvis_gt = _LVISFromDict(copy.deepcopy(gt))
    with warnings.catch_warnings(), _quiet_logger("lvis.results"):
        # lvis-api warns (through the deprecated Logger.warn) whenever results come as a list.
        warnings.simplefilter("ignore", DeprecationWarning)
        lvis_dt = LVISResults(lvis_gt, dets, max_dets=MAX_DETS_PER_IMAGE)
        evaluator = LVISEvalCompat(lvis_gt, lvis_dt, iou_type="bbox")
        evaluator.run()
    results = evaluator.get_results()
    return {k: float(results[k]) for k in LVIS_KEYS}


def evaluate_coco(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, float]:
    """pycocotools box evaluation (its default 1/10/100 detections per image); ``dets`` is consumed."""
    gt = copy.deepcopy(gt)
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)  # LVIS-style files have no crowd flag; pycocotools needs one
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(COCO_KEYS, evaluator.stats)}


def format_metric(value: float) -> str:
    """``0.2531`` -> ``"25.31"`` (AP in percent); ``-1`` (no ground truth in the group) -> ``"-"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
        return "-"
    return f"{100 * value:.2f}"


# ---------------------------------------------------------------------------------------------
# Producing detections
# ---------------------------------------------------------------------------------------------

def predictions_to_detections(
    image_ids: Iterable[int],
    predictions: list[dict[str, torch.Tensor]],
    category_ids: list[int],
    score_threshold: float = SCORE_THRESHOLD,
    max_dets: int = MAX_DETS_PER_IMAGE,
) -> list[dict[str, Any]]:
    """Post-processor outputs -> result dicts.

    ``predictions[i]`` has ``"scores"`` (n,), ``"labels"`` (n,) int64 class indices into
    ``category_ids`` and ``"boxes"`` (n, 4) xyxy in pixels of the original image. Keeps the
    ``max_dets`` best boxes with score >= ``score_threshold`` per image.
    """
    out: list[dict[str, Any]] = []
    for image_id, pred in zip(image_ids, predictions):
        scores = pred["scores"].detach().float().cpu()
        keep = torch.nonzero(scores >= score_threshold).flatten()
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:max_dets]
        boxes = pred["boxes"].detach().float().cpu()[keep]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for label, box, score in zip(pred["labels"][keep].tolist(), xywh, scores[keep].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                        "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return out


def rank_detections_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"detections.rank{rank:03d}.json"


def write_rank_detections(dets: list[dict[str, Any]], out_dir: str | Path, rank: int) -> Path:
    """Write one rank's detections (atomically: a reader never sees half a file)."""
    path = rank_detections_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dets))
    tmp.replace(path)
    return path


def merge_rank_detections(out_dir: str | Path, world_size: int, remove: bool = True) -> list[dict[str, Any]]:
    """Concatenate the ``world_size`` rank files in rank order (and delete them when ``remove``)."""
    merged: list[dict[str, Any]] = []
    paths = [rank_detections_path(out_dir, r) for r in range(world_size)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvaluationError(f"detections of some ranks are missing: {', '.join(missing)}")
    for path in paths:
        merged.extend(load_detections(path))
    if remove:
        for path in paths:
            path.unlink()
    return merged


# ---------------------------------------------------------------------------------------------
# Running a detector over an annotation file (single process or one shard per rank)
# ---------------------------------------------------------------------------------------------

def subset_annotations(gt: dict[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """The annotation dict restricted to ``image_ids`` (categories unchanged)."""
    keep = set(image_ids)
    return {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    postprocess: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    category_ids: list[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    score_threshold: float = SCORE_THRESHOLD,
    max_dets: int = MAX_DETS_PER_IMAGE,
) -> list[dict[str, Any]]:
    """Detections of ``model`` on every batch of ``loader`` (batches of ``pipeline.data.Collate``:
    ``images``, ``pixel_mask``, ``targets`` with ``orig_size`` and ``image_id``)."""
    was_training = model.training
    model.eval()
    dets: list[dict[str, Any]] = []
    try:
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            mask = batch["pixel_mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(images, mask)
            sizes = torch.stack([t["orig_size"] for t in batch["targets"]]).to(device)
            preds = postprocess(outputs, sizes)
            dets.extend(predictions_to_detections([t["image_id"] for t in batch["targets"]], preds, category_ids,
                                                  score_threshold, max_dets))
    finally:
        model.train(was_training)
    return dets


def evaluate_model(
    model: torch.nn.Module,
    postprocess: torch.nn.Module,
    annotations: str | Path,
    images: str | Path,
    category_ids: list[int],
    out_dir: str | Path,
    device: torch.device,
    image_size: int = 800,
    max_size: int = 1333,
    batch_size: int = 2,
    max_images: int = 0,
    amp_dtype: torch.dtype | None = None,
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    num_workers: int = 0,
    fmt: Format = "auto",
) -> tuple[dict[str, float] | None, Path | None]:
    """Run the detector over the images of ``annotations`` (short side ``image_size``) and score it.

    Under ``torch.distributed`` rank r takes every world_size-th image, writes its detections to
    ``out_dir`` and rank 0 merges the files, writes ``out_dir/detections.json`` and evaluates.
    Returns (metrics, detections path) on rank 0 and (None, None) on the other ranks.
    ``category_ids[i]`` is the dataset category id of class index i (the model's class order).
    """
    from .data import transforms as T
    from .data.collate import Collate
    from .data.detection import DetectionDataset, load_detection_annotations

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    gt = load_annotations(annotations)
    known = {c["id"] for c in gt["categories"]}
    unknown = [c for c in category_ids if c not in known]
    if unknown:
        raise EvaluationError(f"{annotations}: the model's classes include category ids {unknown[:5]} "
                              "that the annotation file does not list")
    records, categories, _ = load_detection_annotations(annotations, require_boxes=False)
    if max_images:
        records = records[:max_images]
        gt = subset_annotations(gt, [r.image_id for r in records])
    dataset = DetectionDataset(records[rank::world], images, categories,
                               transforms=T.RandomResize([image_size], max_size=max_size),
                               pixel_mean=pixel_mean, pixel_std=pixel_std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=Collate("detection"))
    dets = predict(model, postprocess, loader, category_ids, device, amp_dtype)
    out_dir = Path(out_dir)
    if not distributed:
        path = out_dir / "detections.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dets))
        return evaluate_detections(gt, dets, fmt), path
    write_rank_detections(dets, out_dir, rank)
    del dets
    torch.distributed.barrier()
    if rank != 0:
        return None, None
    merged = merge_rank_detections(out_dir, world)
    path = out_dir / "detections.json"
    path.write_text(json.dumps(merged))
    return evaluate_detections(gt, merged, fmt), path
