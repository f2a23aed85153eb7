"""Stage 1: run the CLIP teacher over WebDataset shards and write soft labels into a label store.

Data flow (each stage overlaps the others)::

    DataLoader workers: tar -> decode -> label map -> grid crops / resized image   (ShardChunks)
    main process:       batches of one shard's good samples -> teacher -> top-k     (on the device)
    writer thread:      one whole source shard -> LabelStore.write_shard            (labels, then status)

Teacher batches never cross a source shard and always start at the shard's first good sample, so the
labels of a shard do not depend on which rank, worker or run made them: a resumed or distributed job
writes a store identical, array by array, to a single uninterrupted run.

Resuming: rerunning the same command skips shards the store already holds; a store made with other
settings is refused (naming the fields) unless ``overwrite``. Under torchrun, rank r owns shards
r::world_size (NCCL on CUDA, gloo on the CPU). Object-level labels for LVIS annotation boxes
(:func:`run_objects`) always use the pooled path.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..config import read_json_file
from ..errors import ConfigError, LtDistillError
from ..pipeline.grid import GridSpec, mirror_boxes
from ..pipeline.labelcheck import check_class_list
from ..pipeline.shards import (
    MAX_IMAGE_PIXELS,
    READ_ENDS,
    ShardChunk,
    ShardChunks,
    count_samples,
    expand_shards,
    source_stat,
)
from ..pipeline.teacher import GridCrops, Teacher, TeacherConfig, WholeImage, build_teacher
from ..pipeline.teacher.classifier import label_map
from ..workers import default_workers
from ..pipeline.vocab import (
    HardLabeler,
    LabelSource,
    WnidMapper,
    class_list_sha256,
    label_class_list,
    load_synset_wnids,
    load_vocabulary,
)
from .shards import manifest_counts
from ..store import (
    CLASSIFIER_SPACE,
    CLIP_SPACE,
    EMBED_DTYPES,
    ENCODINGS,
    REASON_CODES,
    REASONS,
    STATUS_DONE,
    STATUS_FAILED,
    LabelStore,
    ObjectBlock,
    ShardResult,
    StoreError,
    StoreExistsError,
    StoreLayout,
    check_compatible,
    crop_rows,
    damaged_shards,
    is_label_store,
    quantise,
)

MODES = ("crops", "pooled")


@dataclasses.dataclass
class PrecomputeConfig:
    """One precompute job. ``batch_size`` counts images per teacher forward (x K crops in crops mode)."""

    store: str = ""
    shards: str = ""  # brace pattern of WebDataset shards ("" with annotations: objects only)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    mode: str = "crops"
    grid: str = "default"
    # Also label each grid box cut and mirrored (rows K..2K-1): a flipped training tile then reads the
    # teacher's label of the mirrored crop, not the unflipped one's. Costs 2x teacher work and label bytes.
    # Classification crops only: object (detection box) labels stay unflipped.
    flip_labels: bool = False
    topk: int = 16
    residual: str = "spread"
    # topk: k classes per crop (one vocabulary, prompt set and temperature); embedding: each crop's teacher
    # image embedding (any vocabulary of the same teacher, decoded at training time); both.
    encoding: str = "topk"
    embed_dtype: str = "int8"  # int8 (+ one float16 scale per crop) or float16
    labels: str = "cls"  # cls | json[:FIELD] | none
    class_list: str = ""  # .cls index space: a named list (pipeline.vocab.CLASS_LISTS) or a file (one wnid a line)
    synset_wnids: str = ""  # synset<TAB>wnid table; "" = the shipped LVIS/WordNet 3.0 table
    label_check: int = 16  # samples per shard whose key / .json wnid is checked against the class list; 0 = off
    pseudo_threshold: float = 0.5  # labels=none: hard label = teacher argmax if its probability exceeds this
    batch_size: int = 16
    workers: int = dataclasses.field(default_factory=default_workers)  # this machine's CPUs minus one, at most 4
    # Samples per worker -> main hand-over, and chunks in flight per worker: with RN50 crops (30 x 3 x 224^2
    # uint8 = 4.5 MB per image) 4 workers hold 4 x 2 x 4 x 4.5 MB = 144 MB of shared memory.
    chunk_size: int = 4
    prefetch: int = 2
    shard_capacity: int = 0  # rows per source shard; 0 = count every shard's samples when creating
    min_image_size: int = 8  # images with a shorter side are failed as too_small
    threads: int = 0  # torch threads of the main process; 0 = this rank's CPUs minus the decode workers (>= 1)
    annotations: str = ""  # LVIS annotation JSON: object-level labels for its boxes
    images: str = ""  # folder of the annotations' images
    object_block_size: int = 4096
    overwrite: bool = False
    # A shard whose read ended early (cut short, empty, not a tar) is not marked done unless accepted:
    # then the samples read are kept and the shard is done with its read record saying how it ended.
    accept_partial_shards: bool = False
    repair: bool = False  # check every chunk of the store first and recompute the shards `store verify` names
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images fail as too_large (decode cost and memory)
    summary_json: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.embed_dtype not in EMBED_DTYPES:
            raise ConfigError(f"embed_dtype must be one of {EMBED_DTYPES}, got {self.embed_dtype!r}")
        for name in ("topk", "batch_size", "chunk_size", "prefetch", "object_block_size", "min_image_size",
                     "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.shard_capacity < 0 or self.threads < 0:
            raise ConfigError("workers, shard_capacity and threads must be >= 0")
        if not 0 <= self.pseudo_threshold <= 1:
            raise ConfigError(f"pseudo_threshold must be in [0, 1], got {self.pseudo_threshold}")
        if bool(self.annotations) != bool(self.images):
            raise ConfigError("object labels need both --annotations (LVIS JSON) and --images (its image folder)")
        if not self.store:
            raise ConfigError("no --store path given")
        if not self.shards and not self.annotations:
            raise ConfigError("nothing to do: give --shards (classification images) and/or --annotations + --images")


# ---------------------------------------------------------------------------------------------------- distributed
@dataclasses.dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this module initialised the process group (and destroys it)

    def broadcast(self, value: Any) -> Any:
        """``value`` from rank 0, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), owns)


