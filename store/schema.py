"""The label-store contract: layout, status and reason codes, required attributes, errors.

A store is one Zarr v3 group::

    attrs                  provenance (format, teacher, vocabulary, grid, encoding, source, version)
    rows/key       (N,)        string   sample ``__key__``
    rows/size      (N, 2)      int32    original image (height, width)
    rows/hard_label(N,)        int32    mapped hard label, -1 when none
    rows/reason    (N,)        uint8    failure reason code (0 when done)
    rows/status    (N,)        uint8    0 missing, 1 done, 2 failed      <- written last
    labels/index   (N, K, k)   int16    top-k class indices per grid crop (-1 = empty); K counts crop rows:
                                        the grid boxes, then their mirror rows when grid.flip_labels
    labels/prob    (N, K, k)   float16  their probabilities, descending  <- written first
    labels/embedding       (N, K, D) int8|float16  embedding encoding: the crops' teacher image embeddings
    labels/embedding_scale (N, K)    float16       int8 only: one scale per crop
    shards/num_rows(S,)        int32    rows used by each source shard (-1 = never written)
    shards/read    (S,)        string   JSON record of what was read from each source shard
    objects/...                         object-level labels, addressed by annotation id
    text/embeddings(C, D)      float16  the teacher's class text embeddings

Row ``r`` of source shard ``s`` lives at ``s * shard_capacity + r``: each source shard owns exactly one
Zarr shard of every per-row array, so one writer per shard never shares a file with another writer.

Integrity (format version 2): every chunk of every array ends with a crc32c (zarr v3's ``crc32c`` codec,
last in the codec chain, inside the sharding codec for sharded arrays), and a written shard has every
inner chunk on disk (written even when it equals the fill value), so a deleted or damaged file is always
detectable. Version 1 stores carry no chunk checksums and are refused (see :data:`FORMAT_VERSION`).
"""

from __future__ import annotations

import dataclasses

from ..errors import LtDistillError

FORMAT_NAME = "lt-distill-labels"
# 2: crc32c per chunk, every chunk of a written shard present, shards/read records. Version 1 stores
# are refused rather than read unchecked: a label store must never return a label it cannot vouch for.
FORMAT_VERSION = 2

STATUS_MISSING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
STATUS_NAMES = {STATUS_MISSING: "missing", STATUS_DONE: "done", STATUS_FAILED: "failed"}

# Failure reasons recorded per row; stable codes (they are stored on disk).
REASONS: dict[int, str] = {
    0: "ok",
    1: "truncated",          # tar member cut short / unreadable
    2: "undecodable",        # image bytes that no decoder accepts
    3: "missing_label",      # the label field the job asked for is absent
    4: "unparsable_label",   # the label field cannot be parsed
    5: "unknown_label",      # the label names a class outside the class list
    6: "too_small",          # image too small to crop
    7: "teacher_error",      # non-finite teacher output
    8: "duplicate_key",      # the same __key__ more than once in a shard (every occurrence fails)
    9: "too_large",          # more decoded pixels than the configured cap
    10: "invalid_box",       # object box with non-finite coordinates or a non-positive size
}
REASON_CODES: dict[str, int] = {name: code for code, name in REASONS.items()}

RESIDUAL_POLICIES = ("renormalise", "spread")

# Arrays every store has (their zarr.json must exist: a store missing one was not created whole).
REQUIRED_ARRAYS = ("rows/key", "rows/size", "rows/hard_label", "rows/reason", "rows/status", "labels/index",
                   "labels/prob", "shards/num_rows", "shards/read")
# Arrays with one row per image: a written source shard has one complete Zarr shard in each.
ROW_ARRAYS = ("rows/key", "rows/size", "rows/hard_label", "rows/reason", "rows/status", "labels/index", "labels/prob")


def row_arrays(layout: "StoreLayout") -> tuple[str, ...]:
    """The per-row arrays of a store with this layout: the row metadata and each present encoding's labels."""
    names = ROW_ARRAYS if layout.topk else tuple(n for n in ROW_ARRAYS if not n.startswith("labels/"))
    if layout.embed_dim:
        names += ("labels/embedding",) + (("labels/embedding_scale",) if layout.embed_dtype == "int8" else ())
    return names

