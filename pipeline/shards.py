"""WebDataset shards: expanding patterns, reading samples tolerant of damage, and the worker dataset.

A shard is a tar file whose members are grouped into samples by key (webdataset's convention:
``dir/key.ext``, the key is everything up to the first dot of the file name). :func:`iter_tar_samples`
reads one shard as a stream and never gives up silently: a member cut short (the file ends inside its
data) becomes a sample with ``error == "truncated"``; the shard's last readable position is reported.

:class:`ShardChunks` is the DataLoader stage of precompute: every worker takes whole shards (worker
``w`` of ``W`` handles shards ``w::W``), decodes each sample's image, maps its label, turns the image
into teacher inputs with ``prepare`` (grid crops or a resized whole image) and yields
:class:`ShardChunk` groups of consecutive samples of one shard; the last chunk of a shard has
``end=True``. Failures become rows with a reason code (:data:`lt_distill.store.REASON_CODES`).
"""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from ..errors import LtDistillError
from ..store import REASON_CODES
from .images import ImageDecodeError, decode_image
from .vocab import HardLabeler

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
_META = re.compile(r"^__[^/]*__($|/)")  # webdataset metadata members (skipped)


class ShardError(LtDistillError):
    """A shard pattern or shard file cannot be used."""


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", url))


def expand_shards(pattern: str) -> list[str]:
    """``"dir/prefix-{000000..000123}.tar"`` -> the list of shard URLs, in order (brace expansion;
    several patterns may be joined with ``::``). Local files must exist."""
    if not pattern or not pattern.strip():
        raise ShardError("no shard pattern given (--shards 'dir/prefix-{000000..000123}.tar')")
    urls: list[str] = []
    for part in pattern.split("::"):
        try:
            urls.extend(braceexpand.braceexpand(part.strip()))
        except braceexpand.UnbalancedBracesError as exc:
            raise ShardError(f"bad shard pattern {pattern!r}: {exc}") from exc
    if len(set(urls)) != len(urls):
        raise ShardError(f"shard pattern {pattern!r} lists the same shard more than once")
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        raise ShardError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} shard files do not exist "
                         f"(first: {missing[0]})")
    return urls


@dataclasses.dataclass
class RawSample:
    """One sample's members as read from a shard: ``fields`` maps extension -> bytes (lower-case).
    ``error`` is a reason name (``"truncated"``) when the sample could not be read whole."""

    key: str
    fields: dict[str, bytes]
    error: str | None = None
    detail: str = ""


def _open_stream(url: str):
    try:
        return gopen(url, "rb") if not _is_local(url) else open(url, "rb")
    except OSError as exc:
        raise ShardError(f"cannot open shard {url}: {exc}") from exc


# Why reading a shard stopped (the ``end`` of its read record). Only "complete" means every sample was read.
READ_ENDS = {
    "complete": "the end-of-archive marker was read",
    "empty": "the file is empty",
    "not_a_tar": "the file is not a readable tar archive",
    "no_end_marker": "the file ends at a member boundary without the end-of-archive marker (cut short?)",
    "truncated_header": "the file ends inside a member header",
    "invalid_header": "a member header is corrupt",
    "member_cut_short": "the file ends inside a member's data",
    "unreadable": "reading failed",
}


class _CountingReader:
    """A read-only stream that counts the bytes read from it (the ``bytes`` of a read record)."""

    def __init__(self, stream) -> None:
        self.stream, self.bytes = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        return data

    def close(self) -> None:
        self.stream.close()


class _RecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: it ends iteration silently both at the end-of-archive marker and when
    the file stops at a member boundary or inside a header; only the first means the shard is whole."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.lt_end = "complete"
            raise
        except tarfile.EmptyHeaderError:
            tar.lt_end = "no_end_marker"
            raise
        except tarfile.TruncatedHeaderError:
            tar.lt_end = "truncated_header"
            raise
        except tarfile.InvalidHeaderError:
            tar.lt_end = "invalid_header"
            raise