def resolve_threads(threads: int, workers: int) -> int:
    """Torch threads for the main process: ``threads``, or (0) the CPUs this rank may use minus its decode
    workers, at least 1. A CPU teacher whose OpenMP threads compete with the workers for the same cores
    loses far more at every parallel region's barrier than the extra thread gains (measured on 2 shared
    cores: 1 thread ran the tiny teacher 4-7x faster than 2 next to 2 busy workers)."""
    if threads:
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(local_world, 1) - workers)


def _agree(d: Dist, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0; every rank returns its result or raises its user error."""
    result, error = None, None
    if d.rank == 0:
        try:
            result = action()
        except LtDistillError as exc:
            error = exc
    message = d.broadcast(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise LtDistillError(message.split(": ", 1)[1])
    return d.broadcast(result)


# ---------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Job:
    """Everything resolved from a config before any label is made."""

    cfg: PrecomputeConfig
    teacher: Teacher
    grid: GridSpec
    urls: list[str]
    labeler: HardLabeler
    settings: dict[str, Any]  # the "precompute" attribute group
    pattern: str


def _canonical_pattern(pattern: str) -> str:
    parts = []
    for part in pattern.split("::"):
        part = part.strip()
        parts.append(part if part.startswith("pipe:") or "://" in part else os.path.abspath(part))
    return "::".join(parts)


def prepare_job(cfg: PrecomputeConfig) -> Job:
    """Resolve shards, vocabulary, labels and grid, and build the teacher (raises user errors first,
    before anything expensive)."""
    urls = expand_shards(cfg.shards) if cfg.shards else []
    grid = GridSpec.parse(cfg.grid)
    if cfg.residual not in ("spread", "renormalise"):
        raise ConfigError(f"residual must be spread or renormalise, got {cfg.residual!r}")
    vocabulary = load_vocabulary(cfg.teacher.vocab)
    if cfg.encoding != "embedding" and cfg.topk > len(vocabulary):
        raise ConfigError(f"topk {cfg.topk} exceeds the vocabulary's {len(vocabulary)} classes")
    source = LabelSource.parse(cfg.labels)
    class_list = label_class_list(source, cfg.class_list) if urls else None  # objects-only runs have no .cls
    mapper = WnidMapper(vocabulary, load_synset_wnids(cfg.synset_wnids or None))
    labeler = HardLabeler(source, mapper, class_list)
    if urls and class_list is not None:  # before the teacher is built: a wrong list must cost nothing
        check_class_list(urls, source, cfg.class_list, class_list, cfg.label_check)
    teacher_cfg = dataclasses.replace(cfg.teacher)
    k = crop_rows(grid.num_boxes, cfg.flip_labels)
    teacher_cfg.crop_batch = cfg.batch_size * k
    teacher_cfg.pooled_batch = cfg.batch_size
    teacher = build_teacher(teacher_cfg, vocabulary)
    if urls:
        teacher.engine(cfg.mode)  # build + parity-check now: the store records the engine actually used
    if cfg.annotations:
        teacher.engine("pooled")
    settings = {
        "labels": source.spec,
        "class_list": cfg.class_list if class_list is not None else None,
        "class_list_sha256": class_list_sha256(class_list) if class_list is not None else None,
        "mapped_classes": len(set(mapper.wnid_to_class.values())),
        "pseudo_threshold": cfg.pseudo_threshold if source.kind == "none" else None,
        "min_image_size": cfg.min_image_size,
        "batch_size": cfg.batch_size,
    }
    return Job(cfg, teacher, grid, urls, labeler, settings, _canonical_pattern(cfg.shards) if cfg.shards else "")


def expected_attributes(job: Job) -> dict[str, Any]:
    """Attributes a store must have for this job to resume it (dotted paths -> values)."""
    prov = job.teacher.provenance(job.cfg.mode)
    expected = {
        "vocabulary.sha256": job.teacher.vocabulary.sha256,
        "grid.spec": job.grid.spec,
        "grid.flip_labels": job.cfg.flip_labels,
        "encoding.kind": job.cfg.encoding,
        "encoding.topk": _layout_topk(job.cfg),
        "source.pattern": job.pattern,
        "layout.num_shards": len(job.urls),
    }
    if job.cfg.encoding != "embedding":
        expected["encoding.residual"] = job.cfg.residual
    if job.cfg.encoding != "topk":
        expected["layout.embed_dim"] = _embedding_dim(job.teacher)
        if _is_classifier(job.teacher):
            expected["encoding.embedding.residual"] = job.cfg.residual
        expected["layout.embed_dtype"] = job.cfg.embed_dtype
    for field in ("model", "weights_sha256", "mode", "engine", "precision", "input_size", "preprocess", "pooled_size",
                  "temperature", "prompt_templates", "synonyms", "text_fingerprint"):
        expected[f"teacher.{field}"] = prov[field]
    for field in ("labels", "class_list_sha256", "pseudo_threshold", "min_image_size"):
        expected[f"precompute.{field}"] = job.settings[field]
    if job.cfg.shard_capacity:
        expected["layout.shard_capacity"] = job.cfg.shard_capacity
    return expected


def _is_classifier(teacher: Teacher) -> bool:
    return getattr(teacher, "family", "clip") == "classifier"


def _embedding_dim(teacher: Teacher) -> int:
    """D of what the embedding encoding stores: the joint image-text space of a CLIP teacher, the penultimate
    features of a classifier teacher."""
    if _is_classifier(teacher):
        return int(teacher.embedding_dim)
    return int(teacher.text_embeddings.shape[1])


def _layout_topk(cfg: PrecomputeConfig) -> int:
    return 0 if cfg.encoding == "embedding" else cfg.topk


def store_attrs_for_check(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as a resume check reads them: stores made before the embedding encoding are top-k, and
    those made before mirror rows have none."""
    encoding = dict(attrs.get("encoding", {}))
    encoding.setdefault("kind", "topk")
    grid = dict(attrs.get("grid", {}))
    grid.setdefault("flip_labels", False)
    return {**attrs, "encoding": encoding, "grid": grid}


def embedding_description(teacher: Teacher, residual: str = "spread") -> dict[str, Any]:
    """What a reader needs to decode a store's embeddings: the logit scale and temperature of the teacher,
    and the identity of its text tower (class text embeddings for any vocabulary must come from it) or, for
    a classifier teacher, of the classifier whose head the store keeps (``head/``) and the ``residual``
    policy for the mass of label-space classes that the vocabulary does not have."""
    if _is_classifier(teacher):
        return {
            "residual": residual,
            "logit_scale": 1.0,
            "temperature": teacher.temperature,
            "space": CLASSIFIER_SPACE,
            "normalised": "no: penultimate features (after global pooling, before dropout and the head), "
                          "whose scale the head needs",
            "decode": "softmax((e @ head/weight.T + head/bias) / temperature) over the label space, then "
                      "head/label_map onto the vocabulary (the unmapped label-space mass by the residual policy)",
            "head": teacher.head_identity(),
        }
    return {
        "logit_scale": teacher.logit_scale,
        "temperature": teacher.temperature,
        "space": CLIP_SPACE,
        "text_tower": {"model": teacher.model_name, "weights_sha256": teacher.weights_id,
                       "weights_file": Path(teacher.weights_file).name if teacher.weights_file else None},
    }


def classifier_head_arrays(teacher: Teacher) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A classifier teacher's head as the store keeps it: weight (L, D), bias (L,), label map (L,)."""
    weight, bias = teacher.classifier_head()
    return weight, bias, label_map(teacher.mapping, len(weight))


def _round_up(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def open_or_create_store(job: Job, d: Dist) -> LabelStore:
    """Resume a matching store, or create one (``overwrite`` replaces a mismatching one)."""
    cfg, path = job.cfg, Path(job.cfg.store)

    def decide() -> str:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())) or cfg.overwrite:
            return "create"  # LabelStore.create refuses a directory that is not a label store
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path} exists and is not a label store; refusing to write there")
        # Opening names what is wrong with an old, incomplete or foreign store.
        check_compatible(store_attrs_for_check(LabelStore.open(path, "r").attrs), expected_attributes(job),
                         f"label store {path}")
        return "resume"

    action = _agree(d, decide)
    if action == "create":
        capacity = cfg.shard_capacity
        known = manifest_counts(job.urls) if not capacity else None  # `lt-distill shards` wrote the counts
        if known is not None:
            capacity = _round_up(max(known + [1]))
        if not capacity:  # count every shard's samples, split over ranks
            counts = d.gather({s: count_samples(job.urls[s]) for s in range(d.rank, len(job.urls), d.world)})
            capacity = _round_up(max([n for part in counts for n in part.values()] + [1]))

        def create() -> None:
            prov = job.teacher.provenance(cfg.mode)
            embed = cfg.encoding != "topk"
            layout = StoreLayout(num_shards=len(job.urls), shard_capacity=capacity,
                                 num_crops=crop_rows(job.grid.num_boxes, cfg.flip_labels), topk=_layout_topk(cfg),
                                 num_classes=len(job.teacher.vocabulary),
                                 embed_dim=_embedding_dim(job.teacher) if embed else 0, embed_dtype=cfg.embed_dtype)
            try:
                LabelStore.create(
                    path, layout, teacher=prov, vocabulary=job.teacher.vocabulary.names, grid_spec=job.grid.spec,
                    grid_boxes=job.grid.boxes(), residual=cfg.residual,
                    source={"pattern": job.pattern, "num_shards": len(job.urls)},
                    extra={"precompute": job.settings}, overwrite=cfg.overwrite,
                    text_embeddings=None if job.teacher.text_embeddings is None  # classifiers: no text tower
                    else (job.teacher.text_embeddings.cpu().numpy(), job.teacher.fingerprint),
                    embedding=embedding_description(job.teacher, cfg.residual) if embed else None,
                    classifier_head=classifier_head_arrays(job.teacher)
                    if embed and _is_classifier(job.teacher) else None, flip_labels=cfg.flip_labels)
            except StoreExistsError:
                if cfg.overwrite or not path.exists():
                    raise
                # Another job created it at the same moment: resume it (checked below) like any rerun.

        _agree(d, create)
    store = LabelStore.open(path, "r+")
    check_compatible(store_attrs_for_check(store.attrs), expected_attributes(job), f"label store {path}")
    return store