# Attributes every store must carry (dotted paths into the attribute tree).
REQUIRED_ATTRS = (
    "format.name",
    "format.version",
    "layout.num_shards",
    "layout.shard_capacity",
    "layout.num_crops",
    "layout.topk",
    "layout.num_classes",
    "teacher",
    "vocabulary.names",
    "vocabulary.sha256",
    "grid.spec",
    "grid.boxes",
    "source",
    "lt_distill_version",
)
# ... and those of each encoding (a store without ``encoding.kind`` predates the embedding encoding: top-k).
REQUIRED_TOPK_ATTRS = ("encoding.index_dtype", "encoding.prob_dtype", "encoding.residual")
# Besides these, an embedding store names whose embeddings they are: encoding.embedding.text_tower (CLIP) or
# encoding.embedding.head (classifier features).
REQUIRED_EMBEDDING_ATTRS = ("encoding.embedding.dim", "encoding.embedding.dtype", "encoding.embedding.logit_scale",
                            "encoding.embedding.temperature")


class StoreError(LtDistillError):
    """The path is not a usable label store, or an operation on it is invalid."""


class StoreExistsError(StoreError):
    """A store already exists where one was to be created (possibly made by a concurrent process)."""


class StoreMismatchError(StoreError):
    """A store does not match what a run expects; the message names every differing field."""


class ShardLockedError(StoreError):
    """Another live process is writing the same shard."""


def crop_rows(num_boxes: int, flip_labels: bool) -> int:
    """Label rows per image (``layout.num_crops``) for a grid of ``num_boxes`` boxes: rows 0..K-1 the grid
    boxes; with ``flip_labels`` also rows K..2K-1, box j cut and then mirrored (the teacher's view of a
    horizontally flipped tile of box j, which for a real teacher is not the unflipped crop's label)."""
    return num_boxes * (2 if flip_labels else 1)


def flip_labels(attrs: dict) -> bool:
    """Whether a store's attributes say it holds mirror rows (stores made before them do not)."""
    return bool(attrs.get("grid", {}).get("flip_labels", False))


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Array shapes of a store. ``rows_per_chunk`` rows share one compressed inner chunk of the top-k
    arrays. ``topk`` 0: no top-k arrays; ``embed_dim`` > 0: embedding arrays of that width (``embed_dtype``
    int8 with a float16 scale per crop, or float16). At least one of the two encodings is present."""

    num_shards: int
    shard_capacity: int
    num_crops: int
    topk: int
    num_classes: int
    rows_per_chunk: int = 0  # 0: pick the largest divisor of shard_capacity that is <= 8
    embed_dim: int = 0
    embed_dtype: str = "int8"

    def __post_init__(self) -> None:
        for name in ("num_shards", "shard_capacity", "num_crops", "num_classes"):
            if getattr(self, name) < 1:
                raise StoreError(f"store layout: {name} must be >= 1, got {getattr(self, name)}")
        if self.topk < 0 or self.embed_dim < 0 or (self.topk == 0 and self.embed_dim == 0):
            raise StoreError(f"store layout: topk ({self.topk}) or embed_dim ({self.embed_dim}) must be >= 1, "
                             "neither negative")
        if self.embed_dtype not in ("int8", "float16"):
            raise StoreError(f"store layout: embed_dtype must be int8 or float16, got {self.embed_dtype!r}")
        if self.topk > self.num_classes:
            raise StoreError(f"store layout: topk {self.topk} exceeds num_classes {self.num_classes}")
        if self.num_classes > 32767:
            raise StoreError("store layout: class indices are int16; num_classes must be <= 32767")
        if self.rows_per_chunk == 0:
            divisor = max(d for d in range(1, 9) if self.shard_capacity % d == 0)
            object.__setattr__(self, "rows_per_chunk", divisor)
        if self.shard_capacity % self.rows_per_chunk:
            raise StoreError(
                f"store layout: rows_per_chunk {self.rows_per_chunk} must divide shard_capacity {self.shard_capacity}"
            )

    @property
    def encoding(self) -> str:
        """``topk``, ``embedding`` or ``both``."""
        if self.topk and self.embed_dim:
            return "both"
        return "topk" if self.topk else "embedding"

    @property
    def num_rows(self) -> int:
        return self.num_shards * self.shard_capacity

    def row(self, shard: int, position: int) -> int:
        return shard * self.shard_capacity + position
