"""The registry of teacher families: ``TeacherConfig.family`` -> builder.

Every family's teacher has the same interface (``score_crop_batch``, ``score_crops``, ``score_pooled_batch``,
``score_pooled``, ``engine(mode)``, ``provenance(mode)``, ``fingerprint``, ``vocabulary``, ``input_size``,
``pooled_size``, ``device``), so precompute, the fidelity bench and online labels take either; tests loop
over :data:`TEACHER_FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..vocab import Vocabulary
from .classifier import CLASSIFIER_MODELS, build_classifier_teacher
from .config import TeacherConfig
from .model import build_teacher as build_clip_teacher


@dataclasses.dataclass(frozen=True)
class TeacherFamily:
    """One family: its builder, the model a command line uses when none is named, and its default
    vocabulary (a classifier's is its own label space)."""

    build: Callable[[TeacherConfig, Vocabulary | None], object]
    default_model: str
    default_vocab: str
    description: str


TEACHER_FAMILIES: dict[str, TeacherFamily] = {
    "clip": TeacherFamily(build_clip_teacher, "RN50", "lvis-v1",
                          "open_clip image-text model, zero-shot over the vocabulary's prompts"),
    "classifier": TeacherFamily(build_classifier_teacher, next(iter(CLASSIFIER_MODELS)), "imagenet-1k",
                                "image classifier with a fixed label space (FKD / ReLabel)"),
}


def build_teacher(cfg: TeacherConfig, vocabulary: Vocabulary | None = None):
    """The teacher of ``cfg.family`` (a :class:`~.model.Teacher` or :class:`~.classifier.ClassifierTeacher`)."""
    return TEACHER_FAMILIES[cfg.family].build(cfg, vocabulary)
