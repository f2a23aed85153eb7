"""Stage 2 driver: the training loop (``lt-distill train``).

One iteration = one optimizer step on one batch; batches alternate detection / classification
(1:1, ``pipeline.data.AlternatingLoader``), unless the method makes its own stream
(``Method.train_loader``; CLIS: both sources in every batch). Per step: forward (fp32 by default; ``amp``
puts the backbone, encoder and decoder under autocast, the heads stay fp32), the criterion in fp32, the
weighted total, backward (scaled for fp16), gradient-norm clipping, AdamW step, scheduler step.

Resuming (``resume=True``) loads ``<output_dir>/checkpoints/last`` and continues exactly: model,
optimizer, scheduler, grad scaler and every rank's RNG state are restored, and the data loaders
are replayed to the checkpoint's position (each DataLoader's worker seeds come from its own
generator, so the replayed stream is the one the interrupted run saw). A CPU run with a fixed seed
therefore produces the same losses after a kill and ``--resume`` as without the interruption.

The label store is checked against the run before any step: the vocabulary (the detection
categories in id order), the grid, and whichever of top-k / residual / teacher the config names.

With ``data.soft_labels = "online"`` no store is read: each rank builds the CLIP teacher of
``cfg.teacher`` once, its class text embeddings become the language classifier (its vocabulary must
be the detection categories, checked by name before any step), and every batch is scored by it on
the CPU before it moves to the device (``stages.train.online``; logged as ``label_time``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from ...errors import LtDistillError
from ...pipeline.data import transforms as T
from ...pipeline.data.classification import ClassificationDataset
from ...pipeline.data.config import DataConfig
from ...pipeline.data.detection import DetectionDataset, load_detection_annotations
from ...pipeline.data.embedding import ObjectEmbeddings
from ...pipeline.data.labels import ObjectSoftLabels, check_label_store
from ...pipeline.data.loader import (
    AlternatingLoader,
    build_classification_dataset,
    build_classification_loader,
    build_detection_loader,
    move_batch,
)
from ...pipeline.evaluate import evaluate_model
from ...pipeline.model import build_model, load_checkpoint
from ...pipeline.vocab import load_vocabulary
from ...store import LabelReader, StoreMismatchError
from .checkpoint import (
    last_checkpoint,
    load_finetune_weights,
    load_resume_checkpoint,
    record_resume_changes,
    rng_state,
    save_final_model,
    save_training_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, resume_differences
from .embedding import EmbeddingLabels, build_embedding_labels, uses_embeddings
from .monitor import TrainMonitor
from .online import OnlineLabels, build_online_labels
from .optim import build_optimizer, build_scheduler
from .runtime import DistInfo, cleanup, gather_objects, init_distributed, reduce_mean, resolve_amp


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    iterations: int  # optimizer steps done in total (including before a resume)
    final_model: Path | None
    checkpoint: Path | None
    images_per_s: float  # mean training throughput of this process group (all ranks), this session
    losses: dict[str, float]  # last logged loss terms
    eval_metrics: dict[str, float] | None
    skipped: dict[str, int]  # data samples skipped by reason (this rank)
    finetune_report: dict[str, list[str]] | None = None
    model: torch.nn.Module | None = None  # the trained detector (unwrapped), this rank
    criterion: torch.nn.Module | None = None  # with the method's state (e.g. BACL's statistics), this rank


@dataclasses.dataclass
class TrainData:
    """What the loop needs from the data: the loader, the class order, the class text embeddings (C, D)
    float32 for the language classifier, and where soft labels come from: the store (cached mode) or
    ``online``, which fills each batch's soft labels (online mode)."""

    loader: AlternatingLoader
    categories: list[dict[str, Any]]
    class_image_counts: torch.Tensor
    text_embeddings: torch.Tensor
    reader: LabelReader | None = None
    online: OnlineLabels | None = None
    embedded: EmbeddingLabels | None = None  # an embedding store: decodes each device batch's soft labels


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_store_checked(data_cfg: DataConfig, names: list[str], cfg: TrainConfig) -> LabelReader:
    """Cached mode: the label store, refused (``StoreMismatchError`` naming each field) unless it matches
    the run."""
    if data_cfg.soft_labels != "cached":
        raise LtDistillError(f"soft_labels = {data_cfg.soft_labels!r} reads no label store")
    if not data_cfg.label_store:
        raise LtDistillError("no label store: set data.label_store (made by lt-distill precompute)")
    if not Path(data_cfg.label_store).exists():
        raise LtDistillError(f"label store not found: {data_cfg.label_store}")
    reader = LabelReader(data_cfg.label_store)
    sc = cfg.store_check
    if uses_embeddings(reader, data_cfg):  # any vocabulary: the teacher is checked instead (stages.train.embedding)
        check_label_store(reader, grid=data_cfg.grid, teacher_model=sc.teacher_model or None)
        return reader
    check_label_store(reader, vocabulary=names, grid=data_cfg.grid, topk=sc.topk or None,
                      residual=sc.residual or None, teacher_model=sc.teacher_model or None,
                      class_list=sc.class_list or None)
    stored = float(reader.attrs.get("teacher", {}).get("temperature", 1.0))
    if data_cfg.soft_temperature and data_cfg.soft_temperature != stored:
        raise StoreMismatchError(f"label store {reader.path}: data.soft_temperature = {data_cfg.soft_temperature}, "
                                 f"but top-k labels were made at temperature {stored} and cannot be re-tempered; "
                                 "use an embedding store (precompute --encoding embedding) or set it to 0")
    return reader


