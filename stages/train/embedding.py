"""Training from an embedding store: the run's own vocabulary and prompts, decoded on the device.

A top-k store is checked against the run's vocabulary; an embedding store is checked against the run's
*teacher*: the ``[teacher]`` section must name the store's teacher (open_clip model and weights; the
store records them under ``encoding.embedding.text_tower``), otherwise the run is refused naming both.
The class text embeddings of the detection categories (in id order) are then computed with that
teacher's text tower and the run's prompts (``teacher.templates`` / ``teacher.synonyms``); they are both
the detector's language classifier and the matrix the stored image embeddings are decoded against, at
the store teacher's logit scale and ``data.soft_temperature`` (0: the store teacher's temperature).

The text embeddings are computed once per run by :func:`class_text_embeddings` — the one place a
text-embedding cache plugs in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import open_clip
import torch

from ...pipeline.data.config import DataConfig
from ...pipeline.data.embedding import EmbeddingDecoder
from ...pipeline.teacher import TeacherConfig, encode_class_texts, file_sha256, load_open_clip, resolve_precision
from ...pipeline.vocab import Vocabulary, resolve_templates
from ...store import LabelReader, StoreMismatchError


def uses_embeddings(reader: LabelReader, data_cfg: DataConfig) -> bool:
    """Whether a cached run reads the store's embeddings (``data.soft_encoding``; auto: when it has them)."""
    has = bool(reader.layout.embed_dim)
    if data_cfg.soft_encoding == "embedding" and not has:
        raise StoreMismatchError(f"label store {reader.path}: data.soft_encoding = embedding, but the store holds "
                                 f"{reader.layout.encoding} labels (precompute with --encoding embedding or both)")
    if data_cfg.soft_encoding == "topk" and not reader.layout.topk:
        raise StoreMismatchError(f"label store {reader.path}: data.soft_encoding = topk, but the store holds "
                                 "embeddings only")
    return has and data_cfg.soft_encoding != "topk"


def check_teacher(reader: LabelReader, teacher_cfg: TeacherConfig, weights_id: str | None = None) -> None:
    """Refuse (:class:`StoreMismatchError`, naming the fields and both values) a run whose teacher is not the
    one whose image embeddings the store holds. ``weights_id``: the run's weights id when already known
    (random-init teachers only have one once built)."""
    tower = reader.embedding_attrs()["text_tower"]
    problems = []
    if teacher_cfg.model != tower["model"]:
        problems.append(f"teacher.model: store has {tower['model']!r}, run has {teacher_cfg.model!r}")
    if weights_id is None and teacher_cfg.weights:
        weights_id = file_sha256(teacher_cfg.weights)
    if weights_id is not None and weights_id != tower["weights_sha256"]:
        problems.append(f"teacher weights: store has {tower['weights_sha256'][:40]!r} "
                        f"({tower.get('weights_file')}), run has {weights_id[:40]!r} ({teacher_cfg.weights})")
    if problems:
        raise StoreMismatchError(
            f"label store {reader.path} holds image embeddings of another teacher: {'; '.join(problems)}. "
            "Its embeddings can only be decoded with class text embeddings of the same teacher: set [teacher] "
            "model and weights to the store's")


def class_text_embeddings(teacher_cfg: TeacherConfig, vocabulary: Vocabulary,
                          device: torch.device) -> tuple[torch.Tensor, str]:
    """(C, D) float32 unit-norm class text embeddings of ``vocabulary`` with the teacher of ``teacher_cfg``
    and its prompts, on ``device``, and the teacher's weights id. The seam for a text-embedding cache: same
    inputs, same output."""
    with torch.random.fork_rng(devices=[]):  # loading must not move the run's RNG
        model, weights_id = load_open_clip(teacher_cfg.model, teacher_cfg.weights, teacher_cfg.random_init,
                                           teacher_cfg.seed)
    model = model.to(device)
    prompts = vocabulary.prompts(resolve_templates(teacher_cfg.templates), teacher_cfg.synonyms)
    precision = resolve_precision(teacher_cfg.precision, device)
    text = encode_class_texts(model, open_clip.get_tokenizer(teacher_cfg.model), prompts, device, precision,
                              teacher_cfg.text_batch)
    return text.float(), weights_id


def class_map(store_names: list[str], run_names: list[str]) -> np.ndarray:
    """(C_store,) int64: each store class's index in the run's vocabulary by name, -1 when absent (the
    store's hard labels are translated through it)."""
    where = {name: i for i, name in enumerate(run_names)}
    return np.array([where.get(name, -1) for name in store_names], dtype=np.int64)


@dataclasses.dataclass
class EmbeddingLabels:
    """What a run reading an embedding store needs: the decoder (on the training device), the run's class
    text embeddings (its language classifier) and the store -> run class map for hard labels."""

    decoder: EmbeddingDecoder
    text_embeddings: torch.Tensor  # (C, D) float32, CPU
    class_map: np.ndarray
    temperature: float

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Fill a device batch's soft labels from its targets' stored embeddings; returns the batch."""
        self.decoder.fill(batch["targets"])
        return batch


def build_embedding_labels(reader: LabelReader, data_cfg: DataConfig, teacher_cfg: TeacherConfig,
                           vocabulary: Vocabulary, device: torch.device) -> EmbeddingLabels:
    """Teacher check (before anything is loaded where possible), then the run's class text embeddings with
    the store's teacher, and the decoder at the store's logit scale and the run's temperature."""
    attrs = reader.embedding_attrs()
    check_teacher(reader, teacher_cfg)
    text_device = torch.device(teacher_cfg.device) if teacher_cfg.device != "auto" else device
    text, weights_id = class_text_embeddings(teacher_cfg, vocabulary, text_device)
    check_teacher(reader, teacher_cfg, weights_id)  # random-init teachers have an id only once built
    if text.shape[1] != reader.layout.embed_dim:
        raise StoreMismatchError(f"label store {reader.path}: embeddings have D={reader.layout.embed_dim}, the "
                                 f"teacher's text tower gives D={text.shape[1]}")
    temperature = data_cfg.soft_temperature or float(attrs["temperature"])
    decoder = EmbeddingDecoder(text, float(attrs["logit_scale"]), temperature).to(device)
    store_names = reader.attrs["vocabulary"]["names"]
    return EmbeddingLabels(decoder, text.detach().cpu(), class_map(store_names, vocabulary.names), temperature)
