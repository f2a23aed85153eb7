"""Teachers: CLIP (open_clip model + local weights, class text embeddings) and image classifiers (fixed
label space), with crops / pooled scoring and engines; ``TeacherConfig.family`` picks one (:mod:`.registry`).

    from lt_distill.pipeline.teacher import TeacherConfig, build_teacher, crop_and_resize
    teacher = build_teacher(TeacherConfig(model="RN50", weights="RN50.openai.bin"))
    probs = teacher.score_crops(image_hwc_uint8, boxes_xyxy_normalised)      # (K, C)
    probs = teacher.score_pooled(image_hwc_uint8, boxes_xyxy_normalised)     # (K, C), RoIAlign + attnpool
"""

from .classifier import CLASSIFIER_MODELS, ClassifierTeacher, build_classifier_teacher
from .config import ENGINES, FAMILIES, MODES, PRECISIONS, SHIPPED_MODEL_CONFIGS, TeacherConfig, register_model_configs
from .engines import (
    PARITY_TOLERANCE,
    Engine,
    ParityCheck,
    build_engine,
    default_engine_cache,
    resolve_engine,
    tensorrt_unavailable_reason,
)
from .model import (
    CropEncoder,
    ResNetTrunk,
    Teacher,
    TeacherError,
    encode_class_texts,
    file_sha256,
    load_open_clip,
    resolve_device,
    resolve_precision,
)
from .preprocess import (
    GridCrops,
    ImageDecodeError,
    Normalize,
    Preprocess,
    PreprocessError,
    WholeImage,
    crop_and_resize,
    cut_and_resize,
    decode_image,
    pixel_boxes,
    resize_image,
)
from .registry import TEACHER_FAMILIES, TeacherFamily, build_teacher

__all__ = [
    "CLASSIFIER_MODELS", "ClassifierTeacher", "FAMILIES", "TEACHER_FAMILIES", "TeacherFamily",
    "build_classifier_teacher",
    "ENGINES", "MODES", "PARITY_TOLERANCE", "PRECISIONS", "SHIPPED_MODEL_CONFIGS", "CropEncoder", "Engine", "GridCrops",
    "ImageDecodeError", "Normalize", "ParityCheck", "Preprocess", "PreprocessError", "cut_and_resize", "ResNetTrunk", "Teacher", "TeacherConfig", "TeacherError",
    "build_engine", "build_teacher", "crop_and_resize", "decode_image", "default_engine_cache",
    "encode_class_texts", "file_sha256", "load_open_clip", "pixel_boxes", "register_model_configs",
    "resize_image", "resolve_device", "resolve_engine", "resolve_precision", "tensorrt_unavailable_reason", "WholeImage",
]