def source_stat(url: str) -> dict[str, int]:
    """``size`` and ``mtime_ns`` of a local shard file (what a rerun compares), {} for remote URLs."""
    if not _is_local(url):
        return {}
    st = Path(url).stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def iter_tar_samples(url: str, notes: list[str] | None = None, record: dict | None = None) -> Iterator[RawSample]:
    """Samples of one tar shard in order. Damage never raises: a member whose data ends early yields a
    ``truncated`` sample and ends the shard; an unreadable header ends it too. ``notes`` (if given)
    collects one line per such event; ``record`` (if given) receives ``members`` (regular members read),
    ``bytes`` (read from the file) and ``end`` (a key of :data:`READ_ENDS`). A second sample with the same
    key as the one before (a repeated ``key.ext``) is yielded as its own sample, never merged. Only failing
    to open the file raises :class:`ShardError`."""
    notes = notes if notes is not None else []
    record = record if record is not None else {}
    record.update(members=0, bytes=0, end="unreadable")
    stream = _CountingReader(_open_stream(url))
    key, fields = None, {}
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_RecordingTarInfo)
        except tarfile.TarError as exc:
            record["end"] = "empty" if stream.bytes == 0 else "not_a_tar"
            notes.append(f"{url}: {READ_ENDS[record['end']]} ({exc})")
            return
        if not hasattr(tar, "lt_end"):  # (opening reads the first header: an empty archive ends there)
            tar.lt_end = "unreadable"
        members = iter(tar)
        while True:
            try:
                info = next(members)
            except StopIteration:
                record["end"] = tar.lt_end
                if tar.lt_end != "complete":
                    notes.append(f"{url}: {READ_ENDS[tar.lt_end]} after sample {key!r}")
                break
            except (tarfile.TarError, EOFError, OSError) as exc:
                record["end"] = "unreadable" if tar.lt_end == "unreadable" else tar.lt_end
                notes.append(f"{url}: unreadable after sample {key!r} ({exc}); the rest of the shard is lost")
                break
            if not info.isreg() or _META.match(info.name):
                continue
            member_key, ext = base_plus_ext(info.name)
            if member_key is None:
                continue
            if key is not None and (member_key != key or ext.lower() in fields):
                yield RawSample(key, fields)  # a repeated key.ext starts a second sample with that key
                fields = {}
            key = member_key
            record["members"] += 1
            try:
                fields[ext.lower()] = tar.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                record["end"] = "member_cut_short"
                notes.append(f"{url}: member {info.name} is cut short ({exc}); the rest of the shard is lost")
                yield RawSample(key, fields, "truncated", str(exc))
                key = None
                break
            tar.members = []  # stream mode: do not keep every TarInfo
        if key is not None:
            yield RawSample(key, fields)
    finally:
        record["bytes"] = stream.bytes
        stream.close()


def count_samples(url: str) -> int:
    """Number of samples in a shard (reads the tar headers, skipping member data when the file seeks)."""
    if _is_local(url):
        try:
            with tarfile.open(url, mode="r:*") as tar:
                keys = []
                try:
                    for info in tar:
                        if info.isreg() and not _META.match(info.name):
                            k, _ = base_plus_ext(info.name)
                            if k is not None and (not keys or keys[-1] != k):
                                keys.append(k)
                except (tarfile.TarError, EOFError, OSError):
                    pass
                return len(keys)
        except (tarfile.TarError, EOFError):
            return 0
        except OSError as exc:
            raise ShardError(f"cannot open shard {url}: {exc}") from exc
    return sum(1 for _ in iter_tar_samples(url))


# ---------------------------------------------------------------------------------------------------- workers
@dataclasses.dataclass
class ShardChunk:
    """Consecutive samples of one shard, as a DataLoader worker hands them to the main process.

    ``positions`` (n,) int64 positions in the shard; ``keys`` n strings; ``sizes`` (n, 2) int32 (h, w),
    0 when not decoded; ``hard_labels`` (n,) int32; ``reasons`` (n,) uint8, 0 for good samples;
    ``inputs`` (m * rows_per_sample, ...) uint8 teacher inputs of the m good samples, in order.
    ``end`` marks the shard's last chunk; then ``num_samples`` is the shard's sample count, ``notes``
    lists shard-level damage and ``read`` is the read record (:func:`iter_tar_samples` plus
    :func:`source_stat`)."""

    shard: int
    positions: torch.Tensor
    keys: list[str]
    sizes: torch.Tensor
    hard_labels: torch.Tensor
    reasons: torch.Tensor
    inputs: torch.Tensor
    end: bool = False
    num_samples: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    read: dict = dataclasses.field(default_factory=dict)  # last chunk: the shard's read record

    @property
    def ok(self) -> torch.Tensor:
        return self.reasons == 0


# Decoded-pixel cap: a 12000 x 12000 image costs 2 GB and ~12 s per worker to decode. The largest images
# of ImageNet-21k are ~10k x 10k (on the order of 1e8 pixels is unheard of in classification data).
MAX_IMAGE_PIXELS = 100_000_000