class PartialShardsError(LtDistillError):
    """Some source shards ended early; everything else was written (the summary lists them)."""


def check_existing(job: Job, full: bool) -> dict[str, Any]:
    """What a rerun must redo in an existing store, and why: absent or damaged text embeddings (rewritten
    here), written shards with missing files (every chunk's crc32c too when ``full``, i.e. ``--repair``) and
    source shards whose file changed since they were labelled. Returns {"shards": [...], "lines": [...]}."""
    store = LabelStore.open(job.cfg.store, "r+")
    lines = []
    problem = repair_text_embeddings(job, store)
    if problem:
        lines.append(f"text embeddings: {problem}; rewrote them")
    problem = repair_classifier_head(job, store)
    if problem:
        lines.append(f"classifier head: {problem}; rewrote it")
    redo = {}
    for shard, why in damaged_shards(store.path, full=full).items():
        redo[shard] = why
        lines.append(f"shard {shard} ({job.urls[shard]}): {why}; recomputing it")
    records = store.shard_read_records()
    num_rows = store.shard_num_rows()
    for shard, url in enumerate(job.urls):
        old = {k: records[shard].get(k) for k in ("size", "mtime_ns")}
        if shard in redo or num_rows[shard] < 0 or old["size"] is None:
            continue
        new = source_stat(url)
        if new != old:
            redo[shard] = "changed"
            lines.append(f"shard {shard} ({url}) changed since it was labelled (size {old['size']} -> "
                         f"{new.get('size')}, mtime changed: {old['mtime_ns'] != new.get('mtime_ns')}); relabelling it")
    return {"shards": sorted(redo), "lines": lines}


