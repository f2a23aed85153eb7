"""Fast, fork-safe reads of a label store for training.

A naive ``zarr`` read of one row from a sharded array costs ~0.6 ms (metadata, async pipeline, shard
index decode every call). The training loader asks for one image's (K, k) block at a time, so the
reader goes to the shard files itself: it parses each shard's index once (the Zarr v3 sharding format:
``n_chunks x (offset, nbytes)`` uint64 + crc32c at the end of the file), reads an inner chunk with one
``pread`` and decodes it with numcodecs' Blosc, and keeps recently decoded chunks in an LRU cache.
Per-shard row metadata (keys, sizes, hard labels, status) is read through zarr once per shard and cached.
Everything is opened lazily per process, so a reader can be handed to DataLoader workers.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc

from .integrity import ArrayFiles
from .labelstore import LabelStore
from .embedding import decode_classifier, decode_embeddings, dequantise
from .schema import STATUS_DONE, StoreError, row_arrays
from .topk import decode_topk, encode_topk

_EMPTY = np.iinfo(np.uint64).max


class _LRU(collections.OrderedDict):
    def __init__(self, capacity: int, on_evict=None) -> None:
        super().__init__()
        self.capacity = capacity
        self.on_evict = on_evict

    def put(self, key, value) -> None:
        if self.capacity <= 0:
            return
        self[key] = value
        if len(self) > self.capacity:
            _, old = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)


class ShardedChunkReader:
    """Reads inner chunks of one sharded Zarr v3 array (sharded along axis 0 only) from its files.

    Supports the codec chain the label store writes (bytes little-endian -> blosc -> crc32c inside the
    shard, index at the end as bytes + crc32c); anything else raises :class:`StoreError`. Every chunk's
    crc32c is checked when it is read; a mismatch raises :class:`StoreError` naming the shard and rows."""

    def __init__(self, array_dir: Path, cache_chunks: int = 4096, max_open_files: int = 64) -> None:
        meta = json.loads((array_dir / "zarr.json").read_text())
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise StoreError(f"{array_dir}: not a sharded array")
        conf = codecs[0]["configuration"]
        names = [c["name"] for c in conf["codecs"]]
        index_names = [c["name"] for c in conf["index_codecs"]]
        if names != ["bytes", "blosc", "crc32c"] or conf["codecs"][0].get("configuration", {}).get("endian", "little") != "little" \
                or index_names != ["bytes", "crc32c"] or conf.get("index_location", "end") != "end":
            raise StoreError(f"{array_dir}: unsupported codec chain {names} / index {index_names}")
        self.dir = array_dir
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shape = tuple(meta["shape"])
        self.shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk_shape = tuple(conf["chunk_shape"])
        if self.shard_shape[1:] != self.chunk_shape[1:] or self.shape[1:] != self.shard_shape[1:]:
            raise StoreError(f"{array_dir}: only sharding along the first axis is supported")
        self.fill = np.array(meta["fill_value"], dtype=self.dtype)
        self.chunks_per_shard = self.shard_shape[0] // self.chunk_shape[0]
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        self._suffix = sep.join(["0"] * (len(self.shape) - 1))
        self._sep = sep
        self._files = _LRU(max_open_files, on_evict=os.close)
        self._indexes: dict[int, np.ndarray | None] = {}
        self._verified: dict[int, np.ndarray] = {}  # per shard: chunks whose crc32c this process checked
        self._chunks = _LRU(cache_chunks)

    def _shard_file(self, shard: int) -> Path:
        name = f"{shard}{self._sep}{self._suffix}" if self._suffix else str(shard)
        return self.dir / "c" / name

    def _fd(self, shard: int) -> int | None:
        fd = self._files.get(shard)
        if fd is None:
            try:
                fd = os.open(self._shard_file(shard), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._files.put(shard, fd)
        return fd

    def shard_index(self, shard: int) -> np.ndarray | None:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) of a shard, None when the shard file is absent."""
        if shard in self._indexes:
            return self._indexes[shard]
        fd = self._fd(shard)
        if fd is None:
            index = None
        else:
            nbytes = self.chunks_per_shard * 16
            size = os.fstat(fd).st_size
            raw = os.pread(fd, nbytes + 4, max(size - nbytes - 4, 0))
            if len(raw) != nbytes + 4 or google_crc32c.value(raw[:nbytes]) != int.from_bytes(raw[nbytes:], "little"):
                raise StoreError(f"{self._shard_file(shard)}: shard index is corrupt or truncated (crc32c "
                                 f"mismatch, shard {shard}); run `lt-distill store verify`")
            index = np.frombuffer(raw[:nbytes], dtype="<u8").reshape(-1, 2)
            self._verified[shard] = np.zeros(self.chunks_per_shard, dtype=bool)
        self._indexes[shard] = index
        return index

    def _rows(self, shard: int, chunk: int) -> str:
        lo = chunk * self.chunk_shape[0]
        return f"positions {lo}-{lo + self.chunk_shape[0] - 1}"

    def read_chunk(self, shard: int, chunk: int, required: bool = False) -> np.ndarray:
        """Decoded inner chunk ``chunk`` of ``shard``: array of ``chunk_shape``. An absent chunk reads as
        the fill value, or raises :class:`StoreError` when ``required`` (its rows are marked done)."""
        key = (shard, chunk)
        out = self._chunks.get(key)
        if out is not None:
            return out
        index = self.shard_index(shard)
        if index is None or index[chunk, 0] == _EMPTY:
            if required:
                raise StoreError(f"{self.dir}: shard {shard} ({self._rows(shard, chunk)}) is marked done but its "
                                 f"data is missing ({self._shard_file(shard).name} deleted?); run `lt-distill store "
                                 "verify` and rerun precompute to recompute the shards it names")
            return np.broadcast_to(self.fill, self.chunk_shape)
        offset, nbytes = int(index[chunk, 0]), int(index[chunk, 1])
        raw = os.pread(self._fd(shard), nbytes, offset)
        if len(raw) != nbytes or nbytes < 4:
            raise StoreError(f"{self.dir}: shard {shard} ({self._rows(shard, chunk)}) is truncated; run "
                             "`lt-distill store verify` and rerun precompute to recompute it")
        # Each chunk's crc32c is checked the first time this process reads it (like the shard index, which
        # is parsed once): re-reads of a verified chunk skip the ~1 us/KB checksum.
        verified = self._verified[shard]
        if not verified[chunk]:
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{self.dir}: shard {shard} ({self._rows(shard, chunk)}) is corrupt (chunk crc32c "
                                 "mismatch); run `lt-distill store verify` and rerun precompute to recompute it")
            verified[chunk] = True
        out = np.frombuffer(blosc.decompress(memoryview(raw)[:-4]), dtype=self.dtype).reshape(self.chunk_shape)
        self._chunks.put(key, out)
        return out

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._indexes.clear()
        self._verified.clear()
        self._chunks.clear()


