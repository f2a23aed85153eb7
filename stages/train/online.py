"""Online soft labels for training (``data.soft_labels = "online"``): RichSem's original set-up, kept
for comparison with the cached label store.

Each rank builds the CLIP teacher once (``TrainConfig.teacher``) on its training device; every batch
is scored as it comes (:class:`~lt_distill.pipeline.data.online.OnlineSoftLabeler`: classification
tiles by the crops path, detection boxes by the pooled path) before the batch moves to the training
device: its images are copied to the teacher's device, cut and resized there, and scored in one engine
call sized to the boxes (padded to a power-of-two bucket, not to the engine's full batch). The teacher's class text embeddings are the detector's language classifier, so the
teacher's vocabulary must be the detection categories, by name and in id order. Classification hard
labels come from the sample's own label, mapped to the vocabulary as precompute maps it
(:class:`~lt_distill.pipeline.vocab.HardLabeler`), or from the teacher (``hard_labels.source = none``).

Scoring is deterministic and draws from no RNG, so an exact resume needs nothing more: the replayed
batches are dropped unscored and the kept ones are scored as in the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ...pipeline.data.online import OnlineSoftLabeler
from ...pipeline.teacher import Teacher, TeacherConfig, build_teacher
from ...pipeline.vocab import (
    HardLabeler,
    LabelSource,
    Vocabulary,
    VocabularyError,
    WnidMapper,
    label_class_list,
    load_synset_wnids,
    load_vocabulary,
)
from .config import HardLabelConfig


def check_vocabulary(vocabulary: Vocabulary, category_names: list[str], annotations: str) -> None:
    """Refuse (``VocabularyError`` naming the first differences) a teacher vocabulary that is not the
    detection categories ``category_names`` (in id order), by name."""
    names = vocabulary.names
    if names == category_names:
        return
    diffs = [f"class {i}: teacher {a!r}, detection {b!r}"
             for i, (a, b) in enumerate(zip(names, category_names)) if a != b][:3]
    if len(names) != len(category_names):
        n = min(len(names), len(category_names))
        longer, extra = ("teacher", names) if len(names) > n else ("detection", category_names)
        diffs.append(f"{len(names)} teacher classes vs {len(category_names)} detection categories "
                     f"(first extra {longer} class {n}: {extra[n]!r})")
    raise VocabularyError(
        f"online soft labels: the teacher's vocabulary (teacher.vocab = {vocabulary.source!r}) differs from the "
        f"categories of {annotations}: {'; '.join(diffs)}. The detector classifies with the teacher's class "
        "text embeddings, so set teacher.vocab to the detection annotation JSON (or a matching category list)")


def build_hard_labeler(cfg: HardLabelConfig, vocabulary: Vocabulary) -> HardLabeler:
    """The classification images' label -> vocabulary index mapping, built as precompute builds it."""
    source = LabelSource.parse(cfg.source)
    class_list = label_class_list(source, cfg.class_list)
    mapper = WnidMapper(vocabulary, load_synset_wnids(cfg.synset_wnids or None))
    return HardLabeler(source, mapper, class_list)


@dataclasses.dataclass
class OnlineLabels:
    """The teacher of an online run and what it gives the loop."""

    teacher: Teacher
    hard_labeler: HardLabeler  # goes into the classification dataset (picklable, for DataLoader workers)
    soft_labeler: OnlineSoftLabeler
    pseudo_threshold: float | None  # hard_labels.source = none: teacher top-1 above this, else -1

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Fill a collated CPU batch's soft labels (and pseudo hard labels) in place; returns it."""
        self.soft_labeler(batch)
        if self.pseudo_threshold is not None and batch["source"] == "classification":
            for t in batch["targets"]:
                if len(t["labels"]):
                    top_p, top_i = t["soft_labels"].max(dim=-1)
                    t["labels"] = torch.where(top_p > self.pseudo_threshold, top_i, -1).to(t["labels"].dtype)
        return batch

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(C, D) float32 on the CPU: the teacher's class text embeddings."""
        return self.teacher.text_embeddings.detach().float().cpu()


def build_online_labels(teacher_cfg: TeacherConfig, hard_cfg: HardLabelConfig, category_names: list[str],
                        annotations: str, device: torch.device, pixel_mean, pixel_std) -> OnlineLabels:
    """Check the vocabulary against the detection categories (before anything is loaded), then build
    the hard labeler and the teacher on ``device`` (where ``teacher_cfg.device`` is ``auto``)."""
    vocabulary = load_vocabulary(teacher_cfg.vocab)
    check_vocabulary(vocabulary, category_names, annotations)
    hard_labeler = build_hard_labeler(hard_cfg, vocabulary)
    if teacher_cfg.device == "auto":
        teacher_cfg = dataclasses.replace(teacher_cfg, device=str(device))
    # Loading weights into an open_clip model initialises it first: keep that off the global RNG, so
    # the detector's initialisation does not depend on the soft-label mode.
    with torch.random.fork_rng(devices=[]):
        teacher = build_teacher(teacher_cfg, vocabulary)
    pseudo = hard_cfg.pseudo_threshold if hard_labeler.source.kind == "none" else None
    return OnlineLabels(teacher, hard_labeler, OnlineSoftLabeler(teacher, pixel_mean, pixel_std), pseudo)