def repair_text_embeddings(job: Job, store: LabelStore) -> str | None:
    """Rewrite the store's text embeddings when they are absent or damaged (a crash during their write);
    returns what was wrong, None when they were sound. They are part of a complete store."""
    if job.teacher.text_embeddings is None:  # classifier teachers have no text tower
        return None
    problem = store.text_embeddings_problem(job.teacher.fingerprint["sha256"])
    if problem is not None:
        store.write_text_embeddings(job.teacher.text_embeddings.cpu().numpy(), job.teacher.fingerprint, overwrite=True)
    return problem


def repair_classifier_head(job: Job, store: LabelStore) -> str | None:
    """Rewrite a classifier-feature store's head when it is absent or damaged; returns what was wrong, None
    when it was sound (or the store keeps no head). The head is part of a complete store."""
    if not store.layout.embed_dim or not _is_classifier(job.teacher):
        return None
    problem = store.classifier_head_problem()
    if problem is not None:
        store.write_classifier_head(*classifier_head_arrays(job.teacher), overwrite=True)
    return problem


# ---------------------------------------------------------------------------------------------------- the job
@dataclasses.dataclass
class _ShardState:
    """One source shard in flight in the main process."""

    shard: int
    chunks: list[ShardChunk] = dataclasses.field(default_factory=list)
    pending: list[torch.Tensor] = dataclasses.field(default_factory=list)  # inputs not yet scored
    pending_images: int = 0
    index: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (b, K, k) per batch
    prob: list[torch.Tensor] = dataclasses.field(default_factory=list)
    embedding: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (b, K, D) float32 per batch
    whole_top1: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (b, 2) prob, class (pseudo labels)
    finite: list[torch.Tensor] = dataclasses.field(default_factory=list)