class ShardRows:
    """Row metadata of one source shard (capacity rows), each field read on first use:
    ``keys``, ``sizes`` (n, 2), ``hard_labels``, ``status``, ``reasons``; ``num_rows`` used rows."""

    FIELDS = {"keys": "key", "sizes": "size", "hard_labels": "hard_label", "status": "status", "reasons": "reason"}

    def __init__(self, arrays: dict, lo: int, hi: int, num_rows: int, where: str = "") -> None:
        self._arrays, self._lo, self._hi = arrays, lo, hi
        self.num_rows = num_rows
        self._where = where

    def __getattr__(self, name: str) -> np.ndarray:
        if name not in ShardRows.FIELDS:
            raise AttributeError(name)
        try:
            value = self._arrays[ShardRows.FIELDS[name]][self._lo: self._hi]
        except ValueError as exc:  # zarr's crc32c mismatch (or undecodable bytes)
            raise StoreError(f"{self._where}: rows/{ShardRows.FIELDS[name]} is corrupt ({exc}); run "
                             "`lt-distill store verify` and rerun precompute to recompute it") from exc
        setattr(self, name, value)
        return value


class LabelReader:
    """Read-only access to a label store for training and analysis.

    ``labels(shard, position)`` returns one image's (K, k) int16 indices and float16 probabilities;
    ``labels_batch`` the same for many; ``embeddings(shard, position)`` one image's (K, D) embedding codes
    and (K,) scales (embedding encoding); ``locate(key)`` maps a sample key to (shard, position);
    ``objects(ann_ids)`` / ``object_embeddings(ann_ids)`` return object-level labels. Safe to pickle
    into DataLoader workers."""

    def __init__(self, path: str | Path, cache_bytes: int = 256 << 20, cache_shards: int = 256) -> None:
        self.path = Path(path)
        self.cache_bytes = cache_bytes
        self.cache_shards = cache_shards
        store = LabelStore.open(self.path, "r")
        self.attrs: dict[str, Any] = store.attrs
        self.layout = store.layout
        self._pid = -1

    # Everything below is per process and rebuilt lazily after unpickling or fork.
    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        lay = self.layout
        self._store = LabelStore.open(self.path, "r")
        # The cache budget is split evenly between the label arrays present.
        names = (["index", "prob"] if lay.topk else []) + \
            (["embedding"] + (["embedding_scale"] if lay.embed_dtype == "int8" else []) if lay.embed_dim else [])
        budget = self.cache_bytes // len(names)
        self._arrays: dict[str, ShardedChunkReader] = {}
        for name in names:
            arr = ShardedChunkReader(self.path / "labels" / name, 0)
            chunk_bytes = int(np.prod(arr.chunk_shape)) * arr.dtype.itemsize
            arr._chunks.capacity = max(0, budget // chunk_bytes)
            self._arrays[name] = arr
        self._rows = _LRU(self.cache_shards)
        # Opening a zarr array parses its metadata: do it once, not per shard.
        self._row_arrays = {name: self._store.group[f"rows/{name}"] for name in ShardRows.FIELDS.values()}
        self._row_files = {name: ArrayFiles(self.path / name) for name in row_arrays(lay)}
        try:
            self._num_rows = self._store.shard_num_rows()
        except ValueError as exc:  # zarr's crc32c mismatch
            raise StoreError(f"{self.path}: shards/num_rows is corrupt ({exc}); run `lt-distill store verify`") from exc
        self._key_to_row: dict[str, int] | None = None
        self._objects: dict[str, np.ndarray] | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "cache_bytes": self.cache_bytes, "cache_shards": self.cache_shards,
                "attrs": self.attrs, "layout": self.layout, "_pid": -1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ rows
    def shard_rows(self, shard: int) -> ShardRows:
        self._ensure_open()
        rows = self._rows.get(shard)
        if rows is None:
            cap = self.layout.shard_capacity
            num_rows = int(self._num_rows[shard])
            if num_rows >= 0:  # a written shard has a file in every per-row array (format 2)
                absent = [name for name, files in self._row_files.items() if not files.file(shard).is_file()]
                if absent:
                    raise StoreError(f"{self.path}: shard {shard} was written but its {absent[0]} file is missing; "
                                     "run `lt-distill store verify` and rerun precompute to recompute it")
            rows = ShardRows(self._row_arrays, shard * cap, (shard + 1) * cap, num_rows,
                             f"{self.path}: shard {shard}")
            self._rows.put(shard, rows)
        return rows

    def labels(self, shard: int, position: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(index (K, k) int16, prob (K, k) float16, valid): valid is False unless the row is done."""
        self._ensure_open()
        if not (0 <= shard < self.layout.num_shards and 0 <= position < self.layout.shard_capacity):
            raise StoreError(f"row ({shard}, {position}) is outside the store")
        if not self.layout.topk:
            raise StoreError(f"{self.path} holds embeddings only (encoding {self.layout.encoding}); "
                             "read them with embeddings()")
        valid = bool(self.shard_rows(shard).status[position] == STATUS_DONE)
        chunk, r = divmod(position, self.layout.rows_per_chunk)
        return (self._arrays["index"].read_chunk(shard, chunk, required=valid)[r],
                self._arrays["prob"].read_chunk(shard, chunk, required=valid)[r], valid)

    def embeddings(self, shard: int, position: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """(codes (K, D) int8 or float16, scale (K,) float16 or None for float16 codes, valid): one image's
        crop embeddings as stored (:func:`..store.embedding.dequantise` turns them into floats)."""
        self._ensure_open()
        if not (0 <= shard < self.layout.num_shards and 0 <= position < self.layout.shard_capacity):
            raise StoreError(f"row ({shard}, {position}) is outside the store")
        if not self.layout.embed_dim:
            raise StoreError(f"{self.path} holds no embeddings (encoding {self.layout.encoding}); "
                             "precompute with --encoding embedding or both")
        valid = bool(self.shard_rows(shard).status[position] == STATUS_DONE)
        emb = self._arrays["embedding"]
        chunk, r = divmod(position, emb.chunk_shape[0])
        codes = emb.read_chunk(shard, chunk, required=valid)[r]
        scale_arr = self._arrays.get("embedding_scale")
        scale = None
        if scale_arr is not None:
            chunk, r = divmod(position, scale_arr.chunk_shape[0])
            scale = scale_arr.read_chunk(shard, chunk, required=valid)[r]
        return codes, scale, valid

    def embeddings_batch(self, shards, positions) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Batched :meth:`embeddings`: (B, K, D), (B, K) float16 or None, (B,) bool."""
        lay = self.layout
        n = len(shards)
        codes = np.empty((n, lay.num_crops, lay.embed_dim), lay.embed_dtype)
        scale = np.empty((n, lay.num_crops), np.float16) if lay.embed_dtype == "int8" else None
        valid = np.empty(n, bool)
        for i, (s, p) in enumerate(zip(shards, positions)):
            c, sc, valid[i] = self.embeddings(int(s), int(p))
            codes[i] = c
            if scale is not None:
                scale[i] = sc
        return codes, scale, valid

    def labels_batch(self, shards, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batched :meth:`labels`: (B, K, k) int16, (B, K, k) float16, (B,) bool."""
        lay = self.layout
        n = len(shards)
        index = np.empty((n, lay.num_crops, lay.topk), np.int16)
        prob = np.empty((n, lay.num_crops, lay.topk), np.float16)
        valid = np.empty(n, bool)
        for i, (s, p) in enumerate(zip(shards, positions)):
            index[i], prob[i], valid[i] = self.labels(int(s), int(p))
        return index, prob, valid

    def hard_label(self, shard: int, position: int) -> int:
        return int(self.shard_rows(shard).hard_labels[position])

    def locate(self, key: str) -> tuple[int, int]:
        """(shard, position) of the sample with ``__key__`` == key; KeyError if absent, StoreError when
        several rows hold that key (duplicate keys within or across source shards)."""
        self._ensure_open()
        if self._key_to_row is None:
            try:
                keys = self._store.group["rows/key"][:]
                status = self._store.group["rows/status"][:]
            except ValueError as exc:  # zarr's crc32c mismatch
                raise StoreError(f"{self.path}: rows/key or rows/status is corrupt ({exc}); run "
                                 "`lt-distill store verify`") from exc
            self._key_to_row = {}
            for i in np.nonzero(status != 0)[0]:
                # -1 marks a key held by several rows (ambiguous); the rows are found again on demand.
                self._key_to_row[str(keys[i])] = -1 if str(keys[i]) in self._key_to_row else int(i)
        row = self._key_to_row[key]
        if row < 0:
            keys, status = self._store.group["rows/key"][:], self._store.group["rows/status"][:]
            rows = [divmod(int(i), self.layout.shard_capacity) for i in np.nonzero((keys == key) & (status != 0))[0]]
            raise StoreError(f"{self.path}: key {key!r} is ambiguous: {len(rows)} rows hold it "
                             f"(shard, position) {rows[:4]}")
        return divmod(row, self.layout.shard_capacity)

    def top_labels(self, shard: int, position: int, k: int = 16) -> tuple[np.ndarray, np.ndarray, bool]:
        """Like :meth:`labels` for any encoding (for looking at a store, not for training): an embedding-only
        store's rows are decoded with its own class text embeddings at its teacher's logit scale and
        temperature (classifier features: its head and label map), and their top ``k`` kept."""
        if self.layout.topk:
            return self.labels(shard, position)
        codes, scale, valid = self.embeddings(shard, position)
        attrs = self.embedding_attrs()
        if "head" in attrs:
            weight, bias, label_map = self.classifier_head()
            probs = decode_classifier(dequantise(codes, scale), weight, bias, attrs["temperature"], label_map,
                                      self.layout.num_classes, attrs.get("residual"))
        else:
            text = np.asarray(self.text_embeddings(), dtype=np.float32)
            probs = decode_embeddings(dequantise(codes, scale), text, attrs["logit_scale"], attrs["temperature"])
        index, prob = encode_topk(probs, min(k, probs.shape[-1]))
        return index, prob, valid

    def embedding_attrs(self) -> dict[str, Any]:
        """The store's ``encoding.embedding`` attributes (dim, dtype, logit_scale, temperature, and text_tower
        (CLIP) or head (classifier features))."""
        if not self.layout.embed_dim:
            raise StoreError(f"{self.path} holds no embeddings (encoding {self.layout.encoding})")
        return dict(self.attrs["encoding"]["embedding"])

    def decode(self, index: np.ndarray, prob: np.ndarray) -> np.ndarray:
        """Full distributions (..., C) with the store's residual policy."""
        return decode_topk(index, prob, self.layout.num_classes, self.attrs["encoding"]["residual"])

    # ------------------------------------------------------------------ objects and text
    def has_objects(self) -> bool:
        self._ensure_open()
        return "objects" in self._store.group

    def objects(self, ann_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object labels for annotation ids: (n, k) int16, (n, k) float16, (n,) bool valid."""
        if not self.layout.topk:
            raise StoreError(f"{self.path} holds embeddings only; read objects with object_embeddings()")
        index, prob, valid = self._object_rows(ann_ids, ("index", "prob"))
        return index, prob, valid

    def object_embeddings(self, ann_ids) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Object embeddings for annotation ids: codes (n, D), scale (n,) float16 (None for float16 codes),
        (n,) bool valid."""
        if not self.layout.embed_dim:
            raise StoreError(f"{self.path} holds no embeddings (encoding {self.layout.encoding})")
        names = ("embedding", "embedding_scale") if self.layout.embed_dtype == "int8" else ("embedding",)
        *values, valid = self._object_rows(ann_ids, names)
        return values[0], values[1] if len(values) > 1 else None, valid

    def _object_rows(self, ann_ids, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """Rows of the object arrays ``names`` for annotation ids (fill values where absent) and valid."""
        self._ensure_open()
        if self._objects is None:
            if "objects" not in self._store.group:
                raise StoreError(f"{self.path} has no object labels (run precompute with --annotations)")
            obj = self._store.group["objects"]
            try:
                status = obj["status"][:]
                keep = status == STATUS_DONE
                ids = obj["ann_id"][:][keep]
                order = np.argsort(ids, kind="stable")
                self._objects = {"ids": ids[order]}
                for name in ("index", "prob", "embedding", "embedding_scale"):
                    if name in obj:
                        self._objects[name] = obj[name][:][keep][order]
            except ValueError as exc:  # zarr's crc32c mismatch
                raise StoreError(f"{self.path}: object labels are damaged ({str(exc).splitlines()[0]}); run "
                                 "`lt-distill store verify`") from exc
            if ("index" in self._objects and (self._objects["index"] < 0).any()) or (self._objects["ids"] < 0).any():
                # Done rows are written full (write_objects_block refuses less): a -1 means a deleted file.
                raise StoreError(f"{self.path}: object labels marked done are missing (a deleted file?); run "
                                 "`lt-distill store verify` and rerun precompute --annotations")
        o = self._objects
        ann_ids = np.asarray(ann_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(o["ids"], ann_ids)
        pos_c = np.minimum(pos, max(len(o["ids"]) - 1, 0))
        valid = (len(o["ids"]) > 0) & (o["ids"][pos_c] == ann_ids) if len(o["ids"]) else np.zeros(len(ann_ids), bool)
        out = []
        for name in names:
            src = o[name]
            values = np.full((len(ann_ids), *src.shape[1:]), -1 if name == "index" else 0, src.dtype)
            if valid.any():
                values[valid] = src[pos_c[valid]]
            out.append(values)
        return (*out, valid)

    def text_embeddings(self) -> np.ndarray:
        """(C, D) float16 class text embeddings the teacher used."""
        self._ensure_open()
        if "text" not in self._store.group or "embeddings" not in self._store.group["text"]:
            raise StoreError(f"{self.path} holds no text embeddings")
        return self._store.group["text/embeddings"][:]

    def classifier_head(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A classifier-feature store's head: weight (L, D) float32, bias (L,) float32, label map (L,) int32
        (store vocabulary index of each label-space class, -1 unmapped); checked against its SHA-256."""
        self._ensure_open()
        return self._store.classifier_head()

    def text_fingerprint(self) -> dict[str, Any]:
        self._ensure_open()
        return dict(self._store.group["text/embeddings"].attrs).get("fingerprint", {})
