"""Training from an embedding store: the run's own vocabulary and prompts, decoded on the device.

A top-k store is checked against the run's vocabulary; an embedding store is checked against the run's
*teacher*: the ``[teacher]`` section must name the store's teacher (open_clip model and weights; the
store records them under ``encoding.embedding.text_tower``), otherwise the run is refused naming both.
The class text embeddings of the detection categories (in id order) are then computed with that
teacher's text tower and the run's prompts (``teacher.templates`` / ``teacher.synonyms``); they are both
the detector's language classifier and the matrix the stored image embeddings are decoded against, at
the store teacher's logit scale and ``data.soft_temperature`` (0: the store teacher's temperature).

The text embeddings come from :func:`class_text_embeddings` through the text-embedding cache
(:mod:`~lt_distill.pipeline.teacher.textcache`, ``teacher.text_cache``): computed once, by rank 0 under
torch.distributed while the others wait, and reused by every later run (and precompute) with the same
teacher, prompts, precision and device type.

A store of *classifier features* (``encoding.embedding.head``) needs no teacher at all: it keeps the
classifier head, and the decoder is ``softmax((e @ W.T + b) / temperature)`` over the label space, mapped
onto the run's classes through WordNet ids exactly as precompute maps it
(:func:`~lt_distill.pipeline.teacher.classifier.label_space_mapping`; the unmapped mass is the residual,
spread or renormalised as the store's ``encoding.embedding.residual`` says, so every row sums to one).
The run's vocabulary must be the label space itself or share WordNet ids with it; otherwise the run is
refused, naming both. The detector's language classifier is then the head's class rows (each run class:
the L2-normalised sum of the rows of the label-space classes mapped onto it; a class no label-space class
maps onto gets a zero row, so the detector cannot learn it from this store).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import open_clip
import torch

from ...pipeline.data.config import DataConfig
from ...pipeline.data.embedding import EmbeddingDecoder
from ...pipeline.teacher import (
    TeacherConfig,
    TeacherError,
    encode_class_texts,
    file_sha256,
    load_open_clip,
    resolve_precision,
)
from ...pipeline.teacher.classifier import label_space_mapping, label_space_vocabulary
from ...pipeline.teacher.textcache import cached_text_embeddings, resolve_text_cache, text_cache_key
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
    and its prompts, on ``device``, and the teacher's weights id. Read from the text-embedding cache when it
    holds them (the model is then loaded only when its weights id needs it: random-init teachers)."""
    model = None
    if teacher_cfg.weights and not teacher_cfg.random_init:
        weights_id = file_sha256(teacher_cfg.weights)
    else:
        with torch.random.fork_rng(devices=[]):  # loading must not move the run's RNG
            model, weights_id = load_open_clip(teacher_cfg.model, teacher_cfg.weights, teacher_cfg.random_init,
                                               teacher_cfg.seed)
    prompts = vocabulary.prompts(resolve_templates(teacher_cfg.templates), teacher_cfg.synonyms)
    precision = resolve_precision(teacher_cfg.precision, device)

    def compute() -> torch.Tensor:
        nonlocal model
        if model is None:
            with torch.random.fork_rng(devices=[]):
                model, _ = load_open_clip(teacher_cfg.model, teacher_cfg.weights, False, teacher_cfg.seed)
        return encode_class_texts(model.to(device), open_clip.get_tokenizer(teacher_cfg.model), prompts, device,
                                  precision, teacher_cfg.text_batch)

    key = text_cache_key(model=teacher_cfg.model, weights_id=weights_id, prompts=prompts, precision=precision,
                         device=device)
    folder = resolve_text_cache(teacher_cfg.text_cache, teacher_cfg.engine_cache or None)
    text, _ = cached_text_embeddings(key, compute, folder, device)
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
    the store's teacher, and the decoder at the store's logit scale and the run's temperature. A store of
    classifier features is decoded by its own head instead (:func:`build_classifier_labels`)."""
    attrs = reader.embedding_attrs()
    temperature = data_cfg.soft_temperature or float(attrs["temperature"])
    if "head" in attrs:
        return build_classifier_labels(reader, vocabulary, temperature, device)
    check_teacher(reader, teacher_cfg)
    text_device = torch.device(teacher_cfg.device) if teacher_cfg.device != "auto" else device
    text, weights_id = class_text_embeddings(teacher_cfg, vocabulary, text_device)
    check_teacher(reader, teacher_cfg, weights_id)  # random-init teachers have an id only once built
    if text.shape[1] != reader.layout.embed_dim:
        raise StoreMismatchError(f"label store {reader.path}: embeddings have D={reader.layout.embed_dim}, the "
                                 f"teacher's text tower gives D={text.shape[1]}")
    decoder = EmbeddingDecoder(text, float(attrs["logit_scale"]), temperature).to(device)
    store_names = reader.attrs["vocabulary"]["names"]
    return EmbeddingLabels(decoder, text.detach().cpu(), class_map(store_names, vocabulary.names), temperature)


def run_label_mapping(reader: LabelReader, vocabulary: Vocabulary) -> torch.Tensor | None:
    """(L, C) 0/1 matrix from a classifier store's label space onto the run's ``vocabulary`` (None: the run's
    vocabulary is the label space), built as precompute builds it; :class:`StoreMismatchError` naming both
    when the vocabulary is neither the label space nor mapped onto it by any WordNet id."""
    head = reader.embedding_attrs()["head"]
    try:
        label_space = label_space_vocabulary(head["label_space"])
    except TeacherError as exc:
        raise StoreMismatchError(f"label store {reader.path}: {exc}") from exc
    if label_space.sha256 != head["label_space_sha256"]:
        raise StoreMismatchError(f"label store {reader.path}: its classifier's label space {head['label_space']!r} "
                                 f"has sha256 {head['label_space_sha256'][:16]}, this installation's "
                                 f"{label_space.sha256[:16]}")
    try:
        return label_space_mapping(label_space, vocabulary)
    except TeacherError as exc:
        raise StoreMismatchError(
            f"label store {reader.path} holds features of classifier {head['model']!r} over its label space "
            f"{head['label_space']!r} ({len(label_space)} classes); the run's vocabulary {vocabulary.source!r} "
            f"({len(vocabulary)} classes) is neither that label space nor mapped onto it (no class of it has the "
            "WordNet id of a label-space class): give the detection categories WordNet ids (synset or wnid) or "
            "use the label space's classes") from exc


def build_classifier_labels(reader: LabelReader, vocabulary: Vocabulary, temperature: float,
                            device: torch.device) -> EmbeddingLabels:
    """Decoder of a classifier-feature store: its head (checked against its SHA-256) at ``temperature``,
    mapped onto ``vocabulary``; the language classifier is the head's class rows (see the module docstring)."""
    mapping = run_label_mapping(reader, vocabulary)
    weight, bias, _ = (torch.from_numpy(np.asarray(a)) for a in reader.classifier_head())
    if weight.shape[1] != reader.layout.embed_dim:
        raise StoreMismatchError(f"label store {reader.path}: features have D={reader.layout.embed_dim}, its "
                                 f"classifier head D={weight.shape[1]}")
    # The unmapped mass as precompute's residual policy says (default spread: the semantic loss needs rows
    # that sum to one).
    residual = reader.embedding_attrs().get("residual", "spread")
    decoder = EmbeddingDecoder(weight, 1.0, temperature, bias=bias, mapping=mapping, residual=residual).to(device)
    rows = weight if mapping is None else mapping.T @ weight
    class_rows = torch.nn.functional.normalize(rows.float(), dim=-1)
    store_names = reader.attrs["vocabulary"]["names"]
    return EmbeddingLabels(decoder, class_rows, class_map(store_names, vocabulary.names), temperature)