class ShardLabeler:
    """Main-process stage: turns :class:`ShardChunk` items into whole-shard :class:`ShardResult` objects."""

    def __init__(self, teacher: Teacher, mode: str, grid_boxes: np.ndarray, topk: int, batch_size: int,
                 pseudo_threshold: float | None, encoding: str = "topk", embed_dtype: str = "int8",
                 flip_labels: bool = False) -> None:
        self.teacher = teacher
        self.mode = mode
        self.boxes = torch.as_tensor(np.asarray(grid_boxes, dtype=np.float32))
        self.mirror_boxes = torch.as_tensor(mirror_boxes(np.asarray(grid_boxes, dtype=np.float32)))
        self.flip_labels = flip_labels
        # Label rows per image (layout.num_crops) and input rows per image (GridCrops / WholeImage with mirror).
        self.num_rows = crop_rows(len(self.boxes), flip_labels)
        self.rows_per_image = self.num_rows if mode == "crops" else (2 if flip_labels else 1)
        self.topk = topk if encoding != "embedding" else 0
        self.embed = encoding != "topk"
        self.embed_dtype = embed_dtype
        self.batch_size = batch_size
        self.pseudo_threshold = pseudo_threshold
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        self.whole = int(torch.argmax(areas))  # the box whose top-1 is an image's pseudo label
        self.states: dict[int, _ShardState] = {}

    def _take(self, st: _ShardState, rows: int) -> torch.Tensor:
        """The next ``rows`` pending input rows of a shard as one tensor (pinned for an async copy to a GPU)."""
        parts, taken = [], 0
        while taken < rows:
            head = st.pending[0]
            need = rows - taken
            if len(head) <= need:
                parts.append(st.pending.pop(0))
            else:
                parts.append(head[:need])
                st.pending[0] = head[need:]
            taken += len(parts[-1])
        if self.teacher.device.type != "cuda":
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        out = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        return torch.cat(parts, out=out)

    def _run_batch(self, st: _ShardState, images: int) -> None:
        batch = self._take(st, images * self.rows_per_image)
        st.pending_images -= images
        if self.mode == "crops":
            feats = self.teacher.crop_features(batch).view(images, self.num_rows, -1)
        elif self.flip_labels:  # (image, mirrored image) pairs: grid boxes on the first, mirrored boxes on the second
            pairs = batch.view(images, 2, *batch.shape[1:])
            feats = torch.cat([self.teacher.pooled_features(pairs[:, 0], self.boxes),
                               self.teacher.pooled_features(pairs[:, 1], self.mirror_boxes)], dim=1)
        else:
            feats = self.teacher.pooled_features(batch, self.boxes)
        finite = torch.isfinite(feats).all(dim=2).all(dim=1)
        if self.topk:
            probs = self.teacher.probs_from_features(feats)
            finite &= torch.isfinite(probs).all(dim=2).all(dim=1)
            prob, index = torch.topk(torch.nan_to_num(probs, nan=0.0), self.topk, dim=-1)
            st.index.append(index)
            st.prob.append(prob)
            st.whole_top1.append(torch.stack([prob[:, self.whole, 0], index[:, self.whole, 0].to(prob)], 1))
        elif self.pseudo_threshold is not None:
            top_p, top_i = self.teacher.probs_from_features(feats[:, self.whole]).max(dim=-1)
            st.whole_top1.append(torch.stack([top_p, top_i.to(top_p)], 1))
        if self.embed:
            st.embedding.append(feats.float())
        st.finite.append(finite)

    def add(self, chunk: ShardChunk) -> ShardResult | None:
        """Take one chunk; returns the shard's result when this chunk was its last."""
        st = self.states.setdefault(chunk.shard, _ShardState(chunk.shard))
        st.chunks.append(dataclasses.replace(chunk, inputs=torch.empty(0)))
        good = int(chunk.ok.sum())
        if good:
            st.pending.append(chunk.inputs)
            st.pending_images += good
        while st.pending_images >= self.batch_size:
            self._run_batch(st, self.batch_size)
        if not chunk.end:
            return None
        if st.pending_images:
            self._run_batch(st, st.pending_images)
        del self.states[chunk.shard]
        return self._finish(st)

    def _finish(self, st: _ShardState) -> ShardResult:
        keys = [k for c in st.chunks for k in c.keys]
        positions = torch.cat([c.positions for c in st.chunks]).numpy()
        if not np.array_equal(positions, np.arange(len(keys))):
            raise RuntimeError(f"shard {st.shard}: chunks arrived out of order")
        sizes = torch.cat([c.sizes for c in st.chunks]).numpy().reshape(-1, 2)
        hard = torch.cat([c.hard_labels for c in st.chunks]).numpy().astype(np.int32)
        reasons = torch.cat([c.reasons for c in st.chunks]).numpy().astype(np.uint8)
        n, kk, k = len(keys), self.num_rows, self.topk
        labels: dict[str, np.ndarray] = {}
        if k:
            labels["index"] = np.full((n, kk, k), -1, np.int16)
            labels["prob"] = np.zeros((n, kk, k), np.float16)
        if self.embed:
            d = _embedding_dim(self.teacher)
            labels["embedding"] = np.zeros((n, kk, d), self.embed_dtype)
            if self.embed_dtype == "int8":
                labels["embedding_scale"] = np.zeros((n, kk), np.float16)
        good = np.nonzero(reasons == 0)[0]
        if len(good):
            finite = torch.cat(st.finite).cpu().numpy()
            if k:
                labels["index"][good] = torch.cat(st.index).cpu().numpy().astype(np.int16)
                labels["prob"][good] = torch.cat(st.prob).float().cpu().numpy().astype(np.float16)
            if self.embed:
                feats = torch.nan_to_num(torch.cat(st.embedding)).cpu().numpy()
                codes, scale = quantise(feats, self.embed_dtype)
                labels["embedding"][good] = codes
                if scale is not None:
                    labels["embedding_scale"][good] = scale
            reasons[good[~finite]] = REASON_CODES["teacher_error"]
            if self.pseudo_threshold is not None:
                top = torch.cat(st.whole_top1).float().cpu().numpy()
                hard[good] = np.where(top[:, 0] > self.pseudo_threshold, top[:, 1].astype(np.int64), -1)
        reasons[duplicate_rows(keys)] = REASON_CODES["duplicate_key"]
        status = np.where(reasons == 0, STATUS_DONE, STATUS_FAILED).astype(np.uint8)
        hard[status != STATUS_DONE] = -1
        return ShardResult(keys=keys, sizes=sizes, hard_labels=hard, status=status, reasons=reasons,
                           read=dict(st.chunks[-1].read), **labels)


def duplicate_rows(keys: list[str]) -> np.ndarray:
    """(n,) bool: rows whose key occurs more than once in the shard. Every occurrence fails (reason
    ``duplicate_key``): which of them is "the" image is unknowable, and a key must name one row."""
    counts = collections.Counter(keys)
    return np.array([counts[k] > 1 for k in keys], dtype=bool)


