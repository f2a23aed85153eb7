"""`lt-distill shards`: WebDataset shards from the image collections users hold.

Sources (:data:`KINDS`):

* ``folders`` - ImageNet-style class folders, ``ROOT/[split/]n01443537/*.JPEG``: the folder name is the wnid.
* ``detic`` - Detic's ImageNet-LVIS image-info JSON (``{"images": [{"id", "file_name", "pos_category_ids",
  ...}], "categories": [...]}``, ``file_name`` relative to ``image_root``): the wnid is the folder or file
  name's ``n########`` prefix, else the WordNet id of the first positive LVIS category's synset.
* ``images`` - a COCO/LVIS image folder (no class): ``--labels none`` material.

Each sample is ``<key>.jpg`` (the file's own bytes; PNG/WebP keep their extension, other formats are
re-encoded as JPEG), ``<key>.cls`` (the wnid's index in the chosen class list, when one is given) and
``<key>.json`` (``wnid``, ``source`` path relative to the input root, and Detic's ``image_id`` /
``pos_category_ids``). The key is the file name without extension (``n01443537_10007``), so precompute's
class-list check can read the wnid back from it.

The sample list is fixed first (sorted, then shuffled with ``seed`` so that every shard mixes classes)
and cut into shards of ``shard_size``; worker processes write whole shards. A shard is written under a
temporary name with its stats beside it, then renamed: a rerun skips every shard whose file and stats
exist and rewrites the rest, so a killed job (kill -9) resumes without losing or duplicating a sample.
Unreadable or undecodable files are listed in the manifest, not fatal. ``manifest.json`` (written last)
gives each shard's sample count, bytes and class histogram; precompute takes the counts from it instead
of reading every shard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..config import read_json_file
from ..errors import ConfigError, LtDistillError
from ..pipeline.vocab import WNID_RE, class_list_sha256, load_class_list, load_synset_wnids

KINDS = ("folders", "detic", "images")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lt-distill-shards"
STATE_DIR = ".lt-shards"  # per-shard stats of finished shards (what makes a shard "finished")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become JPEG
_WNID_PREFIX = re.compile(r"(?:^|/)(n\d{8})(?:_[^/]*)?(?:\.[^/]*)?$")


class ShardsError(LtDistillError):
    """The input cannot be turned into shards as asked."""


@dataclasses.dataclass
class ShardsConfig:
    """One `lt-distill shards` job."""

    input: str  # folders / images: the root folder; detic: the image-info JSON
    out: str
    kind: str = "folders"
    image_root: str = ""  # detic: folder that file_name is relative to ("" = the JSON's folder)
    class_list: str = ""  # index space of the .cls numbers; "" writes no .cls (json wnid only)
    shard_size: int = 1000
    prefix: str = "shard"
    seed: int = 0  # shuffle of the sample order; -1 keeps the sorted order
    workers: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.shard_size < 1 or self.workers < 1:
            raise ConfigError("--shard-size and --workers must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ConfigError(f"--prefix {self.prefix!r}: use letters, digits, '_', '-', '.'")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input image: absolute path, key, wnid (or None) and extra ``.json`` fields."""

    path: str
    key: str
    source: str  # path relative to the input root
    wnid: str | None
    extra: tuple[tuple[str, Any], ...] = ()


# ---------------------------------------------------------------------------------------------------- listing
def _wnid_of(rel: str) -> str | None:
    parent = Path(rel).parent.name
    if WNID_RE.match(parent):
        return parent
    match = _WNID_PREFIX.search(rel)
    return match.group(1) if match else None


