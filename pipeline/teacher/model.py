"""The CLIP teacher: an open_clip model, its class text embeddings, and two ways to score boxes.

* crops: each box is cut from the image and resized to the model's input size (:func:`crop_and_resize`),
  one forward per box.
* pooled (ModifiedResNet teachers): one forward of the whole image at ``pooled_size``, RoIAlign of every
  box on the last feature map to the attention pool's native grid (7 x 7 for RN50 at 224), then CLIP's
  attention pool - RichSem's object-level path.

Logits are ``logit_scale * cos(image, text)``; soft labels ``softmax(logits / temperature)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torchvision.ops import roi_align

from ...errors import LtDistillError
from ..vocab import Vocabulary, load_vocabulary, resolve_templates
from .config import MODES, TeacherConfig
from .engines import PARITY_TOLERANCE, Engine, ParityCheck, autocast, build_engine, eager_engine, resolve_engine
from .preprocess import Normalize, Preprocess, crop_and_resize, resize_image
from .textcache import cached_text_embeddings, resolve_text_cache, text_cache_key


class TeacherError(LtDistillError):
    """The teacher cannot be built or used as asked (model name, weights, mode, device)."""


class CropEncoder(torch.nn.Module):
    """Normalised (N, 3, S, S) crops -> (N, D) unit-norm image embeddings."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(x).float(), dim=-1)


class ResNetTrunk(torch.nn.Module):
    """Normalised (B, 3, P, P) images -> the last ModifiedResNet feature map (B, C, P/32, P/32)."""

    def __init__(self, visual: ModifiedResNet) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x))))).float()


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@torch.no_grad()
def calibrate_batchnorm(visual: torch.nn.Module, seed: int = 0, images: int = 8) -> None:
    """Set a random image tower's BatchNorm statistics from seeded smooth-noise images.

    open_clip's init leaves BatchNorm at identity statistics and zeroes each residual branch's last BN,
    so a random ModifiedResNet's activations shrink layer by layer and its embedding is nearly the same
    for every image (cos > 0.999 between unrelated photos). With calibrated statistics a random teacher
    gives image-dependent (if meaningless) labels, which is what tests and the demo need."""
    norms = [m for m in visual.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    size = getattr(visual, "image_size", 0)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    if not norms or not size:
        return
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(images, 3, max(size // 8, 1), max(size // 8, 1), generator=gen)
    x = (F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) - 0.45) / 0.27
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
    visual.train()
    visual(x)
    visual.eval()
    for m in norms:
        m.momentum = 0.1


# Bump when the way random teachers are made changes (e.g. the BatchNorm calibration): the parameters'
# digest below cannot see it, because calibrated BatchNorm statistics differ in their last bits with the
# number of threads and are left out of the digest.
RANDOM_INIT_VERSION = 2


def parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over a model's parameters (names, dtypes, shapes and values, in order)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_open_clip(model_name: str, weights: str | None, random_init: bool = False,
                   seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Build open_clip model ``model_name`` with local ``weights`` (``weights_only=True``) or, only when
    ``random_init``, seeded random weights. Returns (model in eval mode on the CPU, weights id): the
    weights file's SHA-256, or ``random-init:vV:seed=N:sha256=...`` (the procedure's version and a digest
    of the initialised parameters, so other random weights never pass for the same teacher)."""
    known = open_clip.list_models()
    if model_name not in known:
        near = [m for m in known if m.lower().startswith(model_name.lower()[:2])][:8]
        raise TeacherError(f"unknown open_clip model {model_name!r}"
                           + (f" (similar: {', '.join(near)})" if near else "") + "; see open_clip.list_models()")
    if weights and random_init:
        raise TeacherError("give either --weights or --random-init, not both")
    if not weights:
        if not random_init:
            raise TeacherError(f"no weights for teacher {model_name!r}: pass --pretrained TAG (open_clip's "
                               "cache), --weights FILE (a local open_clip checkpoint) or --random-init (tests and demos only: the labels mean nothing)")
        root = logging.getLogger()
        drop = _DropRandomInitWarning()
        root.addFilter(drop)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(model_name, pretrained=None, device="cpu")
                calibrate_batchnorm(model.visual, seed)
        finally:
            root.removeFilter(drop)
        weights_id = f"random-init:v{RANDOM_INIT_VERSION}:seed={seed}:sha256={parameters_sha256(model)[:16]}"
        return model.eval(), weights_id
    path = Path(weights)
    if not path.is_file():
        raise TeacherError(f"teacher weights file not found: {path}")
    try:
        model = open_clip.create_model(model_name, pretrained=str(path), device="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, KeyError, ValueError, OSError) as exc:
        raise TeacherError(f"cannot load {path} into open_clip model {model_name!r}: "
                           f"{str(exc).splitlines()[0][:300]}") from exc
    return model.eval(), file_sha256(path)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"teacher device {spec!r} asked for, but CUDA is not available")
    return device


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if spec != "fp32" and device.type != "cuda":
        raise TeacherError(f"precision {spec} needs a CUDA device (the CPU runs fp32)")
    return spec


@torch.no_grad()
def encode_class_texts(model: torch.nn.Module, tokenizer, prompts: list[list[str]], device: torch.device,
                       precision: str, batch_size: int = 1024) -> torch.Tensor:
    """Per class, the normalised mean of its normalised prompt embeddings -> (C, D) float32 on ``device``."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    owner = torch.tensor([c for c, class_prompts in enumerate(prompts) for _ in class_prompts], device=device)
    sums = None
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start:start + batch_size]).to(device)
        with autocast(device, precision):
            feats = F.normalize(model.encode_text(tokens).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(prompts), feats.shape[1], device=device)
        sums.index_add_(0, owner[start:start + batch_size], feats)
    return F.normalize(sums, dim=-1)