class _Progress:
    """A rich progress bar over images, with images/s and ETA. The total is estimated from the shards'
    row counts (those already in the store, then those finished by this run) and refined as shards finish."""

    def __init__(self, enabled: bool, shards: int, per_shard: float) -> None:
        self.enabled = enabled and shards > 0
        self.remaining_shards = shards
        self.per_shard = per_shard
        self.done_images = 0
        self.finished_rows: list[int] = []
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("[bold]precompute"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("images"), TextColumn("{task.fields[rate]:>8.1f} img/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("precompute", total=int(shards * per_shard), rate=0.0)
            self.start = time.perf_counter()
            self.bar.start()

    def advance(self, images: int) -> None:
        self.done_images += images
        if self.enabled:
            rate = self.done_images / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=images, rate=rate)

    def shard_done(self, rows: int) -> None:
        self.remaining_shards -= 1
        self.finished_rows.append(rows)
        self.per_shard = sum(self.finished_rows) / len(self.finished_rows)
        if self.enabled:
            self.bar.update(self.task, total=self.done_images + int(self.remaining_shards * self.per_shard))

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def label_shards(job: Job, store: LabelStore, shards: list[int], progress: bool = True) -> dict[str, Any]:
    """Label ``shards`` (indices into ``job.urls``) and write each into ``store``. Returns this process's
    counts: shards, images done / failed by reason, notes, seconds."""
    cfg, teacher = job.cfg, job.teacher
    if cfg.mode == "crops":
        prepare = GridCrops(job.grid.boxes(), teacher.preprocess, mirror=cfg.flip_labels)
    else:
        prepare = WholeImage(teacher.pooled_preprocess, mirror=cfg.flip_labels)
    dataset = ShardChunks([(s, job.urls[s]) for s in shards], job.labeler, prepare, prepare.output_shape,
                          chunk_size=cfg.chunk_size, min_image_size=cfg.min_image_size,
                          max_pixels=cfg.max_image_pixels)
    workers = min(cfg.workers, len(shards))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        prefetch_factor=cfg.prefetch if workers else None)
    labeler = ShardLabeler(teacher, cfg.mode, job.grid.boxes(), cfg.topk, cfg.batch_size,
                           cfg.pseudo_threshold if job.labeler.source.kind == "none" else None,
                           cfg.encoding, cfg.embed_dtype, cfg.flip_labels)
    rows_done = store.shard_num_rows()[store.shards_done()]
    per_shard = float(rows_done.mean()) if len(rows_done) else float(store.layout.shard_capacity)
    bar = _Progress(progress, len(shards), per_shard)
    counts: dict[str, Any] = {"shards": 0, "done": 0, "failed": collections.Counter(), "notes": [], "partial": []}
    start = time.perf_counter()
    in_flight: collections.deque = collections.deque()

    def write(shard: int, result: ShardResult) -> ShardResult:
        store.write_shard(shard, result)
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lt-store-writer") as writer:
        def collect(future: concurrent.futures.Future) -> None:
            result = future.result()
            counts["shards"] += 1
            counts["done"] += int((result.status == STATUS_DONE).sum())
            for code in result.reasons[result.status == STATUS_FAILED]:
                counts["failed"][REASONS[int(code)]] += 1
            bar.shard_done(len(result))

        try:
            capacity = store.layout.shard_capacity
            for chunk in loader:
                if len(chunk.positions) and int(chunk.positions[-1]) >= capacity:
                    raise StoreError(f"shard {chunk.shard} ({job.urls[chunk.shard]}) has more than {capacity} samples, "
                                     "the store's shard capacity; recreate the store with a larger --shard-capacity "
                                     "(or 0 to count)")
                counts["notes"].extend(chunk.notes)
                result = labeler.add(chunk)
                bar.advance(len(chunk.keys))
                if result is not None and result.read.get("end", "complete") != "complete":
                    if not cfg.accept_partial_shards:  # not done: a rerun reads it again
                        counts["partial"].append(f"shard {chunk.shard} ({job.urls[chunk.shard]}): "
                                                 f"{READ_ENDS[result.read['end']]}, {len(result)} samples read")
                        bar.shard_done(len(result))
                        continue
                    result.read["accepted"] = True
                if result is not None:
                    in_flight.append(writer.submit(write, chunk.shard, result))
                    while len(in_flight) > 2:  # bound memory: at most two shards waiting to be written
                        collect(in_flight.popleft())
            while in_flight:
                collect(in_flight.popleft())
        finally:
            bar.close()
    counts["seconds"] = time.perf_counter() - start
    counts["failed"] = dict(counts["failed"])
    return counts


def _merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    failed: collections.Counter = collections.Counter()
    for p in parts:
        failed.update(p["failed"])
    return {
        "shards": sum(p["shards"] for p in parts),
        "images_done": sum(p["done"] for p in parts),
        "images_failed": sum(failed.values()),
        "failed_by_reason": dict(sorted(failed.items())),
        "notes": [n for p in parts for n in p["notes"]],
        "partial_shards": sorted(n for p in parts for n in p["partial"]),
        "seconds": max((p["seconds"] for p in parts), default=0.0),
    }


