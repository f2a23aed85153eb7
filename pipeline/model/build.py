"""DETR-style builders: config -> modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .backbone import build_backbone
from .config import ModelConfig
from .criterion import SetCriterion, build_criterion
from .deformable_transformer import DeformableTransformer
from .dino import DINO, LanguageClassifier, PostProcess, SemanticHead

if TYPE_CHECKING:
    from ..methods import Method


def build_detector(cfg: ModelConfig, text_embeddings: torch.Tensor, method: Method | None = None) -> DINO:
    """The detector alone; ``text_embeddings`` ``(C, E)`` (any float dtype) fix the class vocabulary;
    ``method`` (default RichSem) adds its extension modules."""
    text_embeddings = torch.as_tensor(text_embeddings).float()
    t = cfg.transformer
    embed_dim = text_embeddings.shape[1]
    features = build_backbone(cfg.backbone, t.hidden_dim, t.num_feature_levels, t.pe_temperature, t.pe_offset)
    transformer = DeformableTransformer(
        d_model=t.hidden_dim,
        nhead=t.nheads,
        num_encoder_layers=t.enc_layers,
        num_decoder_layers=t.dec_layers,
        dim_feedforward=t.dim_feedforward,
        dropout=t.dropout,
        num_feature_levels=t.num_feature_levels,
        enc_n_points=t.enc_n_points,
        dec_n_points=t.dec_n_points,
        box_refine=t.box_refine,
        inverse_sigmoid_eps=t.inverse_sigmoid_eps,
    )
    h = cfg.head
    richsem = h.classifier == "richsem"
    # RichSem (models/richsem/richsem.py, CLIPAlign): projections bias-free, N(0, E^-0.5).
    init_std = embed_dim**-0.5 if richsem else None

    def classifier() -> LanguageClassifier:
        if richsem:  # CLIP's logit scale, frozen (RichSem: logit_scale.requires_grad = False), no bias
            return LanguageClassifier(t.hidden_dim, embed_dim, 100.0, False, None, False, init_std)
        return LanguageClassifier(t.hidden_dim, embed_dim, h.cls_logit_scale, h.learn_logit_scale, h.cls_prior_prob)

    semantic = None
    if h.semantic_branch:
        semantic = SemanticHead(t.hidden_dim, embed_dim, h.semantic_logit_scale, bias=not richsem, init_std=init_std)
    return DINO(
        features,
        transformer,
        text_embeddings,
        num_queries=t.num_queries,
        class_head=classifier(),
        enc_class_head=classifier(),
        semantic_head=semantic,
        dn_number=cfg.denoising.dn_number,
        dn_label_noise_ratio=cfg.denoising.label_noise_ratio,
        dn_box_noise_scale=cfg.denoising.box_noise_scale,
        extensions=method.extensions(t.hidden_dim, text_embeddings.shape[0]) if method is not None else None,
        dn_label_init=cfg.denoising.label_init,
        semantic_aux_layers=cfg.semantic.aux_layers,
    )


def build_model(
    cfg: ModelConfig, text_embeddings: torch.Tensor, class_image_counts: torch.Tensor | None = None,
    method: Method | None = None,
) -> tuple[DINO, SetCriterion, PostProcess]:
    """Detector, criterion and post-processor (DETR's ``build``).

    ``class_image_counts`` ``(C,)``: training images per class, for federated class sampling
    (uniform sampling when None). ``method`` (``pipeline.methods``; default RichSem, which adds nothing)
    contributes extension modules and criterion hooks; its config overrides are already in ``cfg``.
    """
    model = build_detector(cfg, text_embeddings, method)
    if class_image_counts is not None and len(class_image_counts) != model.num_classes:
        raise ValueError(f"class_image_counts has {len(class_image_counts)} entries for {model.num_classes} classes")
    hooks = method.criterion_hooks(model.num_classes, cfg.transformer.hidden_dim, cfg.loss) if method else None
    criterion = build_criterion(cfg.loss, model.num_classes, cfg.transformer.dec_layers, class_image_counts, hooks,
                                semantic_aux_layers=cfg.semantic.aux_layers)
    return model, criterion, PostProcess(cfg.num_select)