def _store_text_embeddings(reader: LabelReader, data_cfg: DataConfig) -> torch.Tensor:
    text = reader.text_embeddings()
    if text is None:
        raise LtDistillError(f"label store {data_cfg.label_store} has no class text embeddings "
                             "(precompute writes them); the language classifier needs them")
    return torch.as_tensor(np.asarray(text)).float()


def build_train_data(data_cfg: DataConfig, cfg: TrainConfig, info: DistInfo) -> TrainData:
    """Detection annotations -> store check (cached) or teacher (online) -> datasets -> 1:1 alternating
    loader (this rank's share)."""
    if not data_cfg.det_annotations or not data_cfg.det_images:
        raise LtDistillError("training needs data.det_annotations and data.det_images")
    records, categories, skipped = load_detection_annotations(data_cfg.det_annotations)
    names = [c["name"] for c in categories]
    reader, online, embedded = None, None, None
    if data_cfg.soft_labels == "online":
        online = build_online_labels(cfg.teacher, cfg.hard_labels, names, data_cfg.det_annotations, info.device,
                                     data_cfg.pixel_mean, data_cfg.pixel_std)
        text = online.text_embeddings
    else:
        reader = open_store_checked(data_cfg, names, cfg)
        if uses_embeddings(reader, data_cfg):
            embedded = build_embedding_labels(reader, data_cfg, cfg.teacher, load_vocabulary(data_cfg.det_annotations),
                                              info.device)
            text = embedded.text_embeddings
        else:
            text = _store_text_embeddings(reader, data_cfg)
    objects = None if reader is None else \
        ObjectEmbeddings(reader, len(categories)) if embedded is not None else ObjectSoftLabels(reader)
    det = DetectionDataset(records, data_cfg.det_images, categories,
                           transforms=T.make_detection_transforms(data_cfg.det_aug), objects=objects,
                           pixel_mean=data_cfg.pixel_mean, pixel_std=data_cfg.pixel_std, skipped=skipped)
    det_loader = build_detection_loader(data_cfg, det, info.world_size, info.rank)
    cls_loader = None
    if data_cfg.cls_shards:
        cls: ClassificationDataset = build_classification_dataset(
            data_cfg, reader, num_classes=len(categories),
            hard_labeler=online.hard_labeler if online is not None else None,
            num_replicas=info.world_size, rank=info.rank,
            class_map=embedded.class_map if embedded is not None else None)
        cls_loader = build_classification_loader(data_cfg, cls)
    # Worker seeds come from each loader's own generator, not from the global RNG that the model
    # also draws from: a replayed loader then reproduces the interrupted run's augmentations.
    for i, dl in enumerate((det_loader, cls_loader)):
        if dl is not None:
            dl.generator = torch.Generator().manual_seed(data_cfg.seed * 1000 + info.rank * 10 + i)
    counts = torch.zeros(len(categories))
    for cats in det.image_categories():
        counts[torch.as_tensor(cats, dtype=torch.long)] += 1
    # The method shapes the stream (default 1:1 alternation; CLIS mixes both sources in each batch).
    loader = cfg.build_method().train_loader(det_loader, cls_loader, data_cfg.seed * 1000 + info.rank * 10 + 2)
    return TrainData(loader, categories, counts, text, reader, online, embedded)


