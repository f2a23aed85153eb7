"""Create, open and write a label store (see :mod:`.schema` for the layout)."""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from .. import __version__
from .integrity import ArrayFiles
from .lock import ShardLock, pid_alive
from .schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RESIDUAL_POLICIES,
    STATUS_DONE,
    STATUS_FAILED,
    REQUIRED_ARRAYS,
    STATUS_MISSING,
    StoreError,
    StoreExistsError,
    StoreLayout,
    crop_rows,
    row_arrays,
)

# Labels: bit-shuffling packs int16 class ids (11 of 16 bits used) and descending float16 probabilities;
# lz4hc decodes ~4x faster than zstd for ~5% more bytes (measured: 1414 vs 1335 B/image at K=30, k=16),
# and decoding dominates a random read. Few rows per inner chunk keep random reads cheap.
LABEL_COMPRESSOR = BloscCodec(cname="lz4hc", clevel=9, shuffle=BloscShuffle.bitshuffle)
ROW_COMPRESSOR = ZstdCodec(level=3)
# Last codec of every chain (inside the shard for sharded arrays): a crc32c per chunk, so a flipped byte
# anywhere is caught by zarr, by the fast reader and by `store verify` (4 bytes per chunk).
CHECKSUM = Crc32cCodec()
# Written shards keep every inner chunk on disk, even one equal to the fill value: then an absent chunk
# or shard file always means damage (a deleted file), never "all fill".
WRITE_CONFIG = {"write_empty_chunks": True}
# Embeddings: int8 codes of unit vectors are incompressible (measured 122,880 -> 122,896 B for 8 x 30 x 512
# with lz4 / zstd, shuffled or not; float16 with bitshuffle saves 6% at 5x the decode time), so blosc only
# frames them (a memcpy to decode) and keeps the codec chain the fast reader knows (blosc, then CHECKSUM).
# One row per inner chunk: a random read fetches one image's (K, D) block, not eight.
EMBED_COMPRESSOR = BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.noshuffle)
EMBED_ROWS_PER_CHUNK = 1
# Lock files live inside the per-shard bookkeeping arrays' folders: outside every listed group, so
# zarr/xarray never see them as hierarchy members.
SHARD_LOCK_DIR = "shards/num_rows/locks"
OBJECT_LOCK_DIR = "objects/block_rows/locks"


def vocabulary_sha256(names: list[str]) -> str:
    """SHA-256 of the ordered class-name list (one name per line)."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


@dataclasses.dataclass
class ShardResult:
    """Everything one source shard produced, in shard order (``n`` samples, n <= capacity).

    keys (n,) str; sizes (n, 2) int (h, w); hard_labels (n,) int, -1 = none; status (n,) uint8
    (done/failed); reasons (n,) uint8 (0 for done rows); index (n, K, k) int16 and prob (n, K, k)
    float16 (top-k encoding); embedding (n, K, D) int8 or float16 and embedding_scale (n, K) float16
    (int8 only) for the embedding encoding (see :mod:`.embedding`). Labels of failed rows are ignored."""

    keys: list[str]
    sizes: np.ndarray
    hard_labels: np.ndarray
    status: np.ndarray
    reasons: np.ndarray
    index: np.ndarray | None = None
    prob: np.ndarray | None = None
    read: dict[str, Any] | None = None  # what was read from the source shard (stored in shards/read)
    embedding: np.ndarray | None = None
    embedding_scale: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclasses.dataclass
class ObjectBlock:
    """Object-level labels for up to ``block_size`` annotations: ann_ids (n,) int64, image_ids (n,)
    int64, boxes (n, 4) float32 xywh pixels, status (n,) uint8, and per encoding index (n, k) int16 and
    prob (n, k) float16, or embedding (n, D) and embedding_scale (n,) (int8 only)."""

    ann_ids: np.ndarray
    image_ids: np.ndarray
    boxes: np.ndarray
    index: np.ndarray | None = None
    prob: np.ndarray | None = None
    status: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint8))
    embedding: np.ndarray | None = None
    embedding_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if np.shape(self.status) != np.shape(self.ann_ids):
            raise StoreError(f"object block: status has shape {np.shape(self.status)}, ann_ids {np.shape(self.ann_ids)}")

    def __len__(self) -> int:
        return len(self.ann_ids)


def _open_group(path: Path, mode: str) -> zarr.Group:
    if not path.exists():
        raise StoreError(f"no label store at {path}: the path does not exist")
    if not path.is_dir() or not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not an lt-distill label store (no zarr.json group metadata)")
    try:
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is not a readable Zarr v3 group: {exc}") from exc
    fmt = group.attrs.get("format", {})
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise StoreError(f"{path} is a Zarr group but not an lt-distill label store (format {fmt!r})")
    if fmt.get("version") == 1:
        raise StoreError(f"{path}: store format version 1 has no per-chunk checksums, so its labels cannot be "
                         "checked; recreate it (lt-distill precompute ... --overwrite)")
    if fmt.get("version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {fmt.get('version')} is not supported (need {FORMAT_VERSION})")
    lay = StoreLayout(**group.attrs["layout"]) if isinstance(group.attrs.get("layout"), dict) else None
    required = REQUIRED_ARRAYS if lay is None else \
        tuple(n for n in REQUIRED_ARRAYS if not n.startswith("labels/")) + \
        tuple(n for n in row_arrays(lay) if n.startswith("labels/"))
    missing = [name for name in required if not (path / name / "zarr.json").is_file()]
    if missing:
        raise StoreError(f"{path} is an incomplete label store (array {missing[0]} is missing"
                         f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}); it was not created "
                         "whole: recreate it with --overwrite")
    return group


def _check_object_rows(status: np.ndarray, index: np.ndarray, prob: np.ndarray, boxes: np.ndarray,
                       num_classes: int) -> None:
    """Refuse object rows a reader could not trust: a done row holds k class indices in [0, C) (a row with
    fewer valid entries is not a top-k label), finite non-negative probabilities and a finite box."""
    if not np.isin(status, (STATUS_DONE, STATUS_FAILED)).all():
        raise StoreError("object block: every status must be done (1) or failed (2)")
    done = status == STATUS_DONE
    if not done.any():
        return
    if (index[done] < 0).any() or (index[done] >= num_classes).any():
        raise StoreError(f"object block: a done row must hold k class indices in [0, {num_classes}) "
                         "(fail the row instead of writing fewer)")
    if not np.isfinite(prob[done]).all() or (prob[done] < 0).any():
        raise StoreError("object block: a done row has a negative or non-finite probability")
    if not np.isfinite(boxes[done]).all():
        raise StoreError("object block: a done row has a non-finite box")


# Hidden sibling a store is built in before it is renamed into place: ".NAME.creating-HOST-PID-TOKEN".
_BUILD_PREFIX = ".{name}.creating-"


def _looks_like_label_store(path: Path) -> bool:
    """A directory whose group metadata names our format (any version, complete or not): replaceable."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    fmt = meta.get("attributes", {}).get("format") if isinstance(meta, dict) else None
    return isinstance(fmt, dict) and fmt.get("name") == FORMAT_NAME