def run_precompute(cfg: PrecomputeConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job described by ``cfg`` (resuming a matching store). Returns the summary (also written
    to ``cfg.summary_json`` when set); only rank 0 logs."""
    d = init_distributed()
    say = log if d.rank == 0 else (lambda _msg: None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(cfg.threads, cfg.workers))
    try:
        t0 = time.perf_counter()
        job = prepare_job(cfg)
        summary: dict[str, Any] = {"store": str(cfg.store), "world_size": d.world,
                                   "teacher": {k: v for k, v in job.teacher.provenance(cfg.mode).items()
                                               if k in ("model", "engine", "precision", "mode", "input_size",
                                                        "pooled_size")}}
        summary["teacher"]["device"] = str(job.teacher.device)
        summary["teacher"]["torch_threads"] = torch.get_num_threads()
        if job.urls:
            store = open_or_create_store(job, d)
            redo = _agree(d, lambda: check_existing(job, cfg.repair))
            for line in redo["lines"]:
                say(line)
            done = store.shards_done()
            done[redo["shards"]] = False
            mine = [s for s in range(d.rank, len(job.urls), d.world) if not done[s]]
            say(f"precompute: {len(job.urls)} shards, {int(done.sum())} already done, "
                f"{sum(d.gather(len(mine)))} to label ({cfg.mode}, grid {job.grid.spec} K={job.grid.num_boxes}"
                f"{' + mirror rows' if cfg.flip_labels else ''}, "
                f"teacher {job.teacher.model_name} on {job.teacher.device}, engine {job.teacher.engine(cfg.mode).name})")
            counts = label_shards(job, store, mine, progress=cfg.progress and d.rank == 0)
            merged = _merge_counts(d.gather(counts))
            d.barrier()
            status = store.group["rows/status"][:]
            reasons = store.group["rows/reason"][:][status == STATUS_FAILED]
            merged["images_per_s"] = (merged["images_done"] + merged["images_failed"]) / max(merged["seconds"], 1e-9)
            merged["store"] = {
                "shards_done": int(store.shards_done().sum()), "shards_total": len(job.urls),
                "images_done": int((status == STATUS_DONE).sum()), "images_failed": int((status == STATUS_FAILED).sum()),
                "failed_by_reason": {REASONS[int(c)]: int(n) for c, n in zip(*np.unique(reasons, return_counts=True))},
            }
            summary["classification"] = merged
        if cfg.annotations:
            summary["objects"] = run_objects(job, d, say)
        summary["seconds"] = time.perf_counter() - t0
        if d.rank == 0:
            _print_summary(summary, say)
            if cfg.summary_json:
                Path(cfg.summary_json).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg.summary_json).write_text(json.dumps(summary, indent=2) + "\n")
        partial = summary.get("classification", {}).get("partial_shards", [])
        if partial:
            raise PartialShardsError(
                f"{len(partial)} shard(s) could not be read whole and are not marked done (first: {partial[0]}); "
                "restore them and rerun, or rerun with --accept-partial-shards to keep the samples read")
        return summary
    finally:
        torch.set_num_threads(threads_before)
        if d.owns_group:
            dist.destroy_process_group()


def _print_summary(summary: dict[str, Any], say: Callable[[str], None]) -> None:
    c = summary.get("classification")
    if c is not None:
        failed = ", ".join(f"{k} {v}" for k, v in c["failed_by_reason"].items()) or "none"
        say(f"this run: {c['shards']} shards, {c['images_done']} images done, {c['images_failed']} failed "
            f"({failed}), {c['images_per_s']:.1f} images/s over {c['seconds']:.1f} s")
        s = c["store"]
        failed = ", ".join(f"{k} {v}" for k, v in s["failed_by_reason"].items()) or "none"
        say(f"store: {s['shards_done']}/{s['shards_total']} shards done, {s['images_done']} images done, "
            f"{s['images_failed']} failed ({failed})")
        for note in c["notes"]:
            say(f"note: {note}")
        for line in c.get("partial_shards", []):
            say(f"not done: {line}")
    o = summary.get("objects")
    if o is not None:
        say(f"objects: {o['done']} of {o['num_objects']} boxes labelled this run in {o['blocks']} blocks, "
            f"{o['failed']} failed ({', '.join(f'{k} {v}' for k, v in o['failed_by_reason'].items()) or 'none'})")


# ---------------------------------------------------------------------------------------------------- objects
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _image_path(images_dir: Path, image: dict[str, Any]) -> Path:
    """Where an LVIS/COCO image is: ``file_name``, else the tail of ``coco_url`` (split/name, then name)."""
    candidates = []
    if image.get("file_name"):
        candidates.append(images_dir / image["file_name"])
    url = image.get("coco_url") or ""
    if url:
        parts = url.rstrip("/").split("/")
        candidates += [images_dir / "/".join(parts[-2:]), images_dir / parts[-1]]
    for path in candidates:
        if path.is_file():
            return path
    return candidates[0] if candidates else images_dir / str(image["id"])


def load_annotations(path: str) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """LVIS/COCO annotation JSON -> (annotations sorted by (image_id, id), images by id)."""
    p = Path(path)
    data = read_json_file(p, "annotation file")
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ConfigError(f"annotation file {p} needs 'images' and 'annotations' (LVIS/COCO format)")
    anns = sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"]))
    if not anns:
        raise ConfigError(f"annotation file {p} has no annotations")
    return anns, {img["id"]: img for img in data["images"]}


class _ObjectImages(torch.utils.data.IterableDataset):
    """Per pending object block, each of its images decoded and resized for the pooled path:
    yields (block, image_id, image (3, P, P) uint8 or None, (h, w), end_of_block)."""

    def __init__(self, blocks: list[tuple[int, list[int]]], paths: dict[int, str], size) -> None:
        super().__init__()
        self.blocks, self.paths, self.prepare = blocks, paths, WholeImage(size)  # size: int or Preprocess

    def __iter__(self):
        from ..pipeline.teacher import ImageDecodeError, decode_image

        info = torch.utils.data.get_worker_info()
        blocks = self.blocks if info is None else self.blocks[info.id::info.num_workers]
        for block, image_ids in blocks:
            for i, image_id in enumerate(image_ids):
                try:
                    image = decode_image(Path(self.paths[image_id]).read_bytes())
                except (OSError, ImageDecodeError):
                    yield block, image_id, None, (0, 0), i == len(image_ids) - 1
                    continue
                yield block, image_id, self.prepare(image)[0], image.shape[:2], i == len(image_ids) - 1


def run_objects(job: Job, d: Dist, say: Callable[[str], None]) -> dict[str, Any]:
    """Object-level labels (pooled path) for every annotation box, written block by block."""
    cfg, teacher = job.cfg, job.teacher
    anns, images = load_annotations(cfg.annotations)
    images_dir = Path(cfg.images)
    if not images_dir.is_dir():
        raise ConfigError(f"image folder not found: {images_dir}")
    path = Path(cfg.store)
    source = json.dumps({"annotations": os.path.abspath(cfg.annotations), "sha256": _sha256_file(Path(cfg.annotations)),
                         "pooled_size": teacher.pooled_size, "text_fingerprint": teacher.fingerprint["sha256"]},
                        sort_keys=True)

    def setup() -> None:
        if not is_label_store(path):
            raise StoreError(f"no label store at {path}: object labels go into a store made by a "
                             "classification run (give --shards too)")
        store = LabelStore.open(path, "r+")
        expected = {"vocabulary.sha256": teacher.vocabulary.sha256, "teacher.model": teacher.model_name,
                    "teacher.weights_sha256": teacher.weights_id,
                    "teacher.text_fingerprint": teacher.fingerprint["sha256"],
                    "encoding.kind": cfg.encoding, "encoding.topk": _layout_topk(cfg)}
        if cfg.encoding != "topk":
            expected["layout.embed_dtype"] = cfg.embed_dtype
        check_compatible(store_attrs_for_check(store.attrs), expected, f"label store {path}")
        store.create_objects(len(anns), cfg.object_block_size, source=source, overwrite=cfg.overwrite)

    _agree(d, setup)
    store = LabelStore.open(path, "r+")
    bs = cfg.object_block_size
    done = store.objects_blocks_done()
    pending = [b for b in range(d.rank, len(done), d.world) if not done[b]]
    blocks = []
    for b in pending:
        ids = list(dict.fromkeys(a["image_id"] for a in anns[b * bs:(b + 1) * bs]))
        blocks.append((b, ids))
    paths = {}
    for _, ids in blocks:
        for image_id in ids:
            if image_id not in images:
                raise ConfigError(f"annotation refers to image id {image_id}, which the JSON does not list")
            paths[image_id] = str(_image_path(images_dir, images[image_id]))
    loader = DataLoader(_ObjectImages(blocks, paths, teacher.pooled_preprocess), batch_size=None,
                        num_workers=min(cfg.workers, len(blocks)),
                        pin_memory=teacher.device.type == "cuda")
    counts = {"blocks": 0, "done": 0, "failed": collections.Counter()}
    block_images: dict[int, list] = collections.defaultdict(list)
    for block, image_id, image, size, end in loader:
        block_images[block].append((image_id, image, size))
        if not end:
            continue
        items = block_images.pop(block)
        block_anns = anns[block * bs:(block + 1) * bs]
        data, failed_reasons = _label_object_block(teacher, store.layout, cfg.batch_size, block_anns, items)
        store.write_objects_block(block, data)
        counts["blocks"] += 1
        counts["done"] += int((data.status == STATUS_DONE).sum())
        counts["failed"].update(failed_reasons)
    parts = d.gather({"blocks": counts["blocks"], "done": counts["done"], "failed": dict(counts["failed"])})
    failed: collections.Counter = collections.Counter()
    for p in parts:
        failed.update(p["failed"])
    return {"num_objects": len(anns), "blocks": sum(p["blocks"] for p in parts),
            "done": sum(p["done"] for p in parts), "failed": sum(failed.values()),
            "failed_by_reason": dict(sorted(failed.items()))}


def _finite_box(bbox: Any) -> tuple[float, float, float, float] | None:
    """An annotation's xywh box as four finite floats, None when it is anything else (NaN, inf, strings,
    the wrong length): such a box is failed as ``invalid_box``, never labelled."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    box = tuple(float(v) for v in bbox)
    return box if all(np.isfinite(box)) else None