def batches(loader: AlternatingLoader, start: int = 0, on_caught_up: Callable[[], None] | None = None) -> Any:
    """Endless (iteration, batch) stream over epochs, from iteration ``start``: the first ``start``
    batches are drawn and dropped (an exact replay of the stream an interrupted run consumed), then
    ``on_caught_up()`` is called before batch ``start`` is drawn (the place to restore RNG states)."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise LtDistillError("the detection dataset gives no full batch on this rank (fewer images than "
                             "batch_size x processes?)")
    if start == 0 and on_caught_up is not None:
        on_caught_up()
    iteration, epoch = 0, 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if iteration >= start:
                yield iteration, batch
            iteration += 1
            if iteration == start and on_caught_up is not None:
                on_caught_up()
        epoch += 1


def _float_outputs(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _float_outputs(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_float_outputs(v) for v in x]
    return x


class _Window:
    """Per-source means of the logged scalars since the last log."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: Counter = Counter()
        self.data_time = 0.0
        self.label_time: float | None = None  # online teacher scoring (online mode only)
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, source: str, values: dict[str, float], data_time: float, label_time: float | None = None) -> None:
        for k, v in values.items():
            self.sums[source][k] += v
        self.counts[source] += 1
        self.data_time += data_time
        if label_time is not None:
            self.label_time = (self.label_time or 0.0) + label_time
        self.steps += 1

    def means(self, source: str) -> dict[str, float]:
        return {k: v / self.counts[source] for k, v in self.sums[source].items()}


