"""`lt-distill bench fidelity STORE --shards PATTERN`: how close are cached labels to what an online
teacher says about the actual augmentation crop? (DESIGN §4: the measure of this design.)

For each crop-match mode the real classification pipeline runs (crop + flip per tile, RichSem mosaic,
``exact`` cuts grid boxes and fits tiles in their quadrant) over the store's shards. Every visible tile
is then scored twice:

* online: the teacher that filled the store, on the tile's pixels as they sit on the canvas (cut and
  resized exactly as precompute cuts its crops),
* cached: the soft label the loader attached (grid label(s) matched to the tile's tracked region),

and we report, per mode and separately for flipped and unflipped tiles, the top-1 agreement (also on the
"confident" tiles alone, online top-1 >= 0.5) and the mean KL(online || cached) over tiles with a valid
match, plus the share of tiles masked by the IoU threshold. Two more rows split the gap: a *lossless* label
(the teacher's full distribution on the matched grid crops of the original image: no storage loss) and a
*flip-aware* lossless label (mirrored crops for flipped tiles); what they leave is the tile's own pixels
(resampling, flips), what they remove is storage. Two references on the same tiles: the image's whole-image label (grid box 0: what an
image-level label store would give) and another image's whole-image label (a control: when the teacher
agrees with that too, it is not looking at the image — e.g. random weights — and the figures mean
nothing; the table then says so).

The teacher is rebuilt from the store's provenance (model, random-init seed or ``--weights``,
templates, temperature) and must reproduce its text fingerprint; before the modes, it re-scores the
grid crops of a few stored images without augmentation ("store reproduction", should be ~100% top-1):
this catches a teacher whose provenance matches but whose outputs do not (e.g. other code).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..pipeline.data import StoreRows, build_classification_dataset, data_config
from ..pipeline.data.classification import decode_sample_image
from ..pipeline.data.online import OnlineSoftLabeler, cxcywh_to_xyxy
from ..pipeline.grid import MATCH_MODES, match_crops
from ..pipeline.shards import expand_shards, iter_tar_samples
from ..pipeline.teacher import GridCrops, TeacherConfig, build_teacher, crop_and_resize
from ..pipeline.teacher.classifier import CLASSIFIER_MODELS, packaged_weights
from ..pipeline.teacher.model import Teacher
from ..pipeline.vocab import TEMPLATE_SETS, load_vocabulary
from ..store import LabelReader, check_compatible, kl_divergence
from ..store.schema import StoreError


# DESIGN §7 / issue 11: with a real pretrained teacher, ``exact`` (same pixels up to the tile's resampling,
# fp16 and top-k) must agree on top-1 for >= 99% of tiles at a mean KL <= 0.02 nats.
GOALS = {"goal_exact_top1": 0.99, "goal_exact_kl": 0.02}
CONFIDENT = 0.5  # online top-1 probability from which a tile counts as confident (no near-tie)


def teacher_config_for_store(attrs: dict[str, Any], base: TeacherConfig, weights: str | None = None
                             ) -> TeacherConfig:
    """A TeacherConfig reproducing the store's teacher: model, templates, synonyms and temperature from
    its provenance; random-init seed from ``weights_sha256`` ("random-init:seed=N") unless ``weights``;
    a classifier's installed weights package when neither (its SHA-256 is checked against the store's)."""
    t = attrs.get("teacher", {})
    family = t.get("family", "clip")
    changes: dict[str, Any] = {"family": family, "model": t.get("model", base.model)}
    templates = tuple(t.get("prompt_templates", ()))
    named = [name for name, ts in TEMPLATE_SETS.items() if ts == templates]
    if named:
        changes["templates"] = named[0]
    elif len(templates) == 1:
        changes["templates"] = templates[0]
    if "synonyms" in t:
        changes["synonyms"] = bool(t["synonyms"])
    if "temperature" in t:
        changes["temperature"] = float(t["temperature"])
    if family == "classifier":  # the store's vocabulary is the label space itself, or another one mapped onto
        space = CLASSIFIER_MODELS[changes["model"]].label_space
        if attrs.get("vocabulary", {}).get("sha256") == load_vocabulary(space).sha256:
            changes["vocab"] = space
    m = re.fullmatch(r"random-init:(?:v\d+:)?seed=(-?\d+)(?::sha256=[0-9a-f]+)?", str(t.get("weights_sha256", "")))
    if weights:
        changes.update(weights=weights, random_init=False)
    elif m:
        changes.update(random_init=True, seed=int(m.group(1)), weights=None)
    elif family == "classifier" and packaged_weights(CLASSIFIER_MODELS[changes["model"]]) is not None:
        changes.update(random_init=False, weights=None)  # the installed weights package (SHA-256 checked after)
    else:
        raise StoreError(f"the store's teacher was loaded from weights {t.get('weights_file')!r} "
                         f"(sha256 {str(t.get('weights_sha256'))[:16]}...): pass the same file with --weights")
    return dataclasses.replace(base, **changes)


def check_same_teacher(attrs: dict[str, Any], teacher: Teacher) -> None:
    """Refuse (naming the fields) a teacher that did not make the store's labels."""
    check_compatible(attrs, {
        "teacher.model": teacher.model_name,
        "teacher.weights_sha256": teacher.weights_id,
        "teacher.text_fingerprint": teacher.fingerprint["sha256"],
        "teacher.temperature": teacher.temperature,
        "vocabulary.sha256": teacher.vocabulary.sha256,
    }, store_name="label store (vs the fidelity teacher)")