class TeacherEngines:
    """What the teacher families share: engine management (``engine(mode)`` builds each mode's image function
    once: eager, or compiled / TensorRT with the parity check) and scoring (crops and pooled boxes -> features
    -> soft labels).

    The constructor keeps what every family has; a family then sets ``family``, ``supports_pooled``,
    ``input_size`` (crops), ``pooled_size`` (pooled), ``normalize`` and ``_modules`` (mode -> module), and
    gives three hooks: the parity metric of its outputs (:meth:`_parity_metric`: what a compiled engine must
    reproduce), the pooling of a RoIAligned box (:meth:`_pool_region`) and :meth:`probs_from_features`."""

    family = ""  # each family names itself
    pooled_requirement = "a teacher with a pooled path"

    def __init__(self, model: torch.nn.Module, *, model_name: str, weights_id: str, weights_file: str | None,
                 vocabulary: Vocabulary, temperature: float, device: torch.device | str, precision: str,
                 engine: str, crop_batch: int, pooled_batch: int, engine_cache: str | Path | None) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.requested_engine = engine
        self.model_name = model_name
        self.weights_id = weights_id
        self.weights_file = weights_file
        self.vocabulary = vocabulary
        self.temperature = float(temperature)
        self.crop_batch = crop_batch
        self.pooled_batch = pooled_batch
        self.engine_cache = Path(engine_cache) if engine_cache else None
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._engines: dict[str, Engine] = {}

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise TeacherError(f"teacher mode must be one of {MODES}, got {mode!r}")
        if mode == "pooled" and not self.supports_pooled:
            raise TeacherError(f"pooled scoring needs {self.pooled_requirement}; {self.model_name} is not one")

    def engine(self, mode: str) -> Engine:
        """The engine running ``mode``'s image function, built (and parity-checked) on first use."""
        self._check_mode(mode)
        if mode not in self._engines:
            module = self._modules[mode]
            if resolve_engine(self.requested_engine, self.device) == "eager":
                self._engines[mode] = eager_engine(module, self.device, self.precision)
            else:
                self._engines[mode] = self._build_compiled(mode, module)
        return self._engines[mode]

    def _parity_metric(self, mode: str, rows: int, size: int):
        """A function of ``mode``'s module output (``rows`` calibration images of ``size`` px) to compare a
        compiled engine with eager on."""
        raise NotImplementedError

    def _build_compiled(self, mode: str, module: torch.nn.Module) -> Engine:
        size, rows = (self.input_size, self.crop_batch) if mode == "crops" else (self.pooled_size, self.pooled_batch)
        gen = torch.Generator().manual_seed(1234)
        calib = torch.randint(0, 256, (rows, 3, size, size), generator=gen, dtype=torch.uint8)
        example = self.normalize(calib.to(self.device))
        key = {"model": self.model_name, "weights": self.weights_id, "mode": mode}
        if self.family != "clip":  # CLIP engines keep the cache keys they had before other families existed
            key = {"family": self.family, **key}
        return build_engine(module, self.requested_engine, example, device=self.device, precision=self.precision,
                            parity=ParityCheck(self._parity_metric(mode, rows, size), PARITY_TOLERANCE[self.precision]),
                            cache_dir=self.engine_cache, cache_key=key)

    # ------------------------------------------------------------------ scoring (features: the family's own)
    def probs_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., D) features -> (..., C) float32 soft labels over the vocabulary."""
        raise NotImplementedError

    def _pool_region(self, pooled: torch.Tensor) -> torch.Tensor:
        """RoIAligned feature maps (B*K, C, r, r) -> (B*K, D) features."""
        raise NotImplementedError

    @torch.no_grad()
    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 crops (S = ``input_size``) -> (N, D) features on ``device`` (CLIP: unit-norm
        image embeddings; classifier: penultimate features)."""
        if crops.ndim != 4 or crops.shape[1:] != (3, self.input_size, self.input_size):
            raise TeacherError(f"crops must be (N, 3, {self.input_size}, {self.input_size}) uint8, "
                               f"got {tuple(crops.shape)}")
        return self.engine("crops")(self.normalize(crops.to(self.device, non_blocking=True)))

    def score_crop_batch(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 crops -> (N, C) soft labels (float32, on ``device``)."""
        return self.probs_from_features(self.crop_features(crops))

    def score_crops(self, image: np.ndarray | torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """Cut each normalised xyxy box (K, 4) from ``image``, resize, score -> (K, C) soft labels."""
        return self.score_crop_batch(crop_and_resize(image, boxes, self.preprocess))

    def _pool_rois(self, fmap: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """RoIAlign normalised boxes (B, K, 4) on ``fmap`` (of a size x size input) to ``roi_size``, then the
        family's pooling -> (B, K, D) features."""
        b, k = boxes.shape[:2]
        batch_idx = torch.arange(b, device=fmap.device, dtype=fmap.dtype).repeat_interleave(k)[:, None]
        rois = torch.cat([batch_idx, boxes.reshape(-1, 4).to(fmap) * size], dim=1)
        pooled = roi_align(fmap, rois, output_size=self.roi_size, spatial_scale=fmap.shape[-1] / size,
                           sampling_ratio=-1, aligned=True)
        return self._pool_region(pooled).view(b, k, -1)

    @torch.no_grad()
    def pooled_features(self, images: torch.Tensor, boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 3, P, P) uint8 whole images (P = ``pooled_size``) and normalised xyxy boxes (B, K, 4) or (K, 4)
        for every image -> (B, K, D) features on ``device``."""
        self._check_mode("pooled")
        p = self.pooled_size
        if images.ndim != 4 or images.shape[1:] != (3, p, p):
            raise TeacherError(f"pooled images must be (B, 3, {p}, {p}) uint8, got {tuple(images.shape)}")
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if isinstance(boxes, np.ndarray) else boxes)
        if boxes.ndim == 2:
            boxes = boxes.unsqueeze(0).expand(images.shape[0], -1, -1)
        fmap = self.engine("pooled")(self.normalize(images.to(self.device, non_blocking=True)))
        return self._pool_rois(fmap, boxes.to(self.device), p)

    def score_pooled_batch(self, images: torch.Tensor, boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 3, P, P) uint8 images, boxes (B, K, 4) or (K, 4) -> (B, K, C) soft labels."""
        return self.probs_from_features(self.pooled_features(images, boxes))

    def score_pooled(self, image: np.ndarray | torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
        """One image (any size) and normalised xyxy boxes (K, 4) -> (K, C) soft labels, pooled path."""
        return self.score_pooled_batch(resize_image(image, self.pooled_preprocess)[None], boxes)[0]


class Teacher(TeacherEngines):
    """A CLIP teacher scoring image boxes against a fixed vocabulary.

    Public attributes: ``text_embeddings`` (C, D) float32 unit-norm on ``device``; ``input_size`` (crops),
    ``pooled_size`` and ``roi_size`` (pooled); ``logit_scale``; ``temperature``; ``vocabulary``;
    ``fingerprint`` (what the text embeddings depend on). Images are uint8 throughout: (H, W, 3) arrays
    or (3, H, W) tensors for single images, (N, 3, S, S) tensors for batches."""

    family = "clip"
    pooled_requirement = "a ModifiedResNet (RN*) teacher"

    def __init__(self, model: torch.nn.Module, *, model_name: str, weights_id: str, vocabulary: Vocabulary,
                 templates: tuple[str, ...], synonyms: bool = False, temperature: float = 1.0,
                 device: torch.device | str = "cpu", precision: str = "fp32", engine: str = "eager",
                 pooled_size: int = 0, crop_batch: int = 256, pooled_batch: int = 8, text_batch: int = 1024,
                 engine_cache: str | Path | None = None, weights_file: str | None = None,
                 text_cache: str | Path | None = None, pretrained: str | None = None) -> None:
        super().__init__(model, model_name=model_name, weights_id=weights_id, weights_file=weights_file,
                         vocabulary=vocabulary, temperature=temperature, device=device, precision=precision,
                         engine=engine, crop_batch=crop_batch, pooled_batch=pooled_batch, engine_cache=engine_cache)
        self.pretrained = pretrained
        self.templates = tuple(templates)
        self.synonyms = synonyms
        visual = self.model.visual
        size = visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.normalize = Normalize(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                   cfg.get("std", open_clip.OPENAI_DATASET_STD)).to(self.device)
        self.supports_pooled = isinstance(visual, ModifiedResNet)
        self.roi_size = self.input_size // 32 if self.supports_pooled else None
        self.pooled_size = int(pooled_size) or 2 * self.input_size
        if self.supports_pooled and self.pooled_size % 32:
            raise TeacherError(f"pooled size {self.pooled_size} must be a multiple of 32 (the ResNet stride)")
        # The model's own eval transform (open_clip's preprocess_cfg: interpolation, resize mode) for crops;
        # the pooled path's whole-image resize is always a squash, so every box stays in view.
        self.preprocess = Preprocess.from_open_clip(cfg, self.input_size)
        self.pooled_preprocess = self.preprocess.with_size(self.pooled_size, "squash")
        self.logit_scale = float(self.model.logit_scale.exp())

        prompts = vocabulary.prompts(self.templates, synonyms)
        key = text_cache_key(model=model_name, weights_id=weights_id, prompts=prompts, precision=precision,
                             device=self.device)
        self.text_embeddings, self.text_from_cache = cached_text_embeddings(key, lambda: encode_class_texts(
            self.model, open_clip.get_tokenizer(model_name), prompts, self.device, precision, text_batch),
            Path(text_cache) if text_cache else None, self.device)
        self.fingerprint = self._fingerprint()
        self._modules = {"crops": CropEncoder(visual)}
        if self.supports_pooled:
            self._modules["pooled"] = ResNetTrunk(visual)

    # ------------------------------------------------------------------ provenance
    def _fingerprint(self) -> dict[str, Any]:
        fp = {
            "model": self.model_name,
            "weights_sha256": self.weights_id,
            "prompt_templates": list(self.templates),
            "synonyms": self.synonyms,
            "vocabulary_sha256": self.vocabulary.sha256,
            "embedding_dim": int(self.text_embeddings.shape[1]),
        }
        fp["sha256"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
        return fp

    def provenance(self, mode: str = "crops") -> dict[str, Any]:
        """What a label store records about the teacher that made its labels with ``mode``."""
        return {
            "family": "clip",
            "model": self.model_name,
            "weights_sha256": self.weights_id,
            "weights_file": Path(self.weights_file).name if self.weights_file else None,
            "pretrained": self.pretrained,  # open_clip tag the weights came from (--pretrained), or None
            "mode": mode,
            "engine": self.engine(mode).name,
            "precision": self.precision,
            "input_size": self.input_size,
            "preprocess": (self.pooled_preprocess if mode == "pooled" else self.preprocess).to_dict(),
            "pooled_size": self.pooled_size if mode == "pooled" else None,
            "roi_size": self.roi_size if mode == "pooled" else None,
            "logit_scale": self.logit_scale,
            "temperature": self.temperature,
            "prompt_templates": list(self.templates),
            "synonyms": self.synonyms,
            "text_fingerprint": self.fingerprint["sha256"],
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
        }

    # ------------------------------------------------------------------ engines
    def _parity_metric(self, mode: str, rows: int, size: int):
        # Compared on cosine similarities with the class text embeddings (before the logit scale).
        if mode == "crops":
            return lambda feats: feats @ self.text_embeddings.T
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.device).expand(rows, 1, 4)
        return lambda fmap: self._pool_rois(fmap, whole, size).reshape(rows, -1) @ self.text_embeddings.T

    # ------------------------------------------------------------------ scoring
    def probs_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., D) unit-norm image embeddings -> (..., C) float32 soft labels."""
        logits = self.logit_scale * (feats.float() @ self.text_embeddings.T)
        return torch.softmax(logits / self.temperature, dim=-1)

    def _pool_region(self, pooled: torch.Tensor) -> torch.Tensor:
        """RoIAligned (B*K, C, r, r) -> CLIP's attention pool -> (B*K, D) unit-norm embeddings."""
        with autocast(self.device, self.precision):
            feats = self.model.visual.attnpool(pooled)
        return F.normalize(feats.float(), dim=-1)

def build_teacher(cfg: TeacherConfig, vocabulary: Vocabulary | None = None) -> Teacher:
    """Load the open_clip model named in ``cfg`` and embed the vocabulary's class prompts."""
    vocab = vocabulary if vocabulary is not None else load_vocabulary(cfg.vocab)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    weights_file = cfg.weights
    if cfg.pretrained:  # an open_clip tag: open_clip finds (or downloads) the file
        if cfg.weights or cfg.random_init:
            raise TeacherError("give one of --pretrained TAG, --weights FILE or --random-init")
        from .pretrained import load_pretrained

        model, weights_id, path = load_pretrained(cfg.model, cfg.pretrained)
        weights_file = str(path)
    else:
        model, weights_id = load_open_clip(cfg.model, cfg.weights, cfg.random_init, cfg.seed)
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        return Teacher(model, model_name=cfg.model, weights_id=weights_id, vocabulary=vocab,
                       templates=resolve_templates(cfg.templates), synonyms=cfg.synonyms,
                       temperature=cfg.temperature, device=device, precision=precision, engine=cfg.engine,
                       pooled_size=cfg.pooled_size, crop_batch=cfg.crop_batch, pooled_batch=cfg.pooled_batch,
                       text_batch=cfg.text_batch, engine_cache=cfg.engine_cache or None, weights_file=weights_file,
                       text_cache=resolve_text_cache(cfg.text_cache, cfg.engine_cache or None),
                       pretrained=cfg.pretrained or None)