def _walk_images(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _keys(rels: list[str]) -> list[str]:
    """The file name without extension; where two files share it, their relative paths (made key-safe)."""
    stems = [Path(r).name.split(".")[0] for r in rels]
    counts = Counter(stems)
    return [s if counts[s] == 1 else re.sub(r"[^A-Za-z0-9_-]", "_", r.rsplit(".", 1)[0]) for s, r in zip(stems, rels)]


def list_items(cfg: ShardsConfig) -> list[Item]:
    """Every input image, in a fixed order (sorted, then shuffled with ``cfg.seed``)."""
    src = Path(cfg.input)
    if cfg.kind in ("folders", "images"):
        if not src.is_dir():
            raise ShardsError(f"input folder not found: {src}")
        rels = _walk_images(src)
        root = src
        wnids = [_wnid_of(r) if cfg.kind == "folders" else None for r in rels]
        if cfg.kind == "folders" and any(w is None for w in wnids):
            missing = next(r for r, w in zip(rels, wnids) if w is None)
            raise ShardsError(f"{src}: image {missing} is not in a wnid folder (ROOT/[split/]n########/*.JPEG); "
                              "use --kind images for unlabelled folders")
        extras: list[tuple] = [()] * len(rels)
    else:
        data = read_json_file(src, "Detic image-info JSON")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ShardsError(f"{src}: expected Detic's image-info JSON ({{'images': [{{'file_name', "
                              "'pos_category_ids', ...}], 'categories': [...]}})")
        root = Path(cfg.image_root) if cfg.image_root else src.parent
        synset_of = {c.get("id"): c.get("synset") for c in data.get("categories") or [] if isinstance(c, dict)}
        table = load_synset_wnids()
        rels, wnids, extras = [], [], []
        for image in data["images"]:
            if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
                raise ShardsError(f"{src}: every image needs a 'file_name', got {str(image)[:80]}")
            pos = [int(c) for c in image.get("pos_category_ids") or []]
            wnid = _wnid_of(image["file_name"]) or (table.get(synset_of.get(pos[0])) if pos else None)
            rels.append(image["file_name"])
            wnids.append(wnid)
            extras.append((("image_id", image.get("id")), ("pos_category_ids", pos)))
        order = sorted(range(len(rels)), key=lambda i: rels[i])
        rels, wnids, extras = [rels[i] for i in order], [wnids[i] for i in order], [extras[i] for i in order]
    if not rels:
        raise ShardsError(f"{src}: no images found")
    items = [Item(str(root / r), k, r, w, e) for r, k, w, e in zip(rels, _keys(rels), wnids, extras)]
    if cfg.seed >= 0:
        random.Random(cfg.seed).shuffle(items)
    return items


# ---------------------------------------------------------------------------------------------------- writing
def _encode(path: str) -> tuple[bytes, str]:
    """(bytes to store, extension); raises OSError / ValueError / SyntaxError for a bad file."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale - enough to find truncated or corrupt data
        img.load()
    if fmt in KEEP_FORMATS:
        return data, KEEP_FORMATS[fmt]
    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


def write_shard(path: Path, state: Path, items: list[Item], class_index: dict[str, int] | None) -> dict[str, Any]:
    """Write one shard (temp name, then rename) and its stats; returns the stats."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".partial")
    classes: Counter = Counter()
    bad = []
    count = 0
    with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:  # mtime 0: the same input gives the same bytes
        for item in items:
            try:
                data, ext = _encode(item.path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                bad.append({"source": item.source, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            sample = {"__key__": item.key, ext: data}
            meta: dict[str, Any] = {"wnid": item.wnid, "source": item.source, **dict(item.extra)}
            if class_index is not None:
                if item.wnid not in class_index:
                    bad.append({"source": item.source, "reason": f"wnid {item.wnid} is not in the class list"})
                    continue
                sample["cls"] = str(class_index[item.wnid]).encode()
            sample["json"] = json.dumps(meta, sort_keys=True).encode()
            sink.write(sample)
            count += 1
            classes[item.wnid or ""] += 1
    stats = {"file": path.name, "samples": count, "bytes": tmp.stat().st_size,
             "classes": dict(sorted(classes.items())), "bad": bad}
    stats_tmp = state / f"{path.name}.json.partial"
    stats_tmp.write_text(json.dumps(stats) + "\n")
    os.replace(stats_tmp, state / f"{path.name}.json")
    os.replace(tmp, path)  # last: the shard file exists only once it and its stats are whole
    return stats


def _plan_sha256(cfg: ShardsConfig, items: list[Item], wnids: list[str] | None) -> str:
    digest = hashlib.sha256(json.dumps([cfg.kind, cfg.shard_size, cfg.seed, cfg.prefix,
                                        class_list_sha256(wnids) if wnids else None]).encode())
    for item in items:
        digest.update(f"{item.source}\t{item.key}\t{item.wnid}\n".encode())
    return digest.hexdigest()


def make_shards(cfg: ShardsConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job; returns the manifest (also written to ``OUT/manifest.json``)."""
    items = list_items(cfg)
    wnids = load_class_list(cfg.class_list) if cfg.class_list else None
    class_index = {w: i for i, w in enumerate(wnids)} if wnids else None
    out = Path(cfg.out)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    plan = _plan_sha256(cfg, items, wnids)
    plan_file = state / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("plan_sha256") != plan:
        raise ShardsError(f"{out} holds shards of another input or other settings (the sample list differs); "
                          "use another --out folder or remove that one")
    plan_file.write_text(json.dumps({"plan_sha256": plan}) + "\n")
    groups = [items[i:i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    width = max(6, len(str(len(groups) - 1)))
    paths = [out / f"{cfg.prefix}-{s:0{width}d}.tar" for s in range(len(groups))]
    finished = [p.is_file() and (state / f"{p.name}.json").is_file() for p in paths]
    todo = [s for s in range(len(groups)) if not finished[s]]
    log(f"shards: {len(items)} images -> {len(groups)} shards of {cfg.shard_size} in {out}, "
        f"{len(groups) - len(todo)} already done, {len(todo)} to write ({min(cfg.workers, max(len(todo), 1))} processes)")
    _run(todo, groups, paths, state, class_index, cfg)
    stats = [json.loads((state / f"{p.name}.json").read_text()) for p in paths]
    manifest = {
        "format": MANIFEST_FORMAT, "version": 1, "kind": cfg.kind, "input": os.path.abspath(cfg.input),
        "pattern": str(out.resolve() / f"{cfg.prefix}-{{{0:0{width}d}..{len(groups) - 1:0{width}d}}}.tar"),
        "class_list": cfg.class_list or None, "class_list_sha256": class_list_sha256(wnids) if wnids else None,
        "shard_size": cfg.shard_size, "seed": cfg.seed, "plan_sha256": plan, "num_shards": len(groups),
        "num_samples": sum(s["samples"] for s in stats), "num_bad": sum(len(s["bad"]) for s in stats),
        "shards": [{k: s[k] for k in ("file", "samples", "bytes", "classes")} for s in stats],
        "bad": [b for s in stats for b in s["bad"]],
    }
    (out / (MANIFEST + ".partial")).write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(out / (MANIFEST + ".partial"), out / MANIFEST)
    log(f"shards: {manifest['num_samples']} samples in {len(groups)} shards, {manifest['num_bad']} bad files "
        f"(listed in {out / MANIFEST}); pattern {manifest['pattern']}")
    return manifest


def _run(todo: list[int], groups: list[list[Item]], paths: list[Path], state: Path,
         class_index: dict[str, int] | None, cfg: ShardsConfig) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                   TimeRemainingColumn(), disable=not cfg.progress)
    with bar:
        task = bar.add_task("shards", total=sum(len(groups[s]) for s in todo))
        if cfg.workers == 1 or len(todo) <= 1:
            for s in todo:
                write_shard(paths[s], state, groups[s], class_index)
                bar.advance(task, len(groups[s]))
            return
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(cfg.workers, len(todo))) as pool:
            futures = {pool.submit(write_shard, paths[s], state, groups[s], class_index): s for s in todo}
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.advance(task, len(groups[futures[future]]))


# ---------------------------------------------------------------------------------------------------- reading
def manifest_counts(urls: list[str]) -> list[int] | None:
    """Sample counts of ``urls`` from the ``manifest.json`` next to them, or None unless every shard is
    listed there with its current size (a shard rewritten since is counted again, not trusted)."""
    manifests: dict[Path, dict[str, Any] | None] = {}
    counts = []
    for url in urls:
        path = Path(url)
        folder = path.parent
        if folder not in manifests:
            try:
                data = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                data = None
            ok = isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
            manifests[folder] = {s["file"]: s for s in data["shards"]} if ok else None
        entry = (manifests[folder] or {}).get(path.name)
        try:
            if entry is None or path.stat().st_size != entry["bytes"]:
                return None
        except OSError:
            return None
        counts.append(int(entry["samples"]))
    return counts