class _Tally:
    def __init__(self) -> None:
        self.kl: list[float] = []
        self.agree: list[bool] = []
        self.top5: list[float] = []
        self.confident: list[bool] = []
        self.count = 0

    def add(self, kl: np.ndarray, agree: np.ndarray, top5: np.ndarray, confident: np.ndarray) -> None:
        self.kl.extend(kl.tolist())
        self.agree.extend(agree.tolist())
        self.top5.extend(top5.tolist())
        self.confident.extend(confident.tolist())

    def summary(self) -> dict[str, Any]:
        n = len(self.kl)
        nan = float("nan")
        sure = np.asarray(self.confident, dtype=bool)
        agree = np.asarray(self.agree, dtype=bool)
        return {"tiles": n, "top1_agreement": float(agree.mean()) if n else nan,
                "top5_overlap": float(np.mean(self.top5)) if n else nan,
                "mean_kl": float(np.mean(self.kl)) if n else nan,
                "median_kl": float(np.median(self.kl)) if n else nan,
                # top-1 disagreements of a flat teacher are mostly near-ties: the same figure on the tiles
                # whose online top-1 probability is at least CONFIDENT
                "confident_tiles": int(sure.sum()),
                "top1_agreement_confident": float(agree[sure].mean()) if sure.any() else nan}


def top5_overlap(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, C), (n, C) -> (n,): share of p's 5 most probable classes that are among q's 5 most probable."""
    a = np.argsort(-p, axis=-1, kind="stable")[:, :5]
    b = np.argsort(-q, axis=-1, kind="stable")[:, :5]
    return (a[:, :, None] == b[:, None, :]).any(-1).mean(-1)


def _compare(online: np.ndarray, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """KL(online || cached), top-1 agreement, top-5 overlap and whether the online top-1 is confident, per row."""
    return (kl_divergence(online, cached), online.argmax(-1) == cached.argmax(-1), top5_overlap(online, cached),
            online.max(-1) >= CONFIDENT)


def _preprocess(teacher) -> Any:
    """The teacher's own crop preprocessing (a plain input size for teachers without one)."""
    return getattr(teacher, "preprocess", teacher.input_size)