def image_pixels(data: bytes) -> int | None:
    """Width x height from an image's header without decoding it (None when the header is unreadable)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.size[0]) * int(img.size[1])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def decode_sample(raw: RawSample, labeler: HardLabeler, min_image_size: int = 8,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray | None, tuple[int, int], int, int]:
    """(image or None, (h, w), hard label, reason code). Checks in order: the tar member, the image's
    pixel count (header only), the image, its size, the label."""
    if raw.error is not None:
        return None, (0, 0), -1, REASON_CODES[raw.error]
    ext = next((e for e in IMAGE_EXTS if e in raw.fields), None)
    if ext is None:
        return None, (0, 0), -1, REASON_CODES["undecodable"]
    pixels = image_pixels(raw.fields[ext])
    if pixels is not None and pixels > max_pixels:
        return None, (0, 0), -1, REASON_CODES["too_large"]
    try:
        image = decode_image(raw.fields[ext])
    except ImageDecodeError:
        return None, (0, 0), -1, REASON_CODES["undecodable"]
    size = (int(image.shape[0]), int(image.shape[1]))
    if min(size) < min_image_size:
        return None, size, -1, REASON_CODES["too_small"]
    try:
        label, reason = labeler(raw.fields)
    except Exception:  # noqa: BLE001 -- any failure to parse one sample's label (int digit limit, deep JSON
        # nesting, bad encodings ...) fails that sample, never the job: a rerun would stop at it again.
        return None, size, -1, REASON_CODES["unparsable_label"]
    if reason:
        return None, size, -1, reason
    return image, size, label, 0


class ShardChunks(IterableDataset):
    """Decoded, prepared samples of ``shards`` (a list of (shard index, url)) as :class:`ShardChunk` items.

    ``prepare(image) -> (rows, ...) uint8 tensor`` makes a good sample's teacher inputs (every sample the
    same shape). Each worker handles whole shards, ``shards[worker::num_workers]``."""

    def __init__(self, shards: list[tuple[int, str]], labeler: HardLabeler,
                 prepare: Callable[[np.ndarray], torch.Tensor], input_shape: tuple[int, ...],
                 chunk_size: int = 8, min_image_size: int = 8, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        super().__init__()
        self.max_pixels = max_pixels
        self.shards = list(shards)
        self.labeler = labeler
        self.prepare = prepare
        self.input_shape = tuple(input_shape)
        self.chunk_size = chunk_size
        self.min_image_size = min_image_size

    def _my_shards(self) -> list[tuple[int, str]]:
        info = get_worker_info()
        if info is None:
            return self.shards
        return self.shards[info.id::info.num_workers]

    def __iter__(self) -> Iterator[ShardChunk]:
        for shard, url in self._my_shards():
            yield from self.read_shard(shard, url)

    def read_shard(self, shard: int, url: str) -> Iterator[ShardChunk]:
        notes: list[str] = []
        record = source_stat(url)  # before reading: a file replaced meanwhile then reads as changed
        rows: list[tuple] = []
        position = 0
        for raw in iter_tar_samples(url, notes, record):
            image, size, label, reason = decode_sample(raw, self.labeler, self.min_image_size, self.max_pixels)
            inputs = self.prepare(image) if reason == 0 else None
            rows.append((position, raw.key, size, label, reason, inputs))
            position += 1
            if len(rows) == self.chunk_size:
                yield self._chunk(shard, rows)
                rows = []
        yield self._chunk(shard, rows, end=True, num_samples=position, notes=notes, read=record)

    def _chunk(self, shard: int, rows: list[tuple], end: bool = False, num_samples: int = 0,
               notes: list[str] | None = None, read: dict | None = None) -> ShardChunk:
        inputs = [r[5] for r in rows if r[5] is not None]
        return ShardChunk(
            shard=shard,
            positions=torch.tensor([r[0] for r in rows], dtype=torch.int64),
            keys=[r[1] for r in rows],
            sizes=torch.tensor([r[2] for r in rows], dtype=torch.int32).reshape(-1, 2),
            hard_labels=torch.tensor([r[3] for r in rows], dtype=torch.int32),
            reasons=torch.tensor([r[4] for r in rows], dtype=torch.uint8),
            inputs=torch.cat(inputs) if inputs else torch.empty((0, *self.input_shape), dtype=torch.uint8),
            end=end,
            num_samples=num_samples,
            notes=list(notes or []),
            read=dict(read or {}),
        )
