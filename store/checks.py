"""Compatibility check, verification, summary and statistics of a label store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .embedding import decode_classifier, decode_embeddings, dequantise
from .integrity import ArrayFiles, array_problems
from .labelstore import LabelStore
from .schema import (
    REASONS,
    REQUIRED_ATTRS,
    REQUIRED_EMBEDDING_ATTRS,
    REQUIRED_TOPK_ATTRS,
    STATUS_DONE,
    STATUS_FAILED,
    STATUS_MISSING,
    StoreError,
    StoreMismatchError,
    crop_rows,
    flip_labels,
    row_arrays,
)
from .topk import decode_topk


def get_attr(attrs: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted path of the attribute tree; KeyError naming the path when absent."""
    node: Any = attrs
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_compatible(attrs: dict[str, Any], expected: dict[str, Any], store_name: str = "label store") -> None:
    """Raise :class:`StoreMismatchError` naming every field of ``expected`` (dotted attribute paths,
    e.g. ``"vocabulary.sha256"``, ``"grid.spec"``, ``"encoding.topk"``, ``"teacher.model"``) whose value
    in ``attrs`` differs, with both values."""
    problems = []
    for field, want in expected.items():
        try:
            have = get_attr(attrs, field)
        except KeyError:
            problems.append(f"{field}: store has no such attribute, run expects {_short(want)}")
            continue
        if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
            same = np.array_equal(np.asarray(have, dtype=object), np.asarray(want, dtype=object)) \
                if len(have) == len(want) else False
        else:
            same = have == want
        if not same:
            problems.append(f"{field}: store has {_short(have)}, run expects {_short(want)}")
    if problems:
        raise StoreMismatchError(f"{store_name} does not match this run: " + "; ".join(problems))


def store_bytes(path: Path) -> int:
    """Bytes of all files under a store (what it costs on disk)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def store_info(path: str | Path) -> dict[str, Any]:
    """Attributes (minus the long class list), shapes and row counts."""
    store = LabelStore.open(path, "r")
    damaged = damaged_shards(path, full=False)
    # Row status and reasons are checked file by file first: a failed zarr read leaves async tasks behind.
    for name in ("rows/status", "rows/reason"):
        found, _ = array_problems(store.path / name)
        if found:
            raise StoreError(f"{path}: the row status is damaged ({found[0]}); run `lt-distill store verify` "
                             "to list every problem")
    try:
        status = store.group["rows/status"][:]
        reasons = _reason_counts(store)
    except ValueError as exc:  # a chunk failing its crc32c: no row count is trustworthy
        raise StoreError(f"{path}: the row status is damaged ({str(exc).splitlines()[0]}); run "
                         "`lt-distill store verify` to list every problem") from exc
    attrs = dict(store.attrs)
    vocab = dict(attrs.get("vocabulary", {}))
    names = vocab.pop("names", [])
    vocab["num_names"] = len(names)
    attrs["vocabulary"] = vocab
    grid = dict(attrs.get("grid", {}))
    grid["num_boxes"] = len(grid.pop("boxes", []))
    attrs["grid"] = grid
    done = store.shards_done()
    done[list(damaged)] = False
    info = {
        "path": str(path),
        "attributes": attrs,
        "arrays": {name: list(arr.shape) for name, arr in _iter_arrays(store.group)},
        # "done" counts shards whose files are all present; `store verify` checks every chunk's crc32c.
        "shards": {"total": int(len(done)), "done": int(done.sum()), "damaged": len(damaged)},
        "damaged_shards": {str(k): v for k, v in damaged.items()},
        "rows": {
            "done": int((status == STATUS_DONE).sum()),
            "failed": int((status == STATUS_FAILED).sum()),
            "missing": int((status == STATUS_MISSING).sum()),
        },
        "failed_by_reason": reasons,
        "bytes_on_disk": store_bytes(store.path),
    }
    if "objects" in store.group:
        ostatus = store.group["objects/status"][:]
        info["objects"] = {"num_objects": store.group["objects"].attrs["num_objects"],
                           "done": int((ostatus == STATUS_DONE).sum())}
    return info


def _iter_arrays(group, prefix=""):
    for name, member in sorted(group.members()):
        if hasattr(member, "shape"):
            yield prefix + name, member
        else:
            yield from _iter_arrays(member, prefix + name + "/")


def _reason_counts(store: LabelStore) -> dict[str, int]:
    status = store.group["rows/status"][:]
    reasons = store.group["rows/reason"][:][status == STATUS_FAILED]
    codes, counts = np.unique(reasons, return_counts=True)
    return {REASONS.get(int(c), f"code{int(c)}"): int(n) for c, n in zip(codes, counts)}


def _per_shard(array, count: int, where: str, problems: list[str]) -> tuple[np.ndarray, set[int]]:
    """Read a (count,) array with one chunk per entry, entry by entry when a chunk is damaged: the values
    (-1 where unreadable) and the unreadable positions."""
    try:
        return array[:], set()
    except ValueError:
        values, bad = np.full(count, -1, dtype=np.int64), set()
        for i in range(count):
            try:
                values[i] = array[i]
            except ValueError as exc:
                problems.append(f"{where} entry {i} is unreadable ({exc})")
                bad.add(i)
        return values, bad


def _runs(items: list[int], limit: int) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of sorted ``items``, each at most ``limit`` long."""
    runs: list[tuple[int, int]] = []
    for i in items:
        if runs and runs[-1][1] == i and i - runs[-1][0] < limit:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def is_classifier_space(store: LabelStore) -> bool:
    """Whether the store's embeddings are classifier features (decoded by its stored head)."""
    return "head" in store.attrs.get("encoding", {}).get("embedding", {})