class _LosslessLabels:
    """What a store with no storage loss would give a tile: the teacher's full distributions on the grid
    crops of the tile's original image (no top-k, no fp16), mixed with the weights the match mode gives.

    KL(online || lossless) is the part of the fidelity gap that no encoding removes (the tile's pixels are
    not the grid crop's: resampled to its mosaic quadrant, maybe flipped); the rest of KL(online || cached)
    is storage. ``flip-aware``: a flipped tile is given the teacher's distribution on the *mirrored* grid
    crops, as a store with labels of mirrored crops would. The images come from the dataset as it decodes
    them (:meth:`watch`), so nothing is read twice."""

    def __init__(self, teacher, grid_boxes: np.ndarray, mode: str, iou_threshold: float, top_n: int,
                 keep_images: int = 64) -> None:
        self.teacher, self.grid_boxes = teacher, grid_boxes
        self.mode, self.iou_threshold, self.top_n = mode, iou_threshold, top_n
        self.keep_images = keep_images
        self.images: collections.OrderedDict[tuple[int, int], torch.Tensor] = collections.OrderedDict()
        self.probs: dict[tuple[int, int, bool], np.ndarray] = {}

    def watch(self, dataset) -> None:
        """Keep the last ``keep_images`` images ``dataset`` decodes, by (shard, store row).
        The wrapper is set on this one dataset instance; the pipeline's code is unchanged."""
        decode = dataset.decode

        def recording_decode(shard: int, position: int, raw: Any) -> dict[str, Any]:
            sample = decode(shard, position, raw)
            if "image" in sample and sample["position"] >= 0:
                self.images[(shard, sample["position"])] = sample["image"]
                while len(self.images) > self.keep_images:
                    (old_shard, old_row), _ = self.images.popitem(last=False)
                    for mirrored in (False, True):
                        self.probs.pop((old_shard, old_row, mirrored), None)
            return sample

        dataset.decode = recording_decode

    def _grid_probs(self, shard: int, row: int, mirrored: bool) -> np.ndarray:
        key = (shard, row, mirrored)
        if key not in self.probs:
            # the mirrored crops as precompute --flip-labels cuts them (mirrored before the resize)
            crops = GridCrops(self.grid_boxes, _preprocess(self.teacher), mirror=mirrored)(self.images[(shard, row)])
            crops = crops[len(self.grid_boxes):] if mirrored else crops
            self.probs[key] = self.teacher.score_crop_batch(crops).float().cpu().numpy().astype(np.float64)
        return self.probs[key]

    def __call__(self, rows: np.ndarray, regions: np.ndarray, flipped: np.ndarray | None = None) -> np.ndarray:
        """(n, 2) store rows and (n, 4) regions of tiles with a valid match -> (n, C) float32 labels."""
        weights, _ = match_crops(regions, self.grid_boxes, self.mode, self.iou_threshold, self.top_n)
        out = []
        for i, (shard, row) in enumerate(rows.tolist()):
            mirrored = bool(flipped[i]) if flipped is not None else False
            out.append(weights[i] @ self._grid_probs(shard, row, mirrored))
        return np.asarray(out, dtype=np.float32)


