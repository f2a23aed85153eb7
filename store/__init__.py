"""The Zarr label store: the contract between precompute (stage 1) and training (stage 2)."""

from .checks import check_compatible, damaged_shards, get_attr, store_bytes, store_info, store_stats, verify_store
from .embedding import (
    CLASSIFIER_SPACE,
    CLIP_SPACE,
    EMBED_DTYPES,
    ENCODINGS,
    bytes_per_image,
    decode_classifier,
    decode_embeddings,
    dequantise,
    int8_error_bound,
    quantise,
)
from .labelstore import LabelStore, ObjectBlock, ShardResult, is_label_store, vocabulary_sha256
from .lock import ShardLock
from .reader import LabelReader
from .schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REASON_CODES,
    REASONS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    ShardLockedError,
    StoreError,
    StoreExistsError,
    StoreLayout,
    StoreMismatchError,
    crop_rows,
    flip_labels,
)
from .topk import decode_topk, encode_topk, kl_divergence, residual_mass

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "REASONS", "REASON_CODES", "STATUS_DONE", "STATUS_FAILED", "STATUS_MISSING",
    "LabelReader", "LabelStore", "ObjectBlock", "ShardLock", "ShardLockedError", "ShardResult", "StoreError", "StoreExistsError",
    "StoreLayout", "StoreMismatchError", "check_compatible", "damaged_shards", "decode_topk", "encode_topk", "get_attr",
    "crop_rows", "flip_labels",
    "is_label_store", "kl_divergence", "residual_mass", "store_bytes", "store_info", "store_stats",
    "verify_store", "vocabulary_sha256",
    "CLASSIFIER_SPACE", "CLIP_SPACE", "EMBED_DTYPES", "ENCODINGS", "bytes_per_image", "decode_classifier",
    "decode_embeddings", "dequantise", "int8_error_bound", "quantise",
]