def _label_object_block(teacher: Teacher, layout: StoreLayout, batch_size: int, anns: list[dict[str, Any]],
                        items: list[tuple[int, torch.Tensor | None, tuple[int, int]]]) -> tuple[ObjectBlock, list[str]]:
    """Pooled labels for one block's annotations in the store's encoding(s); ``items`` are its images in
    order of first use. Returns the block and the failure reason of each failed annotation."""
    n, topk = len(anns), layout.topk
    index = np.full((n, topk), -1, np.int16)
    prob = np.zeros((n, topk), np.float16)
    feats_out = np.zeros((n, layout.embed_dim), np.float32)
    status = np.full(n, STATUS_FAILED, np.uint8)
    reasons: list[str | None] = [None] * n
    by_image: dict[int, list[int]] = collections.defaultdict(list)
    for i, a in enumerate(anns):
        by_image[a["image_id"]].append(i)
    good = [(image_id, image, size) for image_id, image, size in items if image is not None]
    for image_id, image, _ in items:
        if image is None:
            for i in by_image[image_id]:
                reasons[i] = "undecodable"
    for start in range(0, len(good), batch_size):
        batch = good[start:start + batch_size]
        rows = [by_image[image_id] for image_id, _, _ in batch]
        kmax = max(len(r) for r in rows)
        boxes = np.zeros((len(batch), kmax, 4), np.float32)
        valid = np.zeros((len(batch), kmax), bool)
        for j, ((_, _, (h, w)), idxs) in enumerate(zip(batch, rows)):
            for slot, i in enumerate(idxs):
                box = _finite_box(anns[i].get("bbox"))
                if box is None:
                    reasons[i] = "invalid_box"
                    continue
                x, y, bw, bh = box
                if bw <= 0 or bh <= 0:
                    reasons[i] = "too_small"
                    continue
                boxes[j, slot] = [max(x, 0) / w, max(y, 0) / h, min(x + bw, w) / w, min(y + bh, h) / h]
                valid[j, slot] = True
        feats = teacher.pooled_features(torch.stack([im for _, im, _ in batch]), torch.from_numpy(boxes))
        finite_t = torch.isfinite(feats).all(-1)
        if topk:
            probs = teacher.probs_from_features(feats)
            finite_t &= torch.isfinite(probs).all(-1)
            top_p, top_i = torch.topk(probs, topk, dim=-1)
            top_p, top_i = top_p.float().cpu().numpy(), top_i.cpu().numpy()
        feats_np = feats.float().cpu().numpy()
        finite = finite_t.cpu().numpy()
        for j, idxs in enumerate(rows):
            for slot, i in enumerate(idxs):
                if not valid[j, slot]:
                    continue
                if not finite[j, slot]:
                    reasons[i] = "teacher_error"
                    continue
                if topk:
                    index[i], prob[i] = top_i[j, slot], top_p[j, slot]
                if layout.embed_dim:
                    feats_out[i] = feats_np[j, slot]
                status[i] = STATUS_DONE
    labels: dict[str, np.ndarray | None] = {}
    if topk:
        labels.update(index=index, prob=prob)
    if layout.embed_dim:
        codes, scale = quantise(feats_out, layout.embed_dtype)
        labels.update(embedding=codes, embedding_scale=scale)
    block = ObjectBlock(ann_ids=np.array([a["id"] for a in anns], np.int64),
                        image_ids=np.array([a["image_id"] for a in anns], np.int64),
                        boxes=np.array([_finite_box(a.get("bbox")) or (0, 0, 0, 0) for a in anns], np.float32).reshape(-1, 4),
                        status=status, **labels)
    return block, [r or "undecodable" for r, st in zip(reasons, status) if st != STATUS_DONE]