def measure_fidelity(reader: LabelReader, shards: str, teacher, *, num_tiles: int = 200,
                     modes: tuple[str, ...] = MATCH_MODES, preset: str = "default", crop_prob: float = 1.0,
                     iou_threshold: float = 0.5, interp_top_n: int = 4, tile_size: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Per mode: tiles seen, share masked, and for tiles with a valid match (all / flipped / unflipped)
    top-1 agreement and KL(online || cached). Two reference rows on the same tiles: the image's
    whole-image label (grid box 0), and another image's whole-image label (a control: a teacher
    whose answer does not depend on the image agrees with it too, and then nothing here means much).

    ``teacher`` needs ``input_size`` and ``score_crop_batch(uint8 (N, 3, S, S)) -> (N, C) probs``."""
    grid_spec = reader.attrs["grid"]["spec"]
    grid_boxes = np.asarray(reader.attrs["grid"]["boxes"], dtype=np.float64)
    out: dict[str, Any] = {}
    for mode in modes:
        aug: dict[str, Any] = {"crop_match": mode, "crop_prob": crop_prob, "iou_threshold": iou_threshold,
                               "interp_top_n": interp_top_n}
        if tile_size:
            aug["tile_size"] = tile_size
        cfg = data_config(preset, {"cls_shards": shards, "label_store": str(reader.path), "grid": grid_spec,
                                   "num_workers": 0, "seed": seed, "cls_aug": aug,
                                   "cls_unlabelled": "keep"})  # soft labels only: hard labels do not matter
        dataset = build_classification_dataset(cfg, reader)  # passes over the shards until num_tiles
        lossless = _LosslessLabels(teacher, grid_boxes, mode, iou_threshold, interp_top_n)
        lossless.watch(dataset)
        to_pixels = OnlineSoftLabeler(teacher, cfg.pixel_mean, cfg.pixel_std)
        tallies = collections.defaultdict(_Tally)
        seen = masked = 0
        previous_whole = None
        random.seed(seed)
        for image, target in dataset:
            canvas = to_pixels.image_uint8(image, target["size"])
            boxes = cxcywh_to_xyxy(target["boxes"].float()).clamp(0, 1).numpy()
            online = teacher.score_crop_batch(crop_and_resize(canvas, boxes, _preprocess(teacher))).float().cpu().numpy()
            cached = target["soft_labels"].numpy()
            valid = target["soft_mask"].numpy()
            flipped = target["flipped"].numpy()
            seen += len(valid)
            masked += int((~valid).sum())
            whole = np.stack([reader.decode(*reader.labels(s, p)[:2])[0] if s >= 0 else np.zeros_like(cached[0])
                              for s, p in target["rows"].tolist()])
            for name, sel in (("unflipped", valid & ~flipped), ("flipped", valid & flipped), ("all", valid)):
                if sel.any():
                    tallies[name].add(*_compare(online[sel], cached[sel]))
            if valid.any():
                rows, regions = target["rows"].numpy()[valid], target["regions"].numpy()[valid]
                tallies["lossless label"].add(*_compare(online[valid], lossless(rows, regions)))
                tallies["lossless, flip-aware"].add(*_compare(online[valid], lossless(rows, regions, flipped[valid])))
                tallies["whole-image label"].add(*_compare(online[valid], whole[valid]))
                if previous_whole is not None:  # the last mosaic's images are other images
                    other = previous_whole[np.arange(int(valid.sum())) % len(previous_whole)]
                    tallies["other image's label"].add(*_compare(online[valid], other))
            previous_whole = whole[target["rows"][:, 0].numpy() >= 0]
            if seen >= num_tiles:
                break
        out[mode] = {"tiles_seen": seen, "masked_fraction": masked / max(seen, 1),
                     **{name: t.summary() for name, t in tallies.items()}}
    return out


def reproduce_store(reader: LabelReader, shards: str, teacher, num_images: int = 4) -> dict[str, Any]:
    """Re-score the grid crops of the first ``num_images`` stored images with ``teacher`` (no augmentation):
    top-1 agreement and KL against the store. Near 100% / the top-k truncation KL when the teacher is
    the one that made the store; anything less means the two sides differ (weights, code, precision)
    and the per-mode figures mix that in."""
    grid = np.asarray(reader.attrs["grid"]["boxes"], dtype=np.float64)
    tally = _Tally()
    rows = StoreRows(reader)
    for shard, url in enumerate(expand_shards(shards)):
        for position, raw in enumerate(iter_tar_samples(url)):
            if tally.count >= num_images:
                break
            image = decode_sample_image(raw.fields) if raw.error is None else None
            row = rows.locate(shard, position, raw.key) if image is not None else None
            if row is None:
                continue
            index, prob, valid = reader.labels(shard, row)
            if not valid:
                continue
            online = teacher.score_crops(image, grid).float().cpu().numpy()
            k = len(grid)  # rows K.. of a flip-label store are mirror rows (not re-scored here)
            tally.add(*_compare(online, reader.decode(index[:k], prob[:k])))
            tally.count += 1
        if tally.count >= num_images:
            break
    return {"images": tally.count, **tally.summary()}


def run_fidelity(store: str | Path, shards: str, teacher_cfg: TeacherConfig, *, weights: str | None = None,
                 num_tiles: int = 200, modes: tuple[str, ...] = MATCH_MODES, preset: str = "default",
                 crop_prob: float = 1.0, iou_threshold: float = 0.5, interp_top_n: int = 4,
                 tile_size: int | None = None, seed: int = 0, reproduce: int = 4) -> dict[str, Any]:
    """Rebuild the store's teacher (checked against its provenance), check that it reproduces the stored
    labels of ``reproduce`` images, and :func:`measure_fidelity`."""
    reader = LabelReader(store)
    cfg_t = teacher_config_for_store(reader.attrs, teacher_cfg, weights)
    teacher = build_teacher(cfg_t, load_vocabulary(cfg_t.vocab))
    return fidelity_with_teacher(reader, shards, teacher, num_tiles=num_tiles, modes=modes, preset=preset,
                                 crop_prob=crop_prob, iou_threshold=iou_threshold, interp_top_n=interp_top_n,
                                 tile_size=tile_size, seed=seed, reproduce=reproduce)


def fidelity_with_teacher(reader: LabelReader, shards: str, teacher, *, num_tiles: int = 200,
                          modes: tuple[str, ...] = MATCH_MODES, preset: str = "default", crop_prob: float = 1.0,
                          iou_threshold: float = 0.5, interp_top_n: int = 4, tile_size: int | None = None,
                          seed: int = 0, reproduce: int = 4) -> dict[str, Any]:
    """:func:`run_fidelity` with a teacher already built (checked against the store's provenance)."""
    attrs = reader.attrs
    store = reader.path
    check_same_teacher(attrs, teacher)
    torch.manual_seed(seed)
    reproduction = reproduce_store(reader, shards, teacher, reproduce) if reproduce > 0 else None
    modes_out = measure_fidelity(reader, shards, teacher, num_tiles=num_tiles, modes=modes, preset=preset,
                                 crop_prob=crop_prob, iou_threshold=iou_threshold, interp_top_n=interp_top_n,
                                 tile_size=tile_size, seed=seed)
    return {"store": str(store), "shards": shards, "grid": attrs["grid"]["spec"],
            "store_mode": attrs["teacher"].get("mode"), "residual_policy": attrs["encoding"]["residual"],
            "topk": reader.layout.topk, "num_classes": reader.layout.num_classes,
            "teacher": {"family": getattr(teacher, "family", "clip"), "model": teacher.model_name,
                        "weights": teacher.weights_id,
                        "input_size": teacher.input_size, "device": str(teacher.device)},
            "preset": preset, "crop_prob": crop_prob, "iou_threshold": iou_threshold, "interp_top_n": interp_top_n,
            "reproduction": reproduction, "modes": modes_out, **GOALS}


def print_fidelity(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = result["teacher"]
    table = Table(title=f"fidelity: online teacher on the actual tile vs cached label ({result['grid']} grid, "
                        f"top-{result['topk']}, {result['residual_policy']})")
    for col in ("mode", "tiles", "masked", "top-1 agree", "top-1 agree, confident", "top-5 overlap", "mean KL", "top-1 flipped", "KL flipped",
                "top-1 unflipped", "KL unflipped", "lossless top-1", "lossless KL", "flip-aware top-1",
                "flip-aware KL", "whole-image top-1", "other-image top-1"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, r in result["modes"].items():
        def cell(part: str, key: str, fmt: str) -> str:
            return format(r[part][key], fmt) if part in r and r[part]["tiles"] else "-"
        table.add_row(mode, str(r["tiles_seen"]), f"{r['masked_fraction']:.1%}", cell("all", "top1_agreement", ".1%"),
                      cell("all", "top1_agreement_confident", ".1%"),
                      cell("all", "top5_overlap", ".1%"), cell("all", "mean_kl", ".4f"),
                      cell("flipped", "top1_agreement", ".1%"),
                      cell("flipped", "mean_kl", ".4f"), cell("unflipped", "top1_agreement", ".1%"),
                      cell("unflipped", "mean_kl", ".4f"), cell("lossless label", "top1_agreement", ".1%"),
                      cell("lossless label", "mean_kl", ".4f"), cell("lossless, flip-aware", "top1_agreement", ".1%"),
                      cell("lossless, flip-aware", "mean_kl", ".4f"), cell("whole-image label", "top1_agreement", ".1%"),
                      cell("other image's label", "top1_agreement", ".1%"))
    console.print(table)
    rep = result.get("reproduction")
    if rep and rep["tiles"]:
        console.print(f"store reproduction (grid crops of {rep['images']} stored images re-scored, no augmentation): "
                      f"top-1 {rep['top1_agreement']:.1%}, mean KL {rep['mean_kl']:.4f} over {rep['tiles']} crops")
        if rep["top1_agreement"] < 0.99:
            console.print("[yellow]warning[/yellow]: the teacher does not reproduce the store's own labels; the figures "
                          "above mix that difference in (other weights or teacher code than the store's?)")
    control = [r["other image's label"]["top1_agreement"] for r in result["modes"].values()
               if r.get("other image's label", {}).get("tiles")]
    if control and max(control) > 0.5:
        console.print("[yellow]warning[/yellow]: the teacher gives most images the same top-1 class (other-image "
                      f"agreement up to {max(control):.0%}): it does not look at the image (random weights?), so "
                      "these agreements say nothing about fidelity")
    console.print("lossless: the teacher's full distributions on the matched grid crops of the original image (what "
                  "a store with no top-k/quantisation loss gives); flip-aware: mirrored grid crops for flipped tiles. "
                  "KL(online || lossless) is the gap no encoding removes; the rest of the mean KL is storage. "
                  f"confident: tiles whose online top-1 probability is >= {CONFIDENT}.")
    console.print(f"teacher {t['model']} ({t['weights']}), input {t['input_size']}px, on {t['device']}; store filled "
                  f"with mode {result['store_mode']!r}; data preset {result['preset']!r}, crop_prob "
                  f"{result['crop_prob']}, IoU threshold {result['iou_threshold']}; goal: exact >= "
                  f"{result['goal_exact_top1']:.0%} top-1, mean KL <= {result['goal_exact_kl']} nats")


# ---------------------------------------------------------------------------------------------------- real photos
def build_photo_store(shards: str, store: str | Path, teacher_cfg: TeacherConfig, grid: str, *, topk: int = 16,
                      residual: str = "spread", batch_size: int = 4, flip_labels: bool = False) -> dict[str, Any]:
    """Precompute a label store for ``shards`` with ``teacher_cfg`` (no hard labels; ``flip_labels``: with
    mirror rows) -> the job summary."""
    from ..stages.precompute import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(store=str(store), shards=shards, teacher=teacher_cfg, grid=grid, flip_labels=flip_labels,
                           topk=topk,
                           residual=residual, labels="none", batch_size=batch_size, workers=0, progress=False,
                           overwrite=True)
    return run_precompute(cfg, log=lambda _line: None)


def labels_bytes_per_image(store: str | Path, num_images: int) -> float:
    """Bytes on disk of the ``labels/`` arrays (index + prob, compressed) per stored image."""
    root = Path(store) / "labels"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / max(num_images, 1)


def run_grid_study(photos: str, grids: list[str], teacher_cfg: TeacherConfig, *, work_dir: str | Path,
                   topk: int = 16, flip_labels: bool = False, **fidelity_kw: Any) -> dict[str, Any]:
    """The real-photo fidelity bench: ``photos`` (see :mod:`.photos`) written as shards under ``work_dir``;
    per grid, a store filled by the teacher of ``teacher_cfg`` and :func:`fidelity_with_teacher` on it, with
    the store's label bytes per image (raw K x k x 4 and compressed on disk)."""
    from ..pipeline.grid import GridSpec
    from .photos import load_photos, write_photo_shards

    work = Path(work_dir)
    images = load_photos(photos)
    shards = write_photo_shards(images, work / "shards")
    teacher = build_teacher(teacher_cfg)
    out: dict[str, Any] = {"photos": photos, "num_photos": len(images), "shards": shards, "topk": topk,
                           "flip_labels": flip_labels, "grids": {}}
    for grid in grids:
        spec = GridSpec.parse(grid)
        store = work / f"store-{len(out['grids'])}.zarr"
        summary = build_photo_store(shards, store, teacher_cfg, grid, topk=topk, flip_labels=flip_labels)
        result = fidelity_with_teacher(LabelReader(store), shards, teacher, **fidelity_kw)
        done = int(summary["classification"]["images_done"])
        result.update({"grid_name": grid, "num_boxes": spec.num_boxes, "raw_bytes_per_image": spec.num_boxes * (2 if flip_labels else 1) * topk * 4,
                       "disk_bytes_per_image": labels_bytes_per_image(store, done)})
        out["grids"][grid] = result
    return out


def print_grid_study(result: dict[str, Any], console: Console | None = None) -> None:
    """Each grid's fidelity table, then one line per grid: bytes and per-mode top-1 / KL."""
    console = console or Console()
    for r in result["grids"].values():
        print_fidelity(r, console)
    table = Table(title=f"grid study: fidelity vs store bytes ({result['num_photos']} photos: {result['photos']}, "
                        f"top-{result['topk']})")
    for col in ("grid", "K", "bytes/img raw", "bytes/img disk"):
        table.add_column(col, justify="right" if col != "grid" else "left")
    modes = list(next(iter(result["grids"].values()))["modes"]) if result["grids"] else []
    for mode in modes:
        for col in ("top-1", "KL", "masked"):
            table.add_column(f"{mode} {col}", justify="right")
    for name, r in result["grids"].items():
        row = [name if name == r["grid"] else f"{name} ({r['grid']})", str(r["num_boxes"]),
               str(r["raw_bytes_per_image"]), f"{r['disk_bytes_per_image']:.0f}"]
        for mode in modes:
            m = r["modes"][mode]
            a = m.get("all", {"tiles": 0})
            row += [f"{a['top1_agreement']:.1%}" if a["tiles"] else "-", f"{a['mean_kl']:.4f}" if a["tiles"] else "-",
                    f"{m['masked_fraction']:.0%}"]
        table.add_row(*row)
    console.print(table)
