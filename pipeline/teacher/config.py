"""Teacher configuration and the registry of open_clip model configs shipped with lt-distill."""

from __future__ import annotations

import dataclasses

import open_clip

from ...assets import asset_path
from ...errors import ConfigError

ENGINES = ("auto", "eager", "compile", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
MODES = ("crops", "pooled")
# Teacher families (see .registry): open_clip image-text models scoring the vocabulary's prompts, and
# image classifiers with a fixed label space (FKD / ReLabel).
FAMILIES = ("clip", "classifier")

# open_clip architecture JSONs that ship with lt-distill (registered with open_clip on import).
# ``lt-tiny-rn``: a ModifiedResNet CLIP with ~3.6M parameters (64 px input, 2x2 attention-pool grid,
# 2-layer 64-wide text tower), small enough for tests and the demo on a CPU.
SHIPPED_MODEL_CONFIGS = ("lt-tiny-rn",)


def register_model_configs() -> None:
    """Add the shipped architecture JSONs to open_clip's registry (idempotent)."""
    known = set(open_clip.list_models())
    for name in SHIPPED_MODEL_CONFIGS:
        if name not in known:
            open_clip.add_model_config(asset_path(f"{name}.json"))


register_model_configs()


@dataclasses.dataclass
class TeacherConfig:
    """Everything that decides a teacher's outputs (and how fast they come).

    ``family`` is ``clip`` (``model``: an open_clip architecture name, ``open_clip.list_models()`` plus
    ``lt-tiny-rn``) or ``classifier`` (``model``: a key of ``classifier.CLASSIFIER_MODELS``, e.g.
    ``efficientnet-lite0``; its soft labels are over its label space, or mapped onto ``vocab`` by WordNet id;
    no prompts). ``weights`` a local open_clip checkpoint (state dict, ``.pt``/``.bin``/``.safetensors``), loaded with
    ``weights_only=True``. Without weights the teacher refuses to build unless ``random_init`` (tests, demo).
    ``crop_batch`` / ``pooled_batch``: rows per engine call (crops, resp. images for the pooled trunk);
    compiled engines have that fixed batch shape and the last partial batch is padded."""

    family: str = "clip"
    model: str = "RN50"
    weights: str | None = None
    pretrained: str = ""  # open_clip pretrained tag (e.g. "openai"), resolved from open_clip's cache instead of weights
    random_init: bool = False
    seed: int = 0  # random-init weights
    vocab: str = "lvis-v1"
    templates: str = "openai"
    synonyms: bool = False
    temperature: float = 1.0  # softmax(logit_scale * cos / temperature)
    pooled_size: int = 0  # pooled mode input side; 0 = twice the model's image size (crops use the model's)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 on the CPU
    engine: str = "auto"  # auto: tensorrt if usable, else compile on CUDA, else eager
    engine_cache: str = ""  # TensorRT engine cache directory; "" = ~/.cache/lt-distill/engines
    text_cache: str = ""  # class text embedding cache; "" = ENGINE_CACHE/text, "off" = always encode
    crop_batch: int = 256
    pooled_batch: int = 8
    text_batch: int = 1024

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"teacher.family {self.family!r} is not one of {list(FAMILIES)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"teacher.engine {self.engine!r} is not one of {list(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"teacher.precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if not self.temperature > 0:
            raise ConfigError(f"teacher.temperature must be > 0, got {self.temperature}")
        for name in ("crop_batch", "pooled_batch", "text_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"teacher.{name} must be >= 1, got {getattr(self, name)}")
        if self.pooled_size < 0:
            raise ConfigError(f"teacher.pooled_size must be >= 0, got {self.pooled_size}")
