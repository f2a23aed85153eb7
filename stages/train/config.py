"""Typed configuration of a training run (``lt-distill train --config FILE --set key=value``).

The model and data sections are *overrides* on a named preset of their own registry
(``pipeline.model.PRESETS``, ``pipeline.data.PRESETS``), so a config file only lists what differs::

    output_dir = "runs/lvis_r50"
    model_preset = "dino-r50-4scale"
    data_preset = "default"
    max_iters = 90000

    [data]
    det_annotations = "lvis/lvis_v1_train.json"
    det_images = "coco/train2017"
    cls_shards = "in21k/in21k-{000000..002047}.tar"
    label_store = "stores/in21k_vitb32.zarr"

    [optim]
    lr_drop = [82500]

With ``data.soft_labels = "online"`` (RichSem's original behaviour, kept for comparison) no label
store is read: the ``[teacher]`` section (a :class:`~lt_distill.pipeline.teacher.TeacherConfig`)
names the CLIP teacher that scores every batch's tiles and boxes during training, and the
``[hard_labels]`` section says where the classification images' hard labels come from (as
``lt-distill precompute --labels/--class-list/--synset-wnids``). Both sections are ignored in cached
mode::

    [data]
    soft_labels = "online"

    [teacher]
    model = "RN50"
    weights = "weights/RN50.openai.bin"
    vocab = "lvis/lvis_v1_train.json"  # must list the detection categories, by name, in id order

``method`` picks the long-tail method (``pipeline.methods``: richsem, the default; baseline; bacl; ...)
and ``[method_options]`` its own settings; the method's overrides of the model and data sections are
applied on top of the run's ``[model]`` / ``[data]`` (they define the method), and ``resolved()``
records the result::

    method = "bacl"
    [method_options]
    stage = "classifier"

Everything is validated when the config is built (unknown keys, wrong types, bad values and
unknown presets are errors that name the key), before any data is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from ...config import apply_overrides, deep_merge, from_dict, load_config_file, to_dict
from ...errors import ConfigError
from ...pipeline.data.config import DataConfig, data_config
from ...pipeline.methods import DEFAULT_METHOD, Method, build_method, method_options_dict
from ...pipeline.model.config import ModelConfig, model_config
from ...pipeline.teacher.config import TeacherConfig
from ...pipeline.vocab import LabelSource


@dataclasses.dataclass
class OptimConfig:
    """AdamW with DINO's parameter groups and a step schedule (iterations, not epochs)."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5  # parameters under ``backbone_names``; 0 freezes the backbone
    backbone_names: list[str] = dataclasses.field(default_factory=lambda: ["features.backbone."])
    # "dino": backbone at lr_backbone, the rest at lr (DINO/RichSem param_dict_type='default');
    # "deformable_detr": also sampling offsets and reference points at lr * lr_linear_proj_mult.
    param_groups: Literal["dino", "deformable_detr"] = "dino"
    lr_linear_proj_mult: float = 0.1  # "deformable_detr" only
    linear_proj_names: list[str] = dataclasses.field(default_factory=lambda: ["sampling_offsets", "reference_points"])
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_max_norm: float = 0.1  # total gradient norm; 0 disables clipping
    lr_drop: list[int] = dataclasses.field(default_factory=list)  # iterations where lr *= lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 0  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.001

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.lr_backbone < 0 or self.lr_linear_proj_mult < 0:
            raise ValueError("lr must be > 0, lr_backbone and lr_linear_proj_mult >= 0")
        if self.weight_decay < 0 or self.clip_max_norm < 0 or self.warmup_iters < 0:
            raise ValueError("weight_decay, clip_max_norm and warmup_iters must be >= 0")
        if sorted(self.lr_drop) != list(self.lr_drop) or any(i < 1 for i in self.lr_drop):
            raise ValueError(f"lr_drop must be increasing positive iterations, got {self.lr_drop}")
        if not 0 < self.lr_gamma <= 1 or not 0 < self.warmup_factor <= 1:
            raise ValueError("lr_gamma and warmup_factor must be in (0, 1]")


@dataclasses.dataclass
class StoreCheckConfig:
    """What the label store must have been made with; the vocabulary (the detection categories in id
    order) is always checked, the other fields when set."""

    grid: str = ""  # grid spec or name ("default"); "" accepts the store's grid
    topk: int = 0  # 0 accepts the store's top-k
    residual: str = ""  # "spread" | "renormalise"; "" accepts the store's
    teacher_model: str = ""  # open_clip model name; "" accepts any
    class_list: str = ""  # the .cls index space precompute labelled with (named list or file); "" accepts any


@dataclasses.dataclass
class HardLabelConfig:
    """Online mode only: the classification images' hard labels, mapped to the vocabulary as precompute
    maps them (:class:`~lt_distill.pipeline.vocab.HardLabeler`). ``source``: ``cls`` (an index into
    ``class_list``), ``json`` / ``json:FIELD`` (a wnid or class-list index in the ``.json`` member) or
    ``none``: the tile's teacher top-1 when its probability exceeds ``pseudo_threshold``, else -1
    (RichSem Eq. 7)."""

    source: str = "cls"
    class_list: str = ""  # .cls index space: a named list (pipeline.vocab.CLASS_LISTS) or a file
    synset_wnids: str = ""  # synset<TAB>wnid table; "" = the shipped LVIS/WordNet 3.0 table
    pseudo_threshold: float = 0.5

    def __post_init__(self) -> None:
        LabelSource.parse(self.source)  # raises ConfigError naming the bad value
        if not 0.0 <= self.pseudo_threshold <= 1.0:
            raise ConfigError(f"hard_labels.pseudo_threshold must be in [0, 1], got {self.pseudo_threshold}")


