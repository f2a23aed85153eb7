"""The stage-2 detector: DINO-4scale deformable DETR with RichSem's language head and semantic branch.

Entry points::

    cfg = model_config("tiny")
    model, criterion, postprocess = build_model(cfg, text_embeddings, class_image_counts)
    outputs = model(images, pixel_mask, targets)          # see dino.py for keys and shapes
    losses = criterion(outputs, targets)                  # named losses
    loss = criterion.weighted_total(losses)
    detections = postprocess(outputs, orig_sizes)         # top-300 (score, class, box) per image
"""

from .build import build_detector, build_model
from .checkpoint import export_inference_model, load_checkpoint, load_model, model_config_from_checkpoint, save_checkpoint
from .config import PRESETS, BackboneConfig, DenoisingConfig, HeadConfig, LossConfig, ModelConfig, TransformerConfig, model_config
from .criterion import SetCriterion, build_criterion
from .dino import DINO, PostProcess
from .matcher import HungarianMatcher

__all__ = [
    "PRESETS", "BackboneConfig", "DenoisingConfig", "HeadConfig", "LossConfig", "ModelConfig", "TransformerConfig",
    "DINO", "HungarianMatcher", "PostProcess", "SetCriterion",
    "build_criterion", "build_detector", "build_model", "export_inference_model", "load_checkpoint", "load_model",
    "model_config", "model_config_from_checkpoint", "save_checkpoint",
]
