"""`lt-distill bench fidelity STORE --shards PATTERN`: how close are cached labels to what an online
teacher says about the actual augmentation crop? (DESIGN §4: the measure of this design.)

For each crop-match mode the real classification pipeline runs (crop + flip per tile, RichSem mosaic,
``exact`` cuts grid boxes and fits tiles in their quadrant) over the store's shards. Every visible tile
is then scored twice:

* online: the teacher that filled the store, on the tile's pixels as they sit on the canvas (cut and
  resized exactly as precompute cuts its crops),
* cached: the soft label the loader attached (grid label(s) matched to the tile's tracked region),

and we report, per mode and separately for flipped and unflipped tiles, the top-1 agreement and the
mean KL(online || cached) over tiles with a valid match, plus the share of tiles masked by the IoU
threshold. Two references on the same tiles: the image's whole-image label (grid box 0: what an
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
from ..pipeline.grid import MATCH_MODES
from ..pipeline.shards import expand_shards, iter_tar_samples
from ..pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize
from ..pipeline.teacher.model import Teacher
from ..pipeline.vocab import TEMPLATE_SETS, load_vocabulary
from ..store import LabelReader, check_compatible, kl_divergence
from ..store.schema import StoreError


def teacher_config_for_store(attrs: dict[str, Any], base: TeacherConfig, weights: str | None = None
                             ) -> TeacherConfig:
    """A TeacherConfig reproducing the store's teacher: model, templates, synonyms and temperature from
    its provenance; random-init seed from ``weights_sha256`` ("random-init:seed=N") unless ``weights``."""
    t = attrs.get("teacher", {})
    changes: dict[str, Any] = {"model": t.get("model", base.model)}
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
    m = re.fullmatch(r"random-init:(?:v\d+:)?seed=(-?\d+)(?::sha256=[0-9a-f]+)?", str(t.get("weights_sha256", "")))
    if weights:
        changes.update(weights=weights, random_init=False)
    elif m:
        changes.update(random_init=True, seed=int(m.group(1)), weights=None)
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
        self.count = 0

    def add(self, kl: np.ndarray, agree: np.ndarray) -> None:
        self.kl.extend(kl.tolist())
        self.agree.extend(agree.tolist())

    def summary(self) -> dict[str, Any]:
        n = len(self.kl)
        return {"tiles": n, "top1_agreement": float(np.mean(self.agree)) if n else float("nan"),
                "mean_kl": float(np.mean(self.kl)) if n else float("nan"),
                "median_kl": float(np.median(self.kl)) if n else float("nan")}


def _compare(online: np.ndarray, cached: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return kl_divergence(online, cached), online.argmax(-1) == cached.argmax(-1)


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
        to_pixels = OnlineSoftLabeler(teacher, cfg.pixel_mean, cfg.pixel_std)
        tallies = collections.defaultdict(_Tally)
        seen = masked = 0
        previous_whole = None
        random.seed(seed)
        for image, target in dataset:
            canvas = to_pixels.image_uint8(image, target["size"])
            boxes = cxcywh_to_xyxy(target["boxes"].float()).clamp(0, 1).numpy()
            pre = getattr(teacher, "preprocess", teacher.input_size)  # the teacher's own crop preprocessing
            online = teacher.score_crop_batch(crop_and_resize(canvas, boxes, pre)).float().cpu().numpy()
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
            tally.add(*_compare(online, reader.decode(index, prob)))
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
    attrs = reader.attrs
    cfg_t = teacher_config_for_store(attrs, teacher_cfg, weights)
    teacher = build_teacher(cfg_t, load_vocabulary(cfg_t.vocab))
    check_same_teacher(attrs, teacher)
    torch.manual_seed(seed)
    reproduction = reproduce_store(reader, shards, teacher, reproduce) if reproduce > 0 else None
    modes_out = measure_fidelity(reader, shards, teacher, num_tiles=num_tiles, modes=modes, preset=preset,
                                 crop_prob=crop_prob, iou_threshold=iou_threshold, interp_top_n=interp_top_n,
                                 tile_size=tile_size, seed=seed)
    return {"store": str(store), "shards": shards, "grid": attrs["grid"]["spec"],
            "store_mode": attrs["teacher"].get("mode"), "residual_policy": attrs["encoding"]["residual"],
            "topk": reader.layout.topk, "num_classes": reader.layout.num_classes,
            "teacher": {"model": teacher.model_name, "weights": teacher.weights_id,
                        "input_size": teacher.input_size, "device": str(teacher.device)},
            "preset": preset, "crop_prob": crop_prob, "iou_threshold": iou_threshold, "interp_top_n": interp_top_n,
            "reproduction": reproduction, "modes": modes_out, "goal_exact_top1": 0.95}


def print_fidelity(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = result["teacher"]
    table = Table(title=f"fidelity: online teacher on the actual tile vs cached label ({result['grid']} grid, "
                        f"top-{result['topk']}, {result['residual_policy']})")
    for col in ("mode", "tiles", "masked", "top-1 agree", "mean KL", "top-1 flipped", "KL flipped",
                "top-1 unflipped", "KL unflipped", "whole-image top-1", "other-image top-1"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, r in result["modes"].items():
        def cell(part: str, key: str, fmt: str) -> str:
            return format(r[part][key], fmt) if part in r and r[part]["tiles"] else "-"
        table.add_row(mode, str(r["tiles_seen"]), f"{r['masked_fraction']:.1%}", cell("all", "top1_agreement", ".1%"),
                      cell("all", "mean_kl", ".4f"), cell("flipped", "top1_agreement", ".1%"),
                      cell("flipped", "mean_kl", ".4f"), cell("unflipped", "top1_agreement", ".1%"),
                      cell("unflipped", "mean_kl", ".4f"), cell("whole-image label", "top1_agreement", ".1%"),
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
    console.print(f"teacher {t['model']} ({t['weights']}), input {t['input_size']}px, on {t['device']}; store filled "
                  f"with mode {result['store_mode']!r}; data preset {result['preset']!r}, crop_prob "
                  f"{result['crop_prob']}, IoU threshold {result['iou_threshold']}; goal: exact >= "
                  f"{result['goal_exact_top1']:.0%} top-1")