def train(cfg: TrainConfig, resume: bool = False, console: Console | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          allow_config_changes: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) the training described by ``cfg``; see the module docstring.
    ``allow_config_changes``: resume although run-changing values differ from the checkpoint's (each is
    printed and recorded in ``resume_changes.jsonl``); without it they are refused by name.

    ``on_step(iteration, losses)`` is called after every optimizer step (on every rank) with the
    rank's own loss values; raising from it stops the run (checkpoints stay as they are)."""
    info = init_distributed(cfg.device, cfg.ddp_backend)
    try:
        return _train(cfg, resume, info, console or Console(stderr=True), on_step, allow_config_changes)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, resume: bool, info: DistInfo, console: Console,
           on_step: Callable[[int, dict[str, float]], None] | None, allow_config_changes: bool = False) -> TrainResult:
    out = Path(cfg.output_dir)
    resolved = cfg.resolved()
    ckpt, changes = _checkpoint_to_resume(cfg, resolved, resume, allow_config_changes)
    if changes and info.is_main:
        record_resume_changes(out, ckpt["iteration"], changes)
        console.print(f"--resume with config changes at iteration {ckpt['iteration']} (recorded in "
                      f"{out / 'resume_changes.jsonl'}): " + "; ".join(changes))

    seed_everything(cfg.seed + info.rank)
    data_cfg, model_cfg = cfg.data_config(), cfg.model_config()
    data = build_train_data(data_cfg, cfg, info)  # store / vocabulary checks happen here, before any step
    if data.online is not None and data_cfg.label_store and info.is_main:
        console.print(f"online soft labels: the label store {data_cfg.label_store} is not read")
    method = cfg.build_method()
    model, criterion, postprocess = build_model(model_cfg, data.text_embeddings, data.class_image_counts,
                                                method=method)
    finetune_report = None
    if cfg.finetune_from and ckpt is None:
        finetune_report = load_finetune_weights(model, load_checkpoint(cfg.finetune_from)["model"])
        if info.is_main:
            _print_finetune_report(console, cfg.finetune_from, finetune_report)
    method.prepare_model(model)  # the training stage: which parameters train (before the optimizer sees them)
    model.to(info.device)
    criterion.to(info.device)
    amp_dtype = resolve_amp(cfg.amp, info.device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        # The method's state (e.g. BACL's statistics; CLIS's queue, which is each rank's own).
        rank_states = ckpt.get("criterion_ranks") or [ckpt.get("criterion", {})]
        criterion.load_state_dict(rank_states[info.rank] if len(rank_states) == info.world_size else rank_states[0])
        start = int(ckpt["iteration"])
    ddp_model = DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=cfg.find_unused_parameters) if info.distributed else model

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(resolved, indent=2))
        (out / "categories.json").write_text(json.dumps(
            [{"id": c["id"], "name": c["name"], "frequency": c.get("frequency")} for c in data.categories]))
    restore = None
    if ckpt is not None:
        world_states = ckpt.get("rng") or []
        if len(world_states) != info.world_size:
            raise LtDistillError(f"--resume: the checkpoint was written by {len(world_states)} processes, "
                                 f"this run has {info.world_size}; exact resume needs the same number")
        saved_length = ckpt.get("data", {}).get("epoch_length")
        if saved_length is not None and saved_length != len(data.loader):
            raise LtDistillError(f"--resume: an epoch had {saved_length} batches per process when the checkpoint "
                                 f"was written and has {len(data.loader)} now: the training data changed")

        def restore() -> None:  # after the replay, which drew from the global RNG
            set_rng_state(world_states[info.rank])
    stream = batches(data.loader, start, restore)

    categories = [{"id": c["id"], "name": c["name"]} for c in data.categories]
    monitor = TrainMonitor(out, cfg.max_iters, start, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           progress=cfg.progress, console=console)
    window = _Window()
    skipped: Counter = Counter()
    last_logged: dict[str, float] = {}
    eval_metrics = None
    checkpoint_path = None
    batch_images = data_cfg.batch_size * info.world_size
    session_start, session_images = None, 0  # throughput clock starts at the first step (after any replay)
    model.train()
    criterion.train()
    try:
        iteration = start
        t_wait = time.perf_counter()
        while iteration < cfg.max_iters:
            iteration, batch = next(stream)
            data_time = time.perf_counter() - t_wait
            if session_start is None:
                session_start, data_time = time.perf_counter(), 0.0
                window.reset()
            skipped.update(batch.get("skipped", {}))
            label_time = None
            if data.online is not None:  # the teacher scores the CPU batch (RichSem's online labels)
                t_label = time.perf_counter()
                batch = data.online(batch)
                label_time = time.perf_counter() - t_label
            batch = move_batch(batch, info.device)
            if data.embedded is not None:  # stored embeddings -> soft labels over the run's classes, on the device
                batch = data.embedded(batch)
            values = _train_step(ddp_model, criterion, optimizer, scheduler, scaler, batch, amp_dtype,
                                 cfg.optim.clip_max_norm, iteration)
            iteration += 1
            session_images += batch_images
            if on_step is not None:
                on_step(iteration, values)
            window.add(batch["source"], values, data_time, label_time)

            if iteration % cfg.log_every == 0 or iteration == cfg.max_iters:
                last_logged = _log_window(window, iteration, optimizer, batch_images, monitor, info, skipped)
            if info.is_main:
                monitor.advance(iteration, f"loss {values['loss']:.3f}")
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.max_iters:
                checkpoint_path = _checkpoint(out, cfg, model, criterion, optimizer, scheduler, scaler, resolved,
                                              categories, data.loader, iteration, info)
            if cfg.eval.every and (iteration % cfg.eval.every == 0 or iteration == cfg.max_iters):
                eval_metrics = _evaluate(model, postprocess, cfg, data_cfg, categories, out, iteration,
                                         resolve_amp(cfg.eval.amp, info.device), info, monitor)
            t_wait = time.perf_counter()
    finally:
        monitor.close()
    elapsed = time.perf_counter() - session_start if session_start is not None else 0.0
    final = save_final_model(out, model, resolved, categories, cfg.max_iters) if info.is_main else None
    return TrainResult(
        output_dir=out, iterations=cfg.max_iters, final_model=final, checkpoint=checkpoint_path,
        images_per_s=session_images / elapsed if elapsed > 0 else 0.0, losses=last_logged,
        eval_metrics=eval_metrics, skipped=dict(skipped), finetune_report=finetune_report, model=model,
        criterion=criterion,
    )