def _check_rows(store: LabelStore, start: int, stop: int, num_rows: np.ndarray, problems: list[str]) -> None:
    """Row-level consistency of shards [start, stop) (their files already passed the integrity check)."""
    g, lay = store.group, store.layout
    cap = lay.shard_capacity
    lo, hi = start * cap, stop * cap
    status = g["rows/status"][lo:hi]
    hard = g["rows/hard_label"][lo:hi]
    reason = g["rows/reason"][lo:hi]
    for s in range(start, stop):
        sl = slice((s - start) * cap, (s - start + 1) * cap)
        st, n = status[sl], int(num_rows[s])
        if n < 0 and (st != STATUS_MISSING).any():
            problems.append(f"shard {s}: rows committed but the shard's row count was never written")
        if n >= 0 and (st[n:] != STATUS_MISSING).any():
            problems.append(f"shard {s}: rows committed beyond its row count {n}")
    done = status == STATUS_DONE
    rows = np.nonzero(done)[0] + lo
    if done.any():
        if lay.topk:
            problems += _verify_topk_rows(g["labels/index"][lo:hi][done],
                                          g["labels/prob"][lo:hi][done].astype(np.float32), rows, lay.num_classes)
        if lay.embed_dim:
            scale = g["labels/embedding_scale"][lo:hi][done] if lay.embed_dtype == "int8" else None
            problems += _verify_embedding_rows(g["labels/embedding"][lo:hi][done], scale, rows,
                                               unit=not is_classifier_space(store))
        for r in rows[(hard[done] < -1) | (hard[done] >= lay.num_classes)][:5]:
            problems.append(f"row {r}: hard label out of range")
    failed = status == STATUS_FAILED
    for r in (np.nonzero(failed & (reason == 0))[0] + lo)[:5]:
        problems.append(f"row {r}: failed without a reason code")
    unknown = ~np.isin(status, (STATUS_MISSING, STATUS_DONE, STATUS_FAILED))
    for r in (np.nonzero(unknown)[0] + lo)[:5]:
        problems.append(f"row {r}: unknown status code {status[r - lo]}")


def damaged_shards(path: str | Path, full: bool = True) -> dict[int, str]:
    """Source shards whose labels cannot be trusted, with the first problem of each: a written shard with a
    file missing, an unreadable row count and (``full``: reads every file) a chunk failing its crc32c.
    ``full`` finds exactly the shards :func:`verify_store` names; without it only file presence is checked
    (a few stats per shard, what every precompute rerun does)."""
    store = LabelStore.open(path, "r")
    problems: list[str] = []
    num_rows, bad = _per_shard(store.group["shards/num_rows"], store.layout.num_shards, "shards/num_rows", problems)
    out = {s: problems[i] for i, s in enumerate(sorted(bad))}
    written = [s for s in range(store.layout.num_shards) if num_rows[s] >= 0]
    for name in ("shards/read", *row_arrays(store.layout)):
        if full:
            found, shards = array_problems(store.path / name, written)
            for s in sorted(shards):
                out.setdefault(s, next(p for p in found if f" shard {s}:" in p))
        else:
            files = ArrayFiles(store.path / name)
            for s in written:
                if not files.file(s).is_file():
                    out.setdefault(s, f"{name} shard {s}: file is missing although the shard was written")
    if full:
        found, shards = array_problems(store.path / "shards/num_rows")
        for s in sorted(shards):
            out.setdefault(s, next(p for p in found if f" shard {s}:" in p))
    return dict(sorted(out.items()))