def _remove_stale_builds(path: Path) -> None:
    """Remove half-built siblings of ``path`` left by killed creators on this host."""
    host = socket.gethostname()
    for build in path.parent.glob(_BUILD_PREFIX.format(name=path.name) + "*"):
        owner = build.name[len(_BUILD_PREFIX.format(name=path.name)):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not pid_alive(int(owner[1])):
            shutil.rmtree(build, ignore_errors=True)


def _move_into_place(build: Path, path: Path, replace: bool) -> None:
    """Rename the finished ``build`` to ``path`` (atomic on one file system); ``replace`` an old store."""
    trash = None
    if replace:
        trash = path.parent / f".{path.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
    try:
        os.rename(build, path)  # replaces an empty directory; fails when another creator got there first
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise StoreExistsError(f"a label store was created at {path} by another process at the same time") from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def is_label_store(path: str | Path) -> bool:
    try:
        _open_group(Path(path), "r")
    except StoreError:
        return False
    return True


class LabelStore:
    """A label store on local disk. Use :meth:`create` or :meth:`open`; reading for training goes
    through :class:`lt_distill.store.LabelReader`, which is faster and fork-safe."""

    def __init__(self, path: Path, group: zarr.Group, writable: bool) -> None:
        self.path = path
        self.group = group
        self.writable = writable
        self.attrs: dict[str, Any] = dict(group.attrs)
        lay = self.attrs["layout"]
        self.layout = StoreLayout(**lay)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        path: str | Path,
        layout: StoreLayout,
        *,
        teacher: dict[str, Any],
        vocabulary: list[str],
        grid_spec: str,
        grid_boxes: list[list[float]] | np.ndarray,
        residual: str = "spread",
        source: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        text_embeddings: tuple[np.ndarray, dict[str, Any]] | None = None,
        embedding: dict[str, Any] | None = None,
        classifier_head: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        flip_labels: bool = False,
    ) -> "LabelStore":
        """Create an empty store (with the teacher's ``text_embeddings``, (C, D) and their fingerprint,
        when given). An existing store is replaced only with ``overwrite=True``; a non-empty directory that
        is not a label store is never touched.

        Creation is atomic: the store is built in a hidden sibling directory and renamed into place, so a
        kill leaves either no store or a whole one, and of two concurrent creators one wins and the other
        gets :class:`StoreExistsError` (then open the winner's store).

        ``embedding`` (required when ``layout.embed_dim`` > 0) describes how to decode the embeddings:
        ``logit_scale``, ``temperature`` (the teacher's), ``space`` and either ``text_tower`` (CLIP: the
        identity of the text encoder whose class embeddings a reader must use: model and weights) or
        ``head`` (classifier features: the identity of the classifier whose head the store keeps). A
        ``head`` store needs ``classifier_head``: weight (L, D), bias (L,) and label map (L,) (see
        :meth:`write_classifier_head`), written inside the atomic creation."""
        path = Path(path)
        if layout.embed_dim and not embedding:
            raise StoreError("an embedding layout needs the embedding description (logit_scale, temperature, "
                             "text_tower or head)")
        if layout.embed_dim and "head" in embedding and classifier_head is None:
            raise StoreError("an embedding store of classifier features needs the classifier head")
        if residual not in RESIDUAL_POLICIES:
            raise StoreError(f"residual policy must be one of {RESIDUAL_POLICIES}, got {residual!r}")
        boxes = np.asarray(grid_boxes, dtype=np.float64).reshape(-1, 4)
        if crop_rows(len(boxes), flip_labels) != layout.num_crops:
            raise StoreError(f"grid has {len(boxes)} boxes{' (+ mirror rows)' if flip_labels else ''} but "
                             f"layout.num_crops is {layout.num_crops}")
        if len(vocabulary) != layout.num_classes:
            raise StoreError(f"vocabulary has {len(vocabulary)} names but layout.num_classes is {layout.num_classes}")
        replace = False
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not _looks_like_label_store(path):
                raise StoreError(f"{path} exists and is not a label store; refusing to write there")
            if not overwrite:
                raise StoreExistsError(f"a label store already exists at {path}; pass --overwrite to replace it")
            replace = True
        _remove_stale_builds(path)
        build = path.parent / f"{_BUILD_PREFIX.format(name=path.name)}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            store = cls._build(build, layout, teacher=teacher, vocabulary=vocabulary, grid_spec=grid_spec, boxes=boxes,
                               residual=residual, source=source, extra=extra, embedding=embedding,
                               flip_labels=flip_labels)
            if text_embeddings is not None:
                store.write_text_embeddings(*text_embeddings)
            if classifier_head is not None:
                store.write_classifier_head(*classifier_head)
            _move_into_place(build, path, replace)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        return cls.open(path, "r+")

    @classmethod
    def _build(cls, path: Path, layout: StoreLayout, *, teacher: dict[str, Any], vocabulary: list[str],
               grid_spec: str, boxes: np.ndarray, residual: str, source: dict[str, Any] | None,
               extra: dict[str, Any] | None, embedding: dict[str, Any] | None = None,
               flip_labels: bool = False) -> "LabelStore":
        attrs = {
            "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
            "layout": dataclasses.asdict(layout),
            "teacher": teacher,
            "vocabulary": {"names": list(vocabulary), "sha256": vocabulary_sha256(list(vocabulary))},
            "grid": {"spec": grid_spec, "boxes": boxes.tolist(), "flip_labels": bool(flip_labels)},
            "encoding": _encoding_attrs(layout, residual, embedding),
            "source": dict(source or {}),
            "lt_distill_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if extra:
            attrs.update(extra)
        group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
        cap, n, kc, kk = layout.shard_capacity, layout.num_rows, layout.num_crops, layout.topk
        rpc = layout.rows_per_chunk
        rows = group.require_group("rows")
        rows.create_array("key", shape=(n,), dtype=str, chunks=(cap,), shards=(cap,), compressors=[ROW_COMPRESSOR, CHECKSUM])
        rows.create_array("size", shape=(n, 2), dtype="int32", chunks=(cap, 2), shards=(cap, 2),
                          compressors=[ROW_COMPRESSOR, CHECKSUM], fill_value=0)
        rows.create_array("hard_label", shape=(n,), dtype="int32", chunks=(cap,), shards=(cap,),
                          compressors=[ROW_COMPRESSOR, CHECKSUM], fill_value=-1)
        rows.create_array("reason", shape=(n,), dtype="uint8", chunks=(cap,), shards=(cap,),
                          compressors=[ROW_COMPRESSOR, CHECKSUM], fill_value=0)
        rows.create_array("status", shape=(n,), dtype="uint8", chunks=(cap,), shards=(cap,),
                          compressors=[ROW_COMPRESSOR, CHECKSUM], fill_value=STATUS_MISSING)
        labels = group.require_group("labels")
        if kk:
            labels.create_array("index", shape=(n, kc, kk), dtype="int16", chunks=(rpc, kc, kk),
                                shards=(cap, kc, kk), compressors=[LABEL_COMPRESSOR, CHECKSUM], fill_value=-1)
            labels.create_array("prob", shape=(n, kc, kk), dtype="float16", chunks=(rpc, kc, kk),
                                shards=(cap, kc, kk), compressors=[LABEL_COMPRESSOR, CHECKSUM], fill_value=0.0)
        if layout.embed_dim:
            d, erpc = layout.embed_dim, EMBED_ROWS_PER_CHUNK
            labels.create_array("embedding", shape=(n, kc, d), dtype=layout.embed_dtype, chunks=(erpc, kc, d),
                                shards=(cap, kc, d), compressors=[EMBED_COMPRESSOR, CHECKSUM], fill_value=0)
            if layout.embed_dtype == "int8":
                labels.create_array("embedding_scale", shape=(n, kc), dtype="float16", chunks=(erpc, kc),
                                    shards=(cap, kc), compressors=[EMBED_COMPRESSOR, CHECKSUM], fill_value=0.0)
        shards = group.require_group("shards")
        # One chunk per source shard: each writer touches only its own file.
        shards.create_array("num_rows", shape=(layout.num_shards,), dtype="int32", chunks=(1,), fill_value=-1,
                            compressors=[CHECKSUM])
        shards.create_array("read", shape=(layout.num_shards,), dtype=str, chunks=(1,), compressors=[CHECKSUM])
        return cls(path, group, writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "LabelStore":
        """Open an existing store, ``mode`` "r" (read-only) or "r+" (write shards, objects, text)."""
        if mode not in ("r", "r+"):
            raise StoreError(f"store mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        return cls(path, _open_group(path, mode), writable=(mode == "r+"))

    # ------------------------------------------------------------------ state
    def shard_num_rows(self) -> np.ndarray:
        """(S,) int32: rows written per source shard, -1 where never written."""
        return self.group["shards/num_rows"][:]

    def shards_done(self) -> np.ndarray:
        """(S,) bool: shards whose rows were all committed (done or failed)."""
        lay = self.layout
        try:
            num_rows = self.shard_num_rows()
            status = self.group["rows/status"][:].reshape(lay.num_shards, lay.shard_capacity)
        except ValueError:  # a damaged chunk (crc32c): decide shard by shard, unreadable = not done
            return np.array([self._shard_done(s) for s in range(lay.num_shards)], dtype=bool)
        filled = (status != STATUS_MISSING).sum(axis=1)
        return (num_rows >= 0) & (filled == np.maximum(num_rows, 0))

    def _shard_done(self, shard: int) -> bool:
        cap = self.layout.shard_capacity
        try:
            n = int(self.group["shards/num_rows"][shard])
            filled = int((self.group["rows/status"][shard * cap:(shard + 1) * cap] != STATUS_MISSING).sum())
        except ValueError:
            return False
        return n >= 0 and filled == n

    def status_counts(self) -> dict[str, int]:
        status = self.group["rows/status"][:]
        return {
            "done": int((status == STATUS_DONE).sum()),
            "failed": int((status == STATUS_FAILED).sum()),
            "missing_in_written_shards": int(
                sum(
                    (status[s * self.layout.shard_capacity: s * self.layout.shard_capacity + n] == STATUS_MISSING).sum()
                    for s, n in enumerate(self.shard_num_rows())
                    if n > 0
                )
            ),
        }

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} was opened read-only")

    def _w(self, name: str) -> zarr.Array:
        """Array ``name`` for writing (every chunk kept on disk, see :data:`WRITE_CONFIG`)."""
        return self.group[name].with_config(WRITE_CONFIG)

    def shard_lock(self, shard: int) -> ShardLock:
        return ShardLock(self.path / SHARD_LOCK_DIR / f"shard-{shard:06d}.lock", f"shard {shard} of {self.path}")

    def write_shard(self, shard: int, result: ShardResult) -> None:
        """Write one source shard's results as whole Zarr shards: labels first, status last.

        A crash at any point leaves the shard "missing" (never half-valid); rewriting it makes it "done".
        A second live writer of the same shard is refused with :class:`ShardLockedError`."""
        self._require_writable()
        lay = self.layout
        if not 0 <= shard < lay.num_shards:
            raise StoreError(f"shard {shard} out of range [0, {lay.num_shards})")
        arrays = self._validate_shard(result)
        lo, hi = shard * lay.shard_capacity, (shard + 1) * lay.shard_capacity
        w = self._w
        with self.shard_lock(shard):
            # Uncommit first, so a rewrite never leaves old "done" rows beside new labels.
            w("rows/status")[lo:hi] = np.zeros(lay.shard_capacity, np.uint8)
            w("shards/num_rows")[shard: shard + 1] = np.array([-1], np.int32)
            for name in LABEL_ARRAYS:
                if name in arrays:
                    w(f"labels/{name}")[lo:hi] = arrays[name]
            w("rows/key")[lo:hi] = arrays["key"]
            w("rows/size")[lo:hi] = arrays["size"]
            w("rows/hard_label")[lo:hi] = arrays["hard_label"]
            w("rows/reason")[lo:hi] = arrays["reason"]
            w("shards/read")[shard: shard + 1] = np.array([json.dumps(result.read or {}, sort_keys=True)])
            w("shards/num_rows")[shard: shard + 1] = np.array([len(result)], np.int32)
            self._commit_status(lo, hi, arrays["status"])

    def _commit_status(self, lo: int, hi: int, status: np.ndarray) -> None:
        self._w("rows/status")[lo:hi] = status

    def shard_read_records(self) -> list[dict[str, Any]]:
        """What was read from each source shard when it was labelled (``{}`` where never written):
        ``members``, ``bytes``, ``end`` (why reading stopped), ``size``/``mtime_ns`` of a local file."""
        return [json.loads(text) if text else {} for text in self.group["shards/read"][:]]

    def _validate_shard(self, r: ShardResult) -> dict[str, np.ndarray]:
        lay = self.layout
        n, cap = len(r), lay.shard_capacity
        if n > cap:
            raise StoreError(f"shard has {n} samples but the store's shard capacity is {cap}; "
                             "create the store with a larger --shard-capacity")
        status = np.asarray(r.status, dtype=np.uint8).reshape(-1)
        shapes = {"sizes": (n, 2), "hard_labels": (n,), "status": (n,), "reasons": (n,),
                  **_label_shapes(lay, (n, lay.num_crops))}
        for name, shape in shapes.items():
            got = np.shape(getattr(r, name)) if getattr(r, name) is not None else None
            if got != shape:
                raise StoreError(f"shard result: {name} has shape {got}, expected {shape} "
                                 f"(the store's encoding is {lay.encoding})")
        if not np.isin(status, (STATUS_DONE, STATUS_FAILED)).all():
            raise StoreError("shard result: every status must be done (1) or failed (2)")
        done = status == STATUS_DONE
        labels = _validate_labels(lay, r, done, "shard result")
        hard = np.asarray(r.hard_labels, dtype=np.int32)
        if n and (hard.min() < -1 or hard.max() >= lay.num_classes):
            raise StoreError(f"shard result: hard label out of range [-1, {lay.num_classes})")

        def pad(values: np.ndarray, fill, dtype) -> np.ndarray:
            out = np.full((cap, *np.shape(values)[1:]), fill, dtype=dtype)
            out[:n] = values
            return out

        keys = np.full(cap, "", dtype=object)
        keys[:n] = list(r.keys)
        return {
            **{name: pad(value, LABEL_FILL[name], value.dtype) for name, value in labels.items()},
            "key": keys.astype(str),
            "size": pad(np.asarray(r.sizes, np.int32).reshape(n, 2), 0, np.int32),
            "hard_label": pad(hard, -1, np.int32),
            "reason": pad(np.where(done, 0, np.asarray(r.reasons, np.uint8)), 0, np.uint8),
            "status": pad(status, STATUS_MISSING, np.uint8),
        }

    # ------------------------------------------------------------------ objects
    def create_objects(self, num_objects: int, block_size: int = 4096, *, source: str = "",
                       overwrite: bool = False) -> None:
        """Create (or, if it exists with the same size and source, keep) the objects group."""
        self._require_writable()
        if num_objects < 1 or block_size < 1:
            raise StoreError("objects: num_objects and block_size must be >= 1")
        if "objects" in self.group:
            attrs = dict(self.group["objects"].attrs)
            same = attrs.get("num_objects") == num_objects and attrs.get("source") == source \
                and attrs.get("block_size") == block_size
            if same and not overwrite:
                return
            if not overwrite:
                raise StoreError(
                    f"{self.path} already holds object labels for {attrs.get('num_objects')} annotations from "
                    f"{attrs.get('source')!r}; pass --overwrite to replace them")
            del self.group["objects"]
        lay = self.layout
        num_blocks = -(-num_objects // block_size)
        m = num_blocks * block_size
        obj = self.group.create_group("objects", attributes={
            "num_objects": num_objects, "block_size": block_size, "num_blocks": num_blocks, "source": source,
            "box_format": "xywh, pixels of the original image (LVIS/COCO)"})
        arrays = [("ann_id", (m,), "int64", -1, ROW_COMPRESSOR),
                  ("image_id", (m,), "int64", -1, ROW_COMPRESSOR),
                  ("box", (m, 4), "float32", 0.0, ROW_COMPRESSOR)]
        if lay.topk:
            arrays += [("index", (m, lay.topk), "int16", -1, LABEL_COMPRESSOR),
                       ("prob", (m, lay.topk), "float16", 0.0, LABEL_COMPRESSOR)]
        if lay.embed_dim:
            arrays.append(("embedding", (m, lay.embed_dim), lay.embed_dtype, 0, EMBED_COMPRESSOR))
            if lay.embed_dtype == "int8":
                arrays.append(("embedding_scale", (m,), "float16", 0.0, EMBED_COMPRESSOR))
        arrays.append(("status", (m,), "uint8", STATUS_MISSING, ROW_COMPRESSOR))
        for name, shape, dtype, fill, comp in arrays:
            obj.create_array(name, shape=shape, dtype=dtype, chunks=(block_size, *shape[1:]),
                             shards=(block_size, *shape[1:]), compressors=[comp, CHECKSUM], fill_value=fill)
        obj.create_array("block_rows", shape=(num_blocks,), dtype="int32", chunks=(1,), fill_value=-1,
                         compressors=[CHECKSUM])

    def objects_blocks_done(self) -> np.ndarray:
        """(B,) bool: object blocks committed."""
        obj = self.group["objects"]
        bs = obj.attrs["block_size"]
        rows = obj["block_rows"][:]
        status = obj["status"][:].reshape(-1, bs)
        done = (rows >= 0) & ((status != STATUS_MISSING).sum(1) == np.maximum(rows, 0))
        # A written block with a file missing (deleted) is not done: a rerun recomputes it.
        for name in ("ann_id", "image_id", "box", *self._object_label_arrays()):
            files = ArrayFiles(self.path / "objects" / name)
            for block in np.nonzero(done)[0]:
                done[block] = files.file(int(block)).is_file()
        return done

    def _object_label_arrays(self) -> tuple[str, ...]:
        lay = self.layout
        return (("index", "prob") if lay.topk else ()) + \
            ((("embedding", "embedding_scale") if lay.embed_dtype == "int8" else ("embedding",)) if lay.embed_dim else ())

    def write_objects_block(self, block: int, data: ObjectBlock) -> None:
        """Write one block of object labels (whole Zarr shards, labels first, status last)."""
        self._require_writable()
        if "objects" not in self.group:
            raise StoreError("objects group missing: call create_objects first")
        obj = self.group["objects"]
        bs, nb = obj.attrs["block_size"], obj.attrs["num_blocks"]
        if not 0 <= block < nb:
            raise StoreError(f"object block {block} out of range [0, {nb})")
        n = len(data)
        if n > bs:
            raise StoreError(f"object block has {n} rows, block size is {bs}")
        lay = self.layout
        status = np.asarray(data.status, np.uint8)
        if np.shape(data.boxes) != (n, 4):
            raise StoreError(f"object block: boxes must be ({n}, 4)")
        for name, shape in _label_shapes(lay, (n,)).items():
            got = np.shape(getattr(data, name)) if getattr(data, name) is not None else None
            if got != shape:
                raise StoreError(f"object block: {name} has shape {got}, expected {shape} "
                                 f"(the store's encoding is {lay.encoding})")
        if lay.topk:
            _check_object_rows(status, np.asarray(data.index), np.asarray(data.prob, np.float32),
                               np.asarray(data.boxes, np.float64), lay.num_classes)
        elif not np.isin(status, (STATUS_DONE, STATUS_FAILED)).all():
            raise StoreError("object block: every status must be done (1) or failed (2)")
        labels = _validate_labels(lay, data, status == STATUS_DONE, "object block")

        def pad(values, fill, dtype, tail=()):
            out = np.full((bs, *tail), fill, dtype=dtype)
            out[:n] = values
            return out

        lo, hi = block * bs, (block + 1) * bs
        lock = ShardLock(self.path / OBJECT_LOCK_DIR / f"block-{block:06d}.lock", f"object block {block} of {self.path}")
        with lock:
            obj = {name: self._w(f"objects/{name}") for name in
                   ("status", "block_rows", *labels, "box", "image_id", "ann_id")}
            obj["status"][lo:hi] = np.zeros(bs, np.uint8)
            obj["block_rows"][block: block + 1] = np.array([-1], np.int32)
            for name, value in labels.items():
                obj[name][lo:hi] = pad(value, LABEL_FILL[name], value.dtype, value.shape[1:])
            obj["box"][lo:hi] = pad(np.asarray(data.boxes, np.float32), 0, np.float32, (4,))
            obj["image_id"][lo:hi] = pad(np.asarray(data.image_ids, np.int64), -1, np.int64)
            obj["ann_id"][lo:hi] = pad(np.asarray(data.ann_ids, np.int64), -1, np.int64)
            obj["block_rows"][block: block + 1] = np.array([n], np.int32)
            obj["status"][lo:hi] = pad(status, STATUS_MISSING, np.uint8)

    # ------------------------------------------------------------------ text embeddings
    def write_text_embeddings(self, embeddings: np.ndarray, fingerprint: dict[str, Any],
                              overwrite: bool = False) -> None:
        """Store the teacher's (C, D) class text embeddings (float16) with their fingerprint and the
        SHA-256 of their bytes (so a lost or partial write is detected). Sound embeddings with the same
        fingerprint are kept; damaged ones are replaced."""
        self._require_writable()
        emb = np.ascontiguousarray(embeddings, dtype=np.float16)
        if emb.ndim != 2 or emb.shape[0] != self.layout.num_classes:
            raise StoreError(f"text embeddings must be ({self.layout.num_classes}, D), got {emb.shape}")
        if "text" in self.group and "embeddings" in self.group["text"]:
            problem = self.text_embeddings_problem(fingerprint.get("sha256"))
            if problem is None and not overwrite:
                return
            if not overwrite and problem is not None and "fingerprint" in problem:
                raise StoreError(f"{self.path} already holds text embeddings from another teacher "
                                 "fingerprint; pass --overwrite to replace them")
            del self.group["text/embeddings"]
        text = self.group.require_group("text")
        arr = text.create_array("embeddings", shape=emb.shape, dtype="float16", chunks=emb.shape,
                                compressors=[CHECKSUM], attributes={"fingerprint": fingerprint,
                                                                    "sha256": hashlib.sha256(emb.tobytes()).hexdigest()})
        arr[:] = emb

    def text_embeddings_problem(self, fingerprint_sha256: str | None = None) -> str | None:
        """Why the stored text embeddings cannot be used, or None when they are sound: absent, unreadable
        (checksum), bytes not matching their recorded SHA-256 (a write cut short), or (when given) a
        fingerprint other than ``fingerprint_sha256``."""
        if "text" not in self.group or "embeddings" not in self.group["text"]:
            return "text embeddings are absent"
        arr = self.group["text/embeddings"]
        attrs = dict(arr.attrs)
        try:
            data = np.ascontiguousarray(arr[:], dtype=np.float16)
        except ValueError as exc:  # zarr's crc32c mismatch
            return f"text embeddings are unreadable ({exc})"
        if hashlib.sha256(data.tobytes()).hexdigest() != attrs.get("sha256"):
            return "text embeddings do not match their recorded sha256 (lost or partial write)"
        have = (attrs.get("fingerprint") or {}).get("sha256")
        if fingerprint_sha256 is not None and have != fingerprint_sha256:
            return f"text embeddings have fingerprint {have}, expected {fingerprint_sha256}"
        return None


    # ------------------------------------------------------------------ classifier head
    def write_classifier_head(self, weight: np.ndarray, bias: np.ndarray, label_map: np.ndarray,
                              overwrite: bool = False) -> None:
        """Store a classifier teacher's head, which decodes its stored features: ``head/weight`` (L, D) and
        ``head/bias`` (L,) float32, ``head/label_map`` (L,) int32 (the vocabulary index of each label-space
        class, -1 unmapped), each with the SHA-256 of its bytes (a lost or partial write is detected). A
        sound head is kept unless ``overwrite``."""
        self._require_writable()
        arrays = {"weight": np.ascontiguousarray(weight, dtype=np.float32),
                  "bias": np.ascontiguousarray(bias, dtype=np.float32),
                  "label_map": np.ascontiguousarray(label_map, dtype=np.int32)}
        num_labels = arrays["bias"].shape[0] if arrays["bias"].ndim == 1 else -1
        if arrays["weight"].shape != (num_labels, self.layout.embed_dim) or arrays["label_map"].shape != (num_labels,):
            raise StoreError(f"classifier head must be weight (L, {self.layout.embed_dim}), bias (L,) and label map "
                             f"(L,); got {arrays['weight'].shape}, {arrays['bias'].shape}, {arrays['label_map'].shape}")
        lm = arrays["label_map"]
        if ((lm < -1) | (lm >= self.layout.num_classes)).any():
            raise StoreError(f"classifier head label map must hold -1 or a class index < {self.layout.num_classes}")
        if "head" in self.group:
            if self.classifier_head_problem() is None and not overwrite:
                return
            del self.group["head"]
        head = self.group.require_group("head")
        for name, value in arrays.items():
            arr = head.create_array(name, shape=value.shape, dtype=value.dtype, chunks=value.shape,
                                    compressors=[CHECKSUM],
                                    attributes={"sha256": hashlib.sha256(value.tobytes()).hexdigest()})
            arr[:] = value

    def classifier_head_problem(self) -> str | None:
        """Why the stored classifier head cannot be used, or None when it is sound: an array absent,
        unreadable (checksum) or not matching its recorded SHA-256 (a write cut short)."""
        for name in HEAD_ARRAYS:
            if "head" not in self.group or name not in self.group["head"]:
                return f"head/{name} is absent"
            arr = self.group[f"head/{name}"]
            try:
                data = np.ascontiguousarray(arr[:])
            except ValueError as exc:  # zarr's crc32c mismatch
                return f"head/{name} is unreadable ({str(exc).splitlines()[0]})"
            if hashlib.sha256(data.tobytes()).hexdigest() != dict(arr.attrs).get("sha256"):
                return f"head/{name} does not match its recorded sha256 (lost or partial write)"
        return None

    def classifier_head(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weight (L, D) float32, bias (L,) float32, label map (L,) int32); StoreError when damaged."""
        problem = self.classifier_head_problem()
        if problem is not None:
            raise StoreError(f"{self.path}: classifier head: {problem}; rerun precompute (it rewrites the head) "
                             "or run `lt-distill store verify`")
        return tuple(self.group[f"head/{name}"][:] for name in HEAD_ARRAYS)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- encodings
HEAD_ARRAYS = ("weight", "bias", "label_map")
LABEL_ARRAYS = ("index", "prob", "embedding", "embedding_scale")
LABEL_FILL = {"index": -1, "prob": 0, "embedding": 0, "embedding_scale": 0}


def _encoding_attrs(layout: StoreLayout, residual: str, embedding: dict[str, Any] | None) -> dict[str, Any]:
    """The ``encoding`` attribute group: kind, then each present encoding's parameters."""
    attrs: dict[str, Any] = {"kind": layout.encoding, "topk": layout.topk}
    if layout.topk:
        attrs.update({"index_dtype": "int16", "prob_dtype": "float16", "residual": residual,
                      "probabilities": "teacher probabilities of the k kept classes, descending, not renormalised"})
    if layout.embed_dim:
        emb = dict(embedding or {})
        for name in ("logit_scale", "temperature"):
            if name not in emb:
                raise StoreError(f"embedding description lacks {name!r}")
        if ("text_tower" in emb) == ("head" in emb):
            raise StoreError("embedding description needs exactly one of 'text_tower' (CLIP) or 'head' (classifier)")
        attrs["embedding"] = {
            "dim": layout.embed_dim,
            "dtype": layout.embed_dtype,
            "quantisation": "per-row symmetric: codes = round(e / scale), scale = max|e| / 127 (float16)"
            if layout.embed_dtype == "int8" else "none (float16 values)",
            "scale_dtype": "float16" if layout.embed_dtype == "int8" else None,
            "normalised": "L2, before quantisation",
            "space": emb.get("space", "joint image-text"),
            "decode": "softmax(logit_scale * e @ text.T / temperature)",
            **emb,
        }
    return attrs


def _label_shapes(lay: StoreLayout, lead: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Expected shapes of the label fields a result must carry for the store's encoding."""
    shapes: dict[str, tuple[int, ...]] = {}
    if lay.topk:
        shapes.update(index=(*lead, lay.topk), prob=(*lead, lay.topk))
    if lay.embed_dim:
        shapes["embedding"] = (*lead, lay.embed_dim)
        if lay.embed_dtype == "int8":
            shapes["embedding_scale"] = lead
    return shapes


def _validate_labels(lay: StoreLayout, r: Any, done: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Check dtypes and ranges of a result's label fields; failed rows are blanked to the fill values."""
    out: dict[str, np.ndarray] = {}
    expand = (slice(None),) + (None,) * 2

    def blank(value: np.ndarray, fill) -> np.ndarray:
        mask = done[expand[: value.ndim]] if value.ndim > 1 else done
        return np.where(mask, value, fill).astype(value.dtype)

    if lay.topk:
        index, prob = np.asarray(r.index), np.asarray(r.prob)
        if index.dtype != np.int16 or prob.dtype != np.float16:
            raise StoreError(f"{what}: index must be int16 and prob float16")
        if done.any() and (index[done].min() < 0 or index[done].max() >= lay.num_classes):
            raise StoreError(f"{what}: class index out of range [0, {lay.num_classes})")
        out["index"], out["prob"] = blank(index, -1), blank(prob, 0)
    if lay.embed_dim:
        emb = np.asarray(r.embedding)
        if emb.dtype != np.dtype(lay.embed_dtype):
            raise StoreError(f"{what}: embedding must be {lay.embed_dtype}, got {emb.dtype}")
        if done.any() and emb.dtype == np.float16 and not np.isfinite(emb[done]).all():
            raise StoreError(f"{what}: non-finite embedding in a done row")
        out["embedding"] = blank(emb, 0)
        if lay.embed_dtype == "int8":
            scale = np.asarray(r.embedding_scale)
            if scale.dtype != np.float16:
                raise StoreError(f"{what}: embedding_scale must be float16")
            if done.any() and not (np.isfinite(scale[done]).all() and (scale[done] >= 0).all()):
                raise StoreError(f"{what}: embedding scales must be finite and >= 0")
            out["embedding_scale"] = blank(scale, 0)
    return out