@dataclasses.dataclass
class EvalConfig:
    """Periodic evaluation during training (``every`` iterations and at the end; 0 = never)."""

    every: int = 0
    annotations: str = ""  # LVIS/COCO JSON of the evaluation images
    images: str = ""
    max_images: int = 0  # 0 = all images of the annotation file
    batch_size: int = 2
    # Autocast of backbone / encoder / decoder while evaluating; "off" (fp32) by default: LVIS AP
    # depends on the fine order of the scores (heads and post-processing are fp32 whatever this says).
    amp: Literal["off", "auto", "bf16", "fp16"] = "off"


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    model_preset: str = "dino-r50-4scale"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides on the model preset
    data_preset: str = "default"
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides on the data preset
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    store_check: StoreCheckConfig = dataclasses.field(default_factory=StoreCheckConfig)  # cached mode
    # Online mode (data.soft_labels = "online") only; teacher.device "auto" = the training device.
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    hard_labels: HardLabelConfig = dataclasses.field(default_factory=HardLabelConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    max_iters: int = 90000  # optimizer steps (each on one batch: detection and classification alternate)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2  # newest iteration checkpoints kept on disk (0 keeps all)
    log_every: int = 20
    seed: int = 42
    device: str = "auto"  # "auto" = cuda:LOCAL_RANK when available, else cpu
    # Autocast of backbone / encoder / decoder in training (heads, losses and post-processing are
    # always fp32). "off" = fp32 like DINO and RichSem; "auto": bf16 (or fp16) on GPU, off on CPU.
    amp: Literal["auto", "off", "bf16", "fp16"] = "off"
    ddp_backend: Literal["auto", "nccl", "gloo"] = "auto"
    find_unused_parameters: bool = False
    progress: bool = True  # rich progress bar (rank 0)
    tensorboard: bool = True
    finetune_from: str = ""  # checkpoint to initialise from; mismatched tensors are skipped by name
    method: str = DEFAULT_METHOD  # pipeline.methods.METHODS
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's Options

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("max_iters, checkpoint_every and log_every must be >= 1")
        if self.keep_checkpoints < 0 or self.eval.every < 0:
            raise ValueError("keep_checkpoints and eval.every must be >= 0")
        if self.eval.every and not (self.eval.annotations and self.eval.images):
            raise ValueError("eval.every > 0 needs eval.annotations and eval.images")
        # Resolve the method and both presets now: a typo in a nested key fails here, naming the section and key.
        for section, resolve in (("method_options", self.build_method), ("model", self.model_config),
                                 ("data", self.data_config)):
            try:
                resolve()
            except ConfigError as exc:
                raise ConfigError(f"[{section}] section: {exc}") from exc

    def build_method(self) -> Method:
        return build_method(self.method, self.method_options)

    def model_config(self) -> ModelConfig:
        return model_config(self.model_preset, deep_merge(self.model, self.build_method().model_overrides()))

    def data_config(self) -> DataConfig:
        return data_config(self.data_preset, deep_merge(self.data, self.build_method().data_overrides()))

    def resolved(self) -> dict[str, Any]:
        """Plain data with the model and data sections fully resolved (what checkpoints record). Used
        as a config again it gives the same run, whatever the presets' defaults become."""
        out = to_dict(self)
        out["model"] = to_dict(self.model_config())
        out["data"] = to_dict(self.data_config())
        out["method_options"] = method_options_dict(self.build_method())
        return out


def train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> TrainConfig:
    """Config file (TOML/JSON; optional) on top of ``base`` (a dict), then ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_config_file(path))
    return from_dict(TrainConfig, apply_overrides(data, overrides or []))



# What --resume compares between the checkpoint's config and the new one: every section and top-level key
# that changes what the run trains (the resolved model and data sections include data.batch_size). Output,
# logging, evaluation, device placement and max_iters (how far to train: the schedule's steps are absolute
# iterations, so a longer run is the same run continued) may change freely.
RESUME_KEYS = ("method", "method_options", "model", "data", "optim", "seed", "amp")
ONLINE_RESUME_KEYS = ("teacher", "hard_labels")  # online soft labels: the teacher makes the labels


def resume_differences(saved: dict[str, Any], current: dict[str, Any], online: bool) -> list[str]:
    """Every run-changing value that differs, as ``"optim.lr: checkpoint 0.0001, config 0.0002"`` (dotted
    paths, nested sections flattened)."""
    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                out.update(flat(item, f"{prefix}.{key}"))
            return out
        return {prefix: value}

    diffs = []
    for key in RESUME_KEYS + (ONLINE_RESUME_KEYS if online else ()):
        a, b = flat(saved.get(key), key), flat(current.get(key), key)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                diffs.append(f"{name}: checkpoint {a.get(name)!r}, config {b.get(name)!r}")
    return diffs
