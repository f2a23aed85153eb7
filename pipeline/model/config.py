"""Typed configuration of the detector and its preset registry.

A preset is a set of overrides on the defaults (which are the DINO-4scale reference values of
DESIGN §5), never a copy, so the difference between two presets is visible at a glance::

    cfg = model_config("tiny", {"transformer": {"num_queries": 50}})
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...config import deep_merge, from_preset

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclasses.dataclass
class BackboneConfig:
    name: str = "resnet50"  # a torchvision ResNet
    weights: str | None = None  # local torchvision state_dict file; None = random init
    train_backbone: bool = True  # False freezes all of it; otherwise stem + layer1 stay frozen

    def __post_init__(self) -> None:
        if self.name not in RESNETS:
            raise ValueError(f"backbone.name {self.name!r} is not one of {list(RESNETS)}")


@dataclasses.dataclass
class TransformerConfig:
    hidden_dim: int = 256
    num_feature_levels: int = 4  # strides 8/16/32 from the backbone, then extra stride-2 convs
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    pe_temperature: float = 20.0  # sine positional encoding of the feature maps (DINO: 20)
    # Pixel positions are the cumulative count 1..n (DINO's PositionEmbeddingSineHW); 0.5 gives the
    # pixel centres (our pre-issue-10 encoding).
    pe_offset: float = 0.0
    # "dino": a decoder layer moves the reference by the box head of its un-normalised output and
    # predicts from the normalised one (DINO models/dino/deformable_transformer.py + dino.py);
    # "normalised": both from the normalised output (pre-issue-10).
    box_refine: Literal["dino", "normalised"] = "dino"
    inverse_sigmoid_eps: float = 1e-3  # DINO util/misc.py; pre-issue-10: 1e-5

    def __post_init__(self) -> None:
        if self.hidden_dim % self.nheads:
            raise ValueError(f"transformer.hidden_dim {self.hidden_dim} is not divisible by nheads {self.nheads}")
        if self.hidden_dim % 32:
            raise ValueError(f"transformer.hidden_dim {self.hidden_dim} must be a multiple of 32 (GroupNorm)")
        if self.num_feature_levels < 3:
            raise ValueError("transformer.num_feature_levels must be >= 3 (strides 8/16/32)")
        for name in ("enc_layers", "dec_layers", "num_queries", "enc_n_points", "dec_n_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"transformer.{name} must be >= 1")


@dataclasses.dataclass
class DenoisingConfig:
    dn_number: int = 100  # about this many positive (and as many negative) dn queries per image
    label_noise_ratio: float = 0.5  # a label is replaced by a random class with probability ratio / 2
    box_noise_scale: float = 1.0
    # "dino": label embeddings of the scale of DINO's nn.Embedding (N(0, 1) entries, like the content
    # queries): the projection of the unit text rows is initialised N(0, 1). "small": torch's default
    # Linear init (entries ~0.02 for E = 1024, pre-issue-10).
    label_init: Literal["dino", "small"] = "dino"


@dataclasses.dataclass
class HeadConfig:
    # Language classifier, sigmoid focal loss on logit = scale * cos(proj(h), text) [+ bias]:
    # * "richsem": CLIP's frozen logit scale 100, no bias, bias-free projection initialised
    #   N(0, E^-0.5) (RichSem models/richsem/richsem.py, CLIPAlign with use_mlp_cls=False);
    #   the semantic head's projection likewise.
    # * "detic": scale ``cls_logit_scale``, learned bias -log((1 - p) / p) with p = cls_prior_prob,
    #   projection with bias, torch's default init (Detic's zero-shot classifier; pre-issue-10).
    classifier: Literal["richsem", "detic"] = "richsem"
    cls_logit_scale: float = 50.0  # "detic" only; "richsem" uses CLIP's 100
    learn_logit_scale: bool = False  # "detic" only ("richsem" keeps CLIP's scale frozen)
    cls_prior_prob: float = 0.01  # "detic" only
    # Semantic branch: log_softmax(semantic_logit_scale * cos(proj'(h), text)); dropped on export.
    semantic_branch: bool = True
    semantic_logit_scale: float = 100.0
    # CLIS task-specialised classification sub-network H_cls (Linear D->n, ReLU, Linear n->n, ReLU) between
    # the decoder and the language classifier, shared by all decoder layers; 0 = none (RichSem, BACL).
    task_head_dim: int = 0

    def __post_init__(self) -> None:
        if self.task_head_dim < 0:
            raise ValueError(f"head.task_head_dim must be >= 0 (0 = no task head), got {self.task_head_dim}")


@dataclasses.dataclass
class SemanticConfig:
    # False: the KL (semantic) loss on the last decoder layer and the last denoising layer only
    # (RichSem distill_aux_layers=False, config/RichSem/baseline_4scale.py); True: on every layer.
    aux_layers: bool = False


@dataclasses.dataclass
class LossConfig:
    # Hungarian matching costs.
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    # Loss weights (one place: SetCriterion.weight_dict).
    cls_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    semantic_weight: float = 0.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # Federated loss: focal loss only over the batch's classes + classes sampled ~ image_count ** power.
    fed_loss: bool = True
    # "per_call": a new subset for every classification loss (each decoder / denoising layer, the
    # encoder), as Detic and RichSem (models/richsem/richsem.py loss_labels); "per_step": one subset
    # shared by all of a step's losses (pre-issue-10).
    fed_sample: Literal["per_call", "per_step"] = "per_call"
    fed_num_classes: int = 50
    fed_weight_power: float = 0.5


@dataclasses.dataclass
class ModelConfig:
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    transformer: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    denoising: DenoisingConfig = dataclasses.field(default_factory=DenoisingConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    num_select: int = 300  # detections kept per image by the post-processor


# name -> overrides on ModelConfig() defaults
PRESETS: dict[str, dict[str, Any]] = {
    "dino-r50-4scale": {},
    "tiny": {
        "backbone": {"name": "resnet18"},
        "transformer": {
            "hidden_dim": 64,
            "enc_layers": 2,
            "dec_layers": 2,
            "dim_feedforward": 256,
            "num_queries": 100,
        },
        "denoising": {"dn_number": 20},
    },
}


# What a model config written before these keys existed meant (issue 10 made the RichSem/DINO values
# the defaults): a checkpoint without them is rebuilt as it was trained.
LEGACY_VALUES: dict[str, Any] = {
    "transformer": {"pe_offset": 0.5, "box_refine": "normalised", "inverse_sigmoid_eps": 1e-5},
    "denoising": {"label_init": "small"},
    "head": {"classifier": "detic"},
    "semantic": {"aux_layers": True},
    "loss": {"fed_sample": "per_step"},
}


def with_legacy_values(section: dict[str, Any]) -> dict[str, Any]:
    """A stored model config with every key it lacks among :data:`LEGACY_VALUES` set to its old value."""
    return deep_merge(LEGACY_VALUES, section)


def model_config(preset: str = "dino-r50-4scale", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The named preset with optional nested ``overrides`` applied, validated into a ModelConfig."""
    return from_preset(ModelConfig, PRESETS, preset, overrides, "model")