def _checkpoint_to_resume(cfg: TrainConfig, resolved: dict[str, Any], resume: bool,
                          allow_changes: bool = False) -> tuple[dict[str, Any] | None, list[str]]:
    """The checkpoint ``--resume`` continues from, else None, and the run-changing config differences
    (refused by name unless ``allow_changes``); a fresh run refuses an output folder that already holds
    checkpoints."""
    out = Path(cfg.output_dir)
    if not resume:
        if last_checkpoint(out) is not None:
            raise LtDistillError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                                 "or choose another output_dir")
        return None, []
    _, ckpt, notes = load_resume_checkpoint(out)
    for note in notes:
        print(f"--resume: {note}", file=sys.stderr)
    saved = dict(ckpt["config"])
    saved.setdefault("method", "richsem")  # checkpoints from before methods existed trained RichSem
    data_cfg = cfg.data_config()
    # An embedding store's labels depend on the [teacher] section (prompts) as an online run's do.
    diffs = resume_differences(saved, resolved, data_cfg.soft_labels == "online" or _reads_embeddings(data_cfg))
    if diffs and not allow_changes:
        raise LtDistillError(f"--resume: the config differs from the checkpoint's in {len(diffs)} value(s) "
                             f"({'; '.join(diffs)}); start a new run (optionally --finetune-from the checkpoint), "
                             "or pass --allow-config-changes to apply them from here on")
    return ckpt, diffs


def _reads_embeddings(data_cfg: DataConfig) -> bool:
    """A cached run decoding an embedding store: its [teacher] section (prompts) shapes the labels too."""
    if not data_cfg.label_store or not Path(data_cfg.label_store).exists():
        return False
    return uses_embeddings(LabelReader(data_cfg.label_store), data_cfg)


