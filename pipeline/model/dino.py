"""DINO-4scale deformable DETR with RichSem's language classifier and semantic branch.

Input: ``images`` float ``(B, 3, H, W)`` (normalised, zero-padded to a common size) and
``pixel_mask`` bool ``(B, H, W)``, True on padding (None = no padding).

Targets (training; list of B dicts):

* ``"boxes"`` float ``(n, 4)`` cxcywh normalised by the unpadded image size,
* ``"labels"`` int64 ``(n,)`` class indices; -1 = class unknown (box losses only),
* ``"soft_labels"`` float ``(n, C)`` probability rows and ``"soft_mask"`` bool ``(n,)`` True where the
  soft label is valid (both optional; without them there is no semantic loss),
* ``"orig_size"``, ``"size"`` int64 ``(2,)`` (h, w) and ``"image_id"`` (used by the post-processor / eval).

Outputs (dict; logits, log-probabilities and boxes are float32 even under autocast):

* ``"pred_logits"`` ``(B, Q, C)`` sigmoid logits, ``"pred_boxes"`` ``(B, Q, 4)`` cxcywh in [0, 1],
* ``"pred_semantic"`` ``(B, Q, C)`` log-probabilities of the semantic branch (absent after export),
* ``"aux_outputs"``: the same keys for decoder layers 0..L-2 (``pred_semantic`` only with
  ``semantic_aux_layers``),
* ``"enc_outputs"``: ``pred_logits``/``pred_boxes`` of the Q selected encoder proposals,
* the entries of the method's extensions (``extensions``, e.g. ``"pred_bg"``), per decoder layer;
  ``"pred_scores"`` ``(B, Q, C)`` post-processing probabilities (eval mode, with extensions only) and
  ``"decode_views"`` and ``"head_outputs"`` (training, when an extension asks for them; see
  :meth:`DINO.decode_views`, :meth:`DINO.head_outputs`),
* ``"dn_outputs"`` (training with targets only): the same keys plus ``aux_outputs`` for the P
  denoising queries, with ``num_groups`` and ``group_size`` (layout in ``denoising.py``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import MultiScaleFeatures
from .box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from .deformable_transformer import MLP, DeformableTransformer, EncoderMemory
from .denoising import make_denoising_queries


def _fp32(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.autocast]:
    """``hidden`` as float32 and a context with autocast off: the heads' cosine logits are compared
    across 1203 classes, and bf16 collapses their order (issue 10)."""
    return hidden.float(), torch.autocast(hidden.device.type, enabled=False)


class LanguageClassifier(nn.Module):
    """Classifier against unit class text embeddings: ``logit = scale * cos(W h, t_c) [+ bias]``, always
    computed in float32 (autocast is switched off inside).

    RichSem's recipe (models/richsem/richsem.py ``CLIPAlign``): frozen scale 100 (CLIP's), no bias,
    ``W`` bias-free with N(0, E^-0.5) entries: ``prior_prob=None, proj_bias=False, init_std=E**-0.5``.
    Detic's: scale 50, learned bias ``-log((1 - p) / p)``, ``W`` with bias and torch's default init.
    """

    def __init__(self, hidden_dim: int, embed_dim: int, logit_scale: float, learn_scale: bool,
                 prior_prob: float | None, proj_bias: bool = True, init_std: float | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=proj_bias)
        if init_std is not None:
            nn.init.normal_(self.proj.weight, std=init_std)
        log_scale = torch.tensor(math.log(logit_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.bias = None
        if prior_prob is not None:
            self.bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))

    def forward(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """hidden ``(..., D)``, text ``(C, E)`` unit rows -> float32 logits ``(..., C)``."""
        hidden, no_autocast = _fp32(hidden)
        with no_autocast:
            logits = self.log_scale.exp() * F.normalize(self.proj(hidden), dim=-1) @ text.float().t()
            return logits if self.bias is None else logits + self.bias


class SemanticHead(nn.Module):
    """RichSem semantic branch: ``log_softmax(scale * cos(W' h, t_c))`` over the classes, in float32.

    RichSem: ``W'`` bias-free, N(0, E^-0.5) (``clip_visual_proj``, a copy of the classifier's
    ``proj_linear``); ``bias=True, init_std=None`` is the pre-issue-10 head."""

    def __init__(self, hidden_dim: int, embed_dim: int, logit_scale: float = 100.0, bias: bool = False,
                 init_std: float | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_dim, embed_dim, bias=bias)
        if init_std is not None:
            nn.init.normal_(self.proj.weight, std=init_std)
        self.logit_scale = logit_scale

    def forward(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """hidden ``(..., D)``, text ``(C, E)`` unit rows -> float32 log-probabilities ``(..., C)``."""
        hidden, no_autocast = _fp32(hidden)
        with no_autocast:
            logits = self.logit_scale * F.normalize(self.proj(hidden), dim=-1) @ text.float().t()
            return logits.log_softmax(-1)


class DINO(nn.Module):
    """The detector: multi-scale features -> deformable encoder -> top-Q proposals -> decoder -> heads."""

    def __init__(
        self,
        features: MultiScaleFeatures,
        transformer: DeformableTransformer,
        text_embeddings: torch.Tensor,
        num_queries: int,
        class_head: LanguageClassifier,
        enc_class_head: LanguageClassifier,
        semantic_head: SemanticHead | None = None,
        dn_number: int = 100,
        dn_label_noise_ratio: float = 0.5,
        dn_box_noise_scale: float = 1.0,
        extensions: dict[str, nn.Module] | None = None,
        dn_label_init: str = "dino",
        semantic_aux_layers: bool = False,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        if text_embeddings.dim() != 2:
            raise ValueError(f"text_embeddings must be (C, D), got shape {tuple(text_embeddings.shape)}")
        self.features = features
        self.transformer = transformer
        self.num_queries = num_queries
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.float(), dim=-1))
        self.class_head = class_head  # shared by all decoder layers
        self.enc_class_head = enc_class_head
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.semantic_head = semantic_head
        # A method's extra modules (pipeline.methods.ModelExtension): extra outputs per decoder layer and
        # the post-processing score.
        self.extensions = nn.ModuleDict(extensions or {})
        self.tgt_embed = nn.Embedding(num_queries, hidden_dim)  # learnable content queries
        # Denoising label embeddings are projections of the class text embeddings.
        self.dn_label_proj = nn.Linear(text_embeddings.shape[1], hidden_dim, bias=False)
        self.dn_unknown_label = nn.Parameter(torch.zeros(hidden_dim))
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.semantic_aux_layers = semantic_aux_layers
        nn.init.normal_(self.tgt_embed.weight)
        if dn_label_init == "dino":
            # DINO's label_enc is an nn.Embedding (N(0, 1) entries, the scale of the content queries);
            # on unit text rows a N(0, 1) projection gives entries of that scale too.
            nn.init.normal_(self.dn_label_proj.weight)
            nn.init.normal_(self.dn_unknown_label)
        elif dn_label_init == "small":
            nn.init.normal_(self.dn_unknown_label, std=0.02)
        else:
            raise ValueError(f"dn_label_init must be 'dino' or 'small', got {dn_label_init!r}")
        for head in (self.transformer.decoder.bbox_head, self.enc_bbox_head):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    @property
    def num_classes(self) -> int:
        return self.text_embeddings.shape[0]

    def dn_label_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        embed = self.dn_label_proj(self.text_embeddings[labels.clamp(min=0)])
        return torch.where((labels >= 0)[:, None], embed, self.dn_unknown_label.to(embed.dtype))

    def _heads(self, hidden: torch.Tensor, boxes: torch.Tensor, semantic: bool) -> dict[str, torch.Tensor]:
        out = {"pred_logits": self.class_head(hidden, self.text_embeddings), "pred_boxes": boxes.float()}
        if semantic and self.semantic_head is not None:
            out["pred_semantic"] = self.semantic_head(hidden, self.text_embeddings)
        for ext in self.extensions.values():
            out.update(ext(hidden, out))
        return out

    def scores(self, outputs: dict) -> torch.Tensor:
        """Class probabilities ``(B, Q, C)`` of the final outputs as the method scores detections
        (sigmoid of the logits, then each extension's ``score``)."""
        prob = outputs["pred_logits"].float().sigmoid()
        for ext in self.extensions.values():
            prob = ext.score(outputs, prob)
        return prob

    def head_outputs(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class logits and extension outputs of arbitrary decoder features ``(..., D)`` (no boxes)."""
        out = {"pred_logits": self.class_head(hidden, self.text_embeddings)}
        for ext in self.extensions.values():
            out.update(ext(hidden, out))
        return out

    @torch.no_grad()
    def decode_views(self, mem: EncoderMemory, content: torch.Tensor, ref_unsig: torch.Tensor,
                     query_index: torch.Tensor, view_boxes: torch.Tensor) -> torch.Tensor:
        """Matching queries re-anchored at other boxes ("views"), through the decoder without gradient.

        content ``(B, Q, D)`` / ref_unsig ``(B, Q, 4)``: the matching queries' inputs (bound by ``forward``);
        query_index ``(B, V)`` int64: whose content each view takes; view_boxes ``(B, V, 4)`` cxcywh in
        [0, 1]: its reference box. Each view sees the matching queries and itself (not the other views) and
        no matching query sees a view, so a view reads the scene as a matching query does. Returns the
        views' last-layer hidden states ``(B, V, D)``."""
        v, q = query_index.shape[1], content.shape[1]
        mask = torch.ones(v + q, v + q, dtype=torch.bool, device=content.device)
        mask[:, v:] = False
        mask[:v, :v] = ~torch.eye(v, dtype=torch.bool, device=content.device)
        view_content = torch.gather(content, 1, query_index[..., None].expand(-1, -1, content.shape[-1]))
        boxes = inverse_sigmoid(view_boxes.clamp(1e-4, 1 - 1e-4))
        tgt = torch.cat([view_content, content], 1)
        ref = torch.cat([boxes.to(ref_unsig.dtype), ref_unsig], 1)
        # Called from the loss (autocast off) with the memory of a forward that may have run under autocast:
        # decode in the memory's precision, as the forward did.
        low = mem.memory.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(mem.memory.device.type, dtype=mem.memory.dtype if low else None, enabled=low):
            hidden, _ = self.transformer.decoder(tgt, ref, mem, mask)
        return hidden[-1][:, :v].float()

    def _select_queries(self, mem: EncoderMemory) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Two-stage "mixed" query selection: positions from the Q best encoder proposals (detached),
        learnable content. Returns content ``(B, Q, D)``, boxes before sigmoid ``(B, Q, 4)`` and the
        selected proposals' outputs for the encoder loss."""
        enc_memory, proposals_unsig, valid = self.transformer.proposals(mem)
        enc_logits = self.enc_class_head(enc_memory, self.text_embeddings)  # (B, S, C)
        scores = enc_logits.max(-1).values.masked_fill(~valid, float("-inf"))
        if scores.shape[1] < self.num_queries:
            raise ValueError(f"the images give {scores.shape[1]} feature tokens, fewer than {self.num_queries} queries")
        topk = scores.topk(self.num_queries, dim=1).indices  # (B, Q)
        enc_boxes_unsig = self.enc_bbox_head(enc_memory) + proposals_unsig
        ref_unsig = torch.gather(enc_boxes_unsig, 1, topk[..., None].expand(-1, -1, 4))
        enc_outputs = {
            "pred_logits": torch.gather(enc_logits, 1, topk[..., None].expand(-1, -1, enc_logits.shape[-1])),
            "pred_boxes": ref_unsig.float().sigmoid(),
        }
        tgt = self.tgt_embed.weight[None].expand(scores.shape[0], -1, -1)
        return tgt, ref_unsig.detach(), enc_outputs

    def forward(
        self, images: torch.Tensor, pixel_mask: torch.Tensor | None = None, targets: list[dict] | None = None
    ) -> dict:
        """images ``(B, 3, H, W)``, pixel_mask ``(B, H, W)`` True on padding, targets (training only,
        for denoising queries) -> outputs dict (see the module docstring)."""
        if pixel_mask is None:
            pixel_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        srcs, masks, pos = self.features(images, pixel_mask)
        mem = self.transformer.encode(srcs, masks, pos)

        tgt, ref_unsig, enc_outputs = self._select_queries(mem)

        dn = None
        if self.training and targets is not None:
            dn = make_denoising_queries(
                targets, self.dn_label_embedding, self.num_classes, self.num_queries,
                self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                self.transformer.inverse_sigmoid_eps,
            )
        attn_mask = None
        if dn is None and self.training:
            # A batch without boxes: keep the denoising parameters in the graph (gradient 0) so that
            # DistributedDataParallel sees every parameter used in every step.
            tgt = tgt + 0.0 * (self.dn_label_proj.weight.sum() + self.dn_unknown_label.sum())
        if dn is not None:
            tgt = torch.cat([dn.content.to(tgt.dtype), tgt], 1)
            ref_unsig = torch.cat([dn.boxes_unsig.to(ref_unsig.dtype), ref_unsig], 1)
            attn_mask = dn.attn_mask

        main_content, main_ref = tgt[:, -self.num_queries:], ref_unsig[:, -self.num_queries:]
        hidden, boxes = self.transformer.decoder(tgt, ref_unsig, mem, attn_mask)
        # The semantic branch on the last layer only unless semantic_aux_layers (RichSem
        # distill_aux_layers=False); the last layer holds both the matching and the dn queries.
        last = len(hidden) - 1
        layers = [self._heads(h, b, self.semantic_aux_layers or i == last)
                  for i, (h, b) in enumerate(zip(hidden, boxes))]
        num_dn = dn.num_queries if dn is not None else 0
        main = [{k: v[:, num_dn:] for k, v in layer.items()} for layer in layers]
        out = dict(main[-1], aux_outputs=main[:-1], enc_outputs=enc_outputs)
        if dn is not None:
            dn_layers = [{k: v[:, :num_dn] for k, v in layer.items()} for layer in layers]
            out["dn_outputs"] = dict(
                dn_layers[-1], aux_outputs=dn_layers[:-1], num_groups=dn.num_groups, group_size=dn.group_size
            )
        if self.training and any(ext.needs_views for ext in self.extensions.values()):
            out["decode_views"] = functools.partial(self.decode_views, mem, main_content.detach(), main_ref.detach())
            out["head_outputs"] = self.head_outputs
        if not self.training and len(self.extensions):
            out["pred_scores"] = self.scores(out)
        return out


class PostProcess(nn.Module):
    """LVIS-style detections: the top ``num_select`` (query, class) pairs per image over all classes."""

    def __init__(self, num_select: int = 300):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """target_sizes ``(B, 2)`` (h, w) of the original images. Returns per image ``"scores"`` ``(K,)``,
        ``"labels"`` int64 ``(K,)`` class indices and ``"boxes"`` ``(K, 4)`` xyxy pixels of the original image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, c = logits.shape
        # A method's own scoring (e.g. BACL's background channel) comes with the outputs.
        prob = outputs["pred_scores"] if "pred_scores" in outputs else logits.float().sigmoid()
        prob = prob.float().flatten(1)
        scores, index = prob.topk(min(self.num_select, q * c), dim=1)
        query, labels = index // c, index % c
        xyxy = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query[..., None].expand(-1, -1, 4))
        h, w = target_sizes.to(xyxy).unbind(-1)
        scale = torch.stack([w, h, w, h], -1)[:, None]
        xyxy = torch.minimum((xyxy * scale).clamp(min=0), scale)
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]