def verify_store(path: str | Path, chunk_shards: int = 16) -> list[str]:
    """List every inconsistency found (empty list = the store is sound): attributes, every file's
    integrity (each chunk's crc32c, files of written shards present), text embeddings, and row contents."""
    store = LabelStore.open(path, "r")
    problems: list[str] = []
    lay = store.layout
    required = REQUIRED_ATTRS + (REQUIRED_TOPK_ATTRS if lay.topk else ()) + \
        (REQUIRED_EMBEDDING_ATTRS if lay.embed_dim else ())
    for dotted in required:
        try:
            get_attr(store.attrs, dotted)
        except KeyError:
            problems.append(f"attribute {dotted} is absent")
    if lay.embed_dim:
        emb = store.attrs.get("encoding", {}).get("embedding", {})
        if emb.get("dim") != lay.embed_dim:
            problems.append("encoding.embedding.dim differs from layout.embed_dim")
        if ("text_tower" in emb) == ("head" in emb):
            problems.append("encoding.embedding names neither a text tower nor a classifier head (or both)")
    try:
        if crop_rows(len(get_attr(store.attrs, "grid.boxes")), flip_labels(store.attrs)) != lay.num_crops:
            problems.append("grid.boxes (with grid.flip_labels) does not make layout.num_crops crop rows")
        if len(get_attr(store.attrs, "vocabulary.names")) != lay.num_classes:
            problems.append("vocabulary.names does not have layout.num_classes names")
    except KeyError:
        pass
    g = store.group
    num_rows, bad = _per_shard(g["shards/num_rows"], lay.num_shards, "shards/num_rows", problems)
    written = [s for s in range(lay.num_shards) if num_rows[s] >= 0]
    for name in ("shards/num_rows", "shards/read", *row_arrays(lay)):
        found, shards = array_problems(store.path / name, written if name != "shards/num_rows" else ())
        problems.extend(found)
        bad |= shards
    good = [s for s in range(lay.num_shards) if s not in bad]
    for start, stop in _runs(good, chunk_shards):
        _check_rows(store, start, stop, num_rows, problems)
    if "objects" in g:
        problems.extend(_verify_objects(store))
    problems.extend(_verify_text(store))
    if lay.embed_dim and is_classifier_space(store):
        problems.extend(_verify_head(store))
    return problems


def _verify_head(store: LabelStore) -> list[str]:
    """A classifier-feature store's head: every array intact, shapes consistent, bytes = recorded SHA-256."""
    problems: list[str] = []
    if "head" in store.group:
        for name in ("weight", "bias", "label_map"):
            if name in store.group["head"]:
                problems += array_problems(store.path / "head" / name)[0]
    problem = store.classifier_head_problem()
    if problem is not None:
        return problems or [f"classifier head: {problem}"]
    weight, bias, label_map = store.classifier_head()
    if weight.shape[1] != store.layout.embed_dim or len(bias) != len(weight) or len(label_map) != len(weight):
        problems.append(f"classifier head: weight {weight.shape}, bias {bias.shape} and label map "
                        f"{label_map.shape} do not fit D={store.layout.embed_dim}")
    size = store.attrs["encoding"]["embedding"]["head"].get("label_space_size")
    if size is not None and size != len(weight):
        problems.append(f"classifier head: {len(weight)} classes, the recorded label space has {size}")
    return problems


