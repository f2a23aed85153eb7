"""Contrastive denoising queries (DINO, Zhang et al. 2023).

During training, every ground-truth box is fed to the decoder several times as a *noised* query:
in each of G groups once as a positive (box corners moved by less than half the box size, to be
reconstructed) and once as a negative (moved by one to two half-sizes, to be rejected as "no
object"). Labels are replaced by a random class with probability ``label_noise_ratio / 2``.

Layout of the P = G * 2m denoising queries (m = most boxes in an image of the batch), placed before
the Q matching queries::

    group g: [g*2m, g*2m + m) positives for boxes 0..m-1,  [g*2m + m, (g+1)*2m) negatives

Slots of images with fewer than m boxes stay zero and are unsupervised. The attention mask keeps
matching queries from seeing any denoising query and groups from seeing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclasses.dataclass
class DenoisingQueries:
    content: torch.Tensor  # (B, P, D) label embeddings of the noised labels
    boxes_unsig: torch.Tensor  # (B, P, 4) noised boxes before sigmoid
    attn_mask: torch.Tensor  # (P + Q, P + Q) bool, True = may not attend
    num_groups: int
    group_size: int  # 2m

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def noise_boxes(boxes: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Move each corner of cxcywh ``boxes`` ``(n, 4)`` by ``u * scale * (w/2, h/2)`` with random sign,
    ``u ~ U[0, 1)`` for positives and ``U[1, 2)`` where ``negative``; clipped to the image."""
    xyxy = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:], boxes[:, 2:]], -1) / 2
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device).float() * 2 - 1
    magnitude = torch.rand_like(boxes) + negative[:, None].float()
    xyxy = (xyxy + sign * magnitude * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(xyxy)


def noise_labels(labels: torch.Tensor, ratio: float, num_classes: int) -> torch.Tensor:
    """Replace each label by a uniformly random class with probability ``ratio / 2`` (DINO)."""
    flip = torch.rand(labels.shape, device=labels.device) < ratio * 0.5
    random = torch.randint(0, num_classes, labels.shape, device=labels.device)
    return torch.where(flip, random, labels)


def attention_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device) -> torch.Tensor:
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True  # matching queries must not see the ground truth
    for g in range(num_groups):
        lo, hi = g * group_size, (g + 1) * group_size
        mask[lo:hi, :lo] = True
        mask[lo:hi, hi:pad] = True
    return mask


def make_denoising_queries(
    targets: list[dict],
    label_embedding: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    num_queries: int,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    eps: float = 1e-3,
) -> DenoisingQueries | None:
    """Denoising queries for a batch, or None when the batch has no boxes or ``dn_number`` is 0.

    ``label_embedding`` maps int64 labels ``(n,)`` (-1 = class unknown) to ``(n, D)``. G is about
    ``dn_number / m`` so that there are about ``dn_number`` positives per image. ``eps``: clamp of the
    noised boxes' inverse sigmoid.
    """
    counts = [len(t["boxes"]) for t in targets]
    m = max(counts, default=0)
    if m == 0 or dn_number <= 0:
        return None
    device = targets[0]["boxes"].device
    groups = max(1, dn_number // m)
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()
    image = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(counts)]).to(device)
    index = torch.cat([torch.arange(n) for n in counts]).to(device)

    # Copies ordered (group, positive/negative, box).
    n = len(labels)
    negative = torch.arange(2, device=device).repeat_interleave(n).repeat(groups).bool()
    group = torch.arange(groups, device=device).repeat_interleave(2 * n)
    labels_r, boxes_r = labels.repeat(2 * groups), boxes.repeat(2 * groups, 1)
    known = labels_r >= 0
    noised_labels = torch.where(known, noise_labels(labels_r.clamp(min=0), label_noise_ratio, num_classes), labels_r)
    noised_boxes = noise_boxes(boxes_r, negative, box_noise_scale) if box_noise_scale > 0 else boxes_r
    slot = group * 2 * m + negative.long() * m + index.repeat(2 * groups)
    image_r = image.repeat(2 * groups)

    embed = label_embedding(noised_labels)
    content = embed.new_zeros(len(targets), groups * 2 * m, embed.shape[-1])
    content[image_r, slot] = embed
    boxes_unsig = boxes.new_zeros(len(targets), groups * 2 * m, 4)
    boxes_unsig[image_r, slot] = inverse_sigmoid(noised_boxes, eps)
    mask = attention_mask(groups, 2 * m, num_queries, device)
    return DenoisingQueries(content, boxes_unsig, mask, groups, 2 * m)
