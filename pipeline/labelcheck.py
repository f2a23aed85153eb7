"""Does a class list match the shards? A check run before any label is made.

A ``.cls`` number means nothing without the list it indexes, and ImageNet-21k circulates in several
index spaces that differ by a few wnids (fall-11 has 21,843 classes, winter-21 21,841: every index after
the first difference shifts). Where a sample also says which wnid it is - an ImageNet key such as
``n01443537_10007``, or a ``wnid`` field in its ``.json`` - the wnid that the chosen list gives its
index must be that one. :func:`check_class_list` reads the first few samples of every shard (local tar
files are read by seeking over the image data), and refuses a list that disagrees, naming the list, the
disagreement rate, an example, and the named list that would agree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from .shards import _META, _is_local, iter_tar_samples
from .vocab import CLASS_LISTS, WNID_RE, LabelSource, VocabularyError, load_class_list

_KEY_WNID = re.compile(r"(?:^|/)(n\d{8})_[^/]*$")  # ImageNet file names: n01443537_10007


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One sample's label index and the wnid the sample itself names (key or ``.json``)."""

    key: str
    shard: str
    index: int
    wnid: str
    said_by: str  # "key" or "json"


def _index_and_wnid(key: str, fields: dict[str, bytes], source: LabelSource) -> tuple[int, str, str] | None:
    """(label index, wnid named by the sample, where it was named) or None when either is missing."""
    meta = None
    if "json" in fields and len(fields["json"]) <= 1 << 16:  # metadata, not a payload: skip huge members
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # deep nesting exhausts the parser
            meta = None
    meta = meta if isinstance(meta, dict) else {}
    if source.kind == "cls":
        try:
            index = int(fields["cls"].decode("utf-8").strip()) if "cls" in fields else None
        except (UnicodeDecodeError, ValueError):
            index = None
    else:  # json:FIELD holding an integer index
        value = meta.get(source.field)
        index = value if isinstance(value, int) and not isinstance(value, bool) else None
    if index is None:
        return None
    wnid = meta.get("wnid") if source.field != "wnid" or source.kind == "cls" else None
    if isinstance(wnid, str) and WNID_RE.match(wnid.strip()):
        return index, wnid.strip(), "json"
    match = _KEY_WNID.search(key)
    return (index, match.group(1), "key") if match else None


def _small_members(url: str, samples: int) -> list[tuple[str, dict[str, bytes]]]:
    """The ``.cls`` / ``.json`` members of a local shard's first ``samples`` samples, read by seeking
    (image data is skipped, not read). Damage ends the read quietly: the job itself reports it."""
    out: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(url, mode="r:*") as tar:
            key = None
            for info in tar:
                if not info.isreg() or _META.match(info.name):
                    continue
                member_key, ext = base_plus_ext(info.name)
                if member_key is None:
                    continue
                if member_key != key:
                    if len(out) == samples:
                        break
                    out.append((member_key, {}))
                    key = member_key
                if ext.lower() in ("cls", "json"):
                    out[-1][1][ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError):
        pass
    return out


def shard_evidence(url: str, source: LabelSource, samples: int) -> list[Evidence]:
    """Evidence from the first ``samples`` samples of one shard."""
    if _is_local(url):
        raw = _small_members(url, samples)
    else:
        raw = []
        for sample in iter_tar_samples(url):
            raw.append((sample.key, sample.fields))
            if len(raw) == samples:
                break
    out = []
    for key, fields in raw:
        got = _index_and_wnid(key, fields, source)
        if got is not None:
            out.append(Evidence(key, url, *got))
    return out


def disagreements(evidence: list[Evidence], wnids: list[str]) -> list[Evidence]:
    """The samples whose index does not give their own wnid under ``wnids`` (out-of-range indices too)."""
    return [e for e in evidence if not 0 <= e.index < len(wnids) or wnids[e.index] != e.wnid]


def check_class_list(urls: list[str], source: LabelSource, spec: str, wnids: list[str],
                     samples_per_shard: int = 16) -> dict[str, int]:
    """Compare ``wnids`` (class list ``spec``) with what the first ``samples_per_shard`` samples of every
    shard say about themselves. Returns {"checked": n, "disagree": 0}; raises :class:`VocabularyError`
    (one line: list, rate, example, the named list that agrees) on any disagreement."""
    if samples_per_shard <= 0 or source.kind == "none" or (source.kind == "json" and source.field == "wnid"):
        return {"checked": 0, "disagree": 0}
    evidence = [e for url in urls for e in shard_evidence(url, source, samples_per_shard)]
    bad = disagreements(evidence, wnids)
    if not bad:
        return {"checked": len(evidence), "disagree": 0}
    e = bad[0]
    given = wnids[e.index] if 0 <= e.index < len(wnids) else f"out of range ({len(wnids)} classes)"
    agree = [name for name in CLASS_LISTS if not disagreements(evidence, load_class_list(name))]
    hint = (f"{agree[0]} agrees with all {len(evidence)}: pass --class-list {agree[0]}" if agree
            else "no named list agrees: pass the list the shards were made with as a file")
    raise VocabularyError(
        f"class list {spec} disagrees with the shards on {len(bad)} of {len(evidence)} checked samples "
        f"({100 * len(bad) / len(evidence):.1f}%): {e.key} in {Path(e.shard).name} has index {e.index} = {given}, "
        f"but its {e.said_by} says {e.wnid}; {hint}")
