"""File-level integrity of a label store: every chunk's crc32c, shard indexes, and absent files.

Format version 2 ends every chunk with a crc32c (zarr v3's ``crc32c`` codec) and keeps every inner chunk
of a written shard on disk, so damage is always one of: a file that is absent although its shard was
written, a shard index that fails its crc32c or points outside the file, or a chunk whose crc32c does
not match. This module finds them by reading the files directly (no zarr decode), so one damaged chunk
never hides the others.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import google_crc32c
import numpy as np

_EMPTY = np.iinfo(np.uint64).max


def crc_ok(raw: bytes) -> bool:
    """True when ``raw`` ends with the little-endian crc32c of the bytes before it."""
    return len(raw) >= 4 and google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:], "little")


class ArrayFiles:
    """Where the chunk (or shard) files of one Zarr v3 array are, from its ``zarr.json``."""

    def __init__(self, array_dir: Path) -> None:
        self.dir = Path(array_dir)
        meta = json.loads((self.dir / "zarr.json").read_text())
        self.ndim = len(meta["shape"])
        self.grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        codecs = meta.get("codecs", [])
        self.sharded = bool(codecs) and codecs[0].get("name") == "sharding_indexed"
        self.chunks_per_shard = 1
        if self.sharded:
            inner = codecs[0]["configuration"]["chunk_shape"]
            self.chunks_per_shard = int(np.prod([g // c for g, c in zip(self.grid, inner)]))

    def file(self, first: int) -> Path:
        """The file holding chunk/shard ``first`` along axis 0 (the only chunked axis of a store array)."""
        return self.dir / "c" / self.sep.join([str(first)] + ["0"] * (self.ndim - 1))

    def files(self) -> list[tuple[int, Path]]:
        """(position along axis 0, path) of every chunk/shard file on disk."""
        root = self.dir / "c"
        out = []
        if root.is_dir():
            for dirpath, _, names in os.walk(root):
                for name in names:
                    rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                    first = rel.split(self.sep)[0].split("/")[0]
                    if first.isdigit():
                        out.append((int(first), Path(dirpath) / name))
        return sorted(out)


def _check_shard_file(files: ArrayFiles, path: Path, complete: bool) -> str | None:
    raw = path.read_bytes()
    nbytes = files.chunks_per_shard * 16
    if len(raw) < nbytes + 4 or not crc_ok(raw[len(raw) - nbytes - 4:]):
        return "shard index is truncated or corrupt (crc32c mismatch)"
    index = np.frombuffer(raw[len(raw) - nbytes - 4: len(raw) - 4], dtype="<u8").reshape(-1, 2)
    body = len(raw) - nbytes - 4
    bad, absent = [], []
    for chunk, (offset, size) in enumerate(index):
        if offset == _EMPTY:
            absent.append(chunk)
        elif int(offset) + int(size) > body or not crc_ok(raw[int(offset): int(offset) + int(size)]):
            bad.append(chunk)
    if bad:
        return f"{len(bad)} inner chunk(s) fail their crc32c (first: chunk {bad[0]})"
    if complete and absent:
        return f"{len(absent)} inner chunk(s) are missing (first: chunk {absent[0]})"
    return None


def array_problems(array_dir: Path, written: Iterable[int] = ()) -> tuple[list[str], set[int]]:
    """Integrity problems of one array, and the axis-0 chunk/shard positions they concern.

    ``written``: positions (source shards, object blocks) whose file must exist with every inner chunk."""
    name = f"{array_dir.parent.name}/{array_dir.name}"
    try:
        files = ArrayFiles(array_dir)
    except FileNotFoundError:
        return [f"{name}: zarr.json is missing"], set()
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{name}: zarr.json is unreadable ({exc})"], set()
    written = set(written)
    problems, bad = [], set()
    present = set()
    for first, path in files.files():
        present.add(first)
        if files.sharded:
            problem = _check_shard_file(files, path, complete=first in written)
        else:
            problem = None if crc_ok(path.read_bytes()) else "chunk fails its crc32c"
        if problem:
            problems.append(f"{name} shard {first}: {problem}")
            bad.add(first)
    for first in sorted(set(written) - present):
        problems.append(f"{name} shard {first}: file {files.file(first).relative_to(array_dir.parent.parent)} "
                        "is missing although the shard was written")
        bad.add(first)
    return problems, bad