def _verify_objects(store: LabelStore) -> list[str]:
    g, lay = store.group, store.layout
    problems: list[str] = []
    num_blocks = int(g["objects"].attrs["num_blocks"])
    block_rows, bad = _per_shard(g["objects/block_rows"], num_blocks, "objects/block_rows", problems)
    written = [b for b in range(num_blocks) if block_rows[b] >= 0]
    labels = (("index", "prob") if lay.topk else ()) + \
        ((("embedding", "embedding_scale") if lay.embed_dtype == "int8" else ("embedding",)) if lay.embed_dim else ())
    for name in ("block_rows", "ann_id", "image_id", "box", *labels, "status"):
        found, blocks = array_problems(store.path / "objects" / name, written if name != "block_rows" else ())
        problems.extend(found)
        bad |= blocks
    if bad:
        return problems  # the content checks below read every block
    ostatus = g["objects/status"][:]
    odone = ostatus == STATUS_DONE
    if lay.topk:
        oidx = g["objects/index"][:][odone]
        oprob = g["objects/prob"][:][odone].astype(np.float32)
        if ((oidx < 0) | (oidx >= lay.num_classes)).any():
            problems.append("objects: class index out of range or missing in done rows")
        if (oprob < 0).any() or ~np.isfinite(oprob).all() or (oprob.sum(-1) > 1 + 1e-3).any():
            problems.append("objects: negative or non-finite probabilities, or sums above 1 + 1e-3")
    if lay.embed_dim:
        oscale = g["objects/embedding_scale"][:][odone] if lay.embed_dtype == "int8" else None
        unit = not is_classifier_space(store)
        if _verify_embedding_rows(g["objects/embedding"][:][odone][:, None],
                                  None if oscale is None else oscale[:, None], np.nonzero(odone)[0], unit=unit):
            problems.append("objects: embeddings of done rows are " + ("not unit vectors" if unit else "not finite")
                            + " (or their scales are bad)")
    if not np.isfinite(g["objects/box"][:][odone]).all():
        problems.append("objects: non-finite boxes in done rows")
    if (g["objects/ann_id"][:][odone] < 0).any():
        problems.append("objects: done rows without an annotation id")
    return problems


def _verify_text(store: LabelStore) -> list[str]:
    """Text embeddings are part of a complete store when the teacher recorded their fingerprint."""
    try:
        expected = get_attr(store.attrs, "teacher.text_fingerprint")
    except KeyError:
        expected = None
    if store.attrs.get("teacher", {}).get("family") == "classifier":
        expected = None  # a classifier teacher has no text tower: its stores have no text embeddings
    has = "text" in store.group and "embeddings" in store.group["text"]
    if not has:
        return ["text/embeddings: absent (the teacher's text embeddings are part of the store)"] if expected else []
    problems, _ = array_problems(store.path / "text" / "embeddings")
    if store.group["text/embeddings"].shape[0] != store.layout.num_classes:
        problems.append(f"text/embeddings has {store.group['text/embeddings'].shape[0]} rows, "
                        f"expected {store.layout.num_classes}")
    problem = store.text_embeddings_problem(expected)
    if problem and not problems:
        problems.append(f"text/embeddings: {problem}")
    return problems


def _verify_topk_rows(idx: np.ndarray, pr: np.ndarray, rows: np.ndarray, num_classes: int) -> list[str]:
    """Problems of done top-k rows: idx (n, K, k) int16, pr (n, K, k) float32, rows (n,) their row numbers."""
    problems = []
    bad = (idx < 0) | (idx >= num_classes)
    for r in rows[bad.any(axis=(1, 2))][:5]:
        problems.append(f"row {r}: class index out of range [0, {num_classes}) or missing (-1)")
    for r in rows[(pr < 0).any(axis=(1, 2)) | ~np.isfinite(pr).all(axis=(1, 2))][:5]:
        problems.append(f"row {r}: negative or non-finite probability")
    for r in rows[(pr.sum(-1) > 1 + 1e-3).any(axis=1)][:5]:
        problems.append(f"row {r}: probabilities of a crop sum above 1 + 1e-3")
    return problems


def _verify_embedding_rows(codes: np.ndarray, scale: np.ndarray | None, rows: np.ndarray,
                           unit: bool = True) -> list[str]:
    """Problems of done embedding rows: codes (n, K, D), scale (n, K) or None (float16), rows (n,).

    ``unit`` (CLIP embeddings): every stored crop embedding was unit-norm before quantisation, so its
    reconstruction must be within the quantisation error of norm 1 (half a step per element:
    sqrt(D) * scale / 2), float16 within 1e-2. Classifier features have no fixed norm: only finite values and
    sound scales are checked."""
    problems = []
    if scale is not None:
        s32 = scale.astype(np.float32)
        for r in rows[(~np.isfinite(s32) | (s32 <= 0)).any(axis=1)][:5]:
            problems.append(f"row {r}: embedding scale zero, negative or non-finite")
        tol = np.sqrt(codes.shape[-1]) * np.nan_to_num(s32) / 2 + 1e-3
    else:
        tol = 1e-2
    norm = np.linalg.norm(dequantise(codes, scale), axis=-1)
    if not unit:
        for r in rows[(~np.isfinite(norm)).any(axis=1)][:5]:
            problems.append(f"row {r}: a crop embedding is not finite")
        return problems
    for r in rows[(~np.isfinite(norm) | (np.abs(norm - 1) > tol)).any(axis=1)][:5]:
        problems.append(f"row {r}: a crop embedding is not a unit vector (norm off by more than its quantisation)")
    return problems