def _train_step(model: torch.nn.Module, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any, scaler: torch.amp.GradScaler, batch: dict[str, Any], amp_dtype: torch.dtype | None,
                clip_max_norm: float, iteration: int) -> dict[str, float]:
    """One optimizer step on a device batch; returns every loss term, the total and the gradient norm."""
    device_type = batch["images"].device.type
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(batch["images"], batch["pixel_mask"], batch["targets"])
    with torch.autocast(device_type, enabled=False):
        losses = criterion(_float_outputs(outputs), batch["targets"])
        loss = criterion.weighted_total(losses)
    names = [*losses, "loss"]  # one device-to-host copy for every term
    values = dict(zip(names, torch.stack([*losses.values(), loss]).detach().float().tolist()))
    if not math.isfinite(values["loss"]):
        raise LtDistillError(f"loss is {values['loss']} at iteration {iteration + 1} "
                             f"({batch['source']} batch): {values}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_max_norm > 0:
        scaler.unscale_(optimizer)
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return values


def _log_window(window: _Window, iteration: int, optimizer: torch.optim.Optimizer, batch_images: int,
                monitor: TrainMonitor, info: DistInfo, skipped: Counter) -> dict[str, float]:
    elapsed = time.perf_counter() - window.start
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
    common = {"lr": lrs.get("default", next(iter(lrs.values()))),
              **{f"lr_{k}": v for k, v in lrs.items() if k != "default"},
              "images_per_s": window.steps * batch_images / max(elapsed, 1e-9),
              "data_time": window.data_time / max(window.steps, 1),
              "iter_time": elapsed / max(window.steps, 1)}
    if window.label_time is not None:
        common["label_time"] = window.label_time / max(window.steps, 1)
    # Samples skipped so far on this rank, by reason (e.g. unlabelled classification images).
    common.update({f"skipped_{k}": float(v) for k, v in sorted(skipped.items())})
    logged: dict[str, float] = {}
    # Every rank alternates sources in lockstep, so each sees the same sources in a window.
    for source in sorted(window.counts):
        means = reduce_mean(window.means(source), info)
        monitor.log(iteration, {"source": source, **means, **common})
        logged = means
    window.reset()
    return logged


def _checkpoint(out: Path, cfg: TrainConfig, model, criterion, optimizer, scheduler, scaler, resolved, categories,
                loader: AlternatingLoader, iteration: int, info: DistInfo) -> Path | None:
    rng = gather_objects(rng_state(), info)  # every rank's RNG, in rank order (small)
    # A method's state may differ by rank (CLIS's queue of keys): every rank's, in rank order.
    criterion_ranks = gather_objects({k: v.cpu() for k, v in criterion.state_dict().items()}, info)
    if not info.is_main:
        return None
    state = {"model": model.state_dict(), "config": resolved, "categories": categories, "iteration": iteration,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": rng,
             "criterion": criterion_ranks[0], "criterion_ranks": criterion_ranks,  # the method's state
             "data": {"epoch_length": len(loader), "epoch": iteration // len(loader),
                      "batch_in_epoch": iteration % len(loader), "world_size": info.world_size},
             "lt_distill_version": _version()}
    return save_training_checkpoint(out, state, keep=cfg.keep_checkpoints)


def _evaluate(model, postprocess, cfg: TrainConfig, data_cfg: DataConfig, categories, out: Path, iteration: int,
              amp_dtype, info: DistInfo, monitor: TrainMonitor) -> dict[str, float] | None:
    metrics, dets = evaluate_model(
        model, postprocess, cfg.eval.annotations, cfg.eval.images, [c["id"] for c in categories],
        out_dir=out / "eval", device=info.device, image_size=max(data_cfg.det_aug.scales),
        max_size=data_cfg.det_aug.max_size, batch_size=cfg.eval.batch_size, max_images=cfg.eval.max_images,
        amp_dtype=amp_dtype, pixel_mean=data_cfg.pixel_mean, pixel_std=data_cfg.pixel_std)
    if metrics is not None:
        monitor.log(iteration, metrics, kind="eval")
        (out / "eval.json").write_text(json.dumps({"iter": iteration, "metrics": metrics,
                                                   "detections": str(dets)}, indent=2))
    return metrics


def _print_finetune_report(console: Console, source: str, report: dict[str, list[str]]) -> None:
    console.print(f"fine-tuning from {source}: loaded {len(report['loaded'])} tensors")
    for kind in ("mismatched", "missing", "unexpected"):
        if report[kind]:
            console.print(f"  skipped ({kind}, {len(report[kind])}): " + ", ".join(report[kind][:8])
                          + (" ..." if len(report[kind]) > 8 else ""))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lt-distill")
    except PackageNotFoundError:
        return "unknown"