def store_stats(path: str | Path, top: int = 10, max_rows: int = 200_000) -> dict[str, Any]:
    """Bytes per image on disk, mean label entropy (nats, decoded with the store's residual policy)
    and residual mass, and the most frequent top-1 classes (whole-image crop)."""
    store = LabelStore.open(path, "r")
    lay = store.layout
    status = store.group["rows/status"][:]
    done_rows = np.nonzero(status == STATUS_DONE)[0]
    total = store_bytes(store.path)
    out: dict[str, Any] = {
        "path": str(path),
        "images_done": int(len(done_rows)),
        "bytes_on_disk": total,
        "bytes_per_image": total / max(len(done_rows), 1),
    }
    if len(done_rows) == 0:
        return out
    sample = done_rows if len(done_rows) <= max_rows else np.sort(
        np.random.default_rng(0).choice(done_rows, max_rows, replace=False))
    out["encoding"] = lay.encoding
    if lay.embed_dim:
        out.update(_embedding_stats(store, sample[:20_000], top))
    if not lay.topk:
        return out
    index = store.group["labels/index"].get_orthogonal_selection((sample, slice(None), slice(None)))
    prob = store.group["labels/prob"].get_orthogonal_selection((sample, slice(None), slice(None)))
    residual = store.attrs["encoding"]["residual"]
    entropies = []
    for start in range(0, len(sample), 2048):
        full = decode_topk(index[start:start + 2048], prob[start:start + 2048], lay.num_classes, residual)
        entropies.append(-(np.where(full > 0, full * np.log(np.maximum(full, 1e-30)), 0)).sum(-1).ravel())
    names = store.attrs["vocabulary"]["names"]
    top1 = index[:, 0, 0].astype(np.int64)  # crop 0 is the whole image in every named grid
    classes, counts = np.unique(top1, return_counts=True)
    order = np.argsort(-counts)[:top]
    out.update({
        "rows_sampled": int(len(sample)),
        "mean_entropy_nats": float(np.concatenate(entropies).mean()),
        "residual_policy": residual,
        "mean_residual_mass": float(np.clip(1 - prob.astype(np.float32).sum(-1), 0, None).mean()),
        "mean_top1_prob": float(prob[:, :, 0].astype(np.float32).mean()),
        "top1_classes": [{"class": int(classes[i]), "name": names[int(classes[i])], "count": int(counts[i])}
                         for i in order],
    })
    return out


def _embedding_stats(store: LabelStore, sample: np.ndarray, top: int) -> dict[str, Any]:
    """Embedding rows: norm of the reconstruction, quantisation step, and (decoded with the store's own
    class text embeddings at its logit scale and temperature, or its classifier head at its temperature)
    entropy and top-1 classes of the whole image."""
    lay = store.layout
    sel = (sample, slice(None), slice(None))
    codes = store.group["labels/embedding"].get_orthogonal_selection(sel)
    scale = store.group["labels/embedding_scale"].get_orthogonal_selection(sel[:2]) \
        if lay.embed_dtype == "int8" else None
    emb = dequantise(codes, scale)
    out: dict[str, Any] = {"embedding_dim": lay.embed_dim, "embedding_dtype": lay.embed_dtype,
                           "mean_embedding_norm": float(np.linalg.norm(emb, axis=-1).mean())}
    if scale is not None:
        out["mean_quantisation_step"] = float(scale.astype(np.float32).mean())
    attrs = store.attrs["encoding"]["embedding"]
    probs = None
    if is_classifier_space(store) and store.classifier_head_problem() is None:
        weight, bias, label_map = store.classifier_head()
        # crop 0 is the whole image in every named grid
        probs = decode_classifier(emb[:, 0], weight, bias, attrs["temperature"], label_map, lay.num_classes,
                                  attrs.get("residual"))
    elif "text" in store.group and "embeddings" in store.group["text"]:
        text = store.group["text/embeddings"][:].astype(np.float32)
        probs = decode_embeddings(emb[:, 0], text, attrs["logit_scale"], attrs["temperature"])
    if probs is not None:
        out["embedding_mean_entropy_nats"] = float(-(probs * np.log(np.maximum(probs, 1e-30))).sum(-1).mean())
        top1 = probs.argmax(-1)
        classes, counts = np.unique(top1, return_counts=True)
        names = store.attrs["vocabulary"]["names"]
        out["embedding_top1_classes"] = [{"class": int(classes[i]), "name": names[int(classes[i])],
                                          "count": int(counts[i])} for i in np.argsort(-counts)[:top]]
    return out
