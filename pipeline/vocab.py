"""Target vocabulary (LVIS categories), CLIP prompt templates, and the WordNet taxonomy mapping.

* :func:`load_vocabulary` reads the classes the teacher scores: ``"lvis-v1"`` (the shipped LVIS v1
  category list, the default), an LVIS annotation JSON, or a categories JSON (a list of
  ``{id, name, synonyms?, synset?, frequency?, image_count?}``). Classes are ordered by id; class
  ``i`` of every label is ``vocabulary.categories[i]``.
* :func:`resolve_templates` gives the prompt templates: CLIP's 80 ImageNet templates (``"openai"``),
  open_clip's 7 simple ones (``"simple"``), ``"single"`` (``"a photo of a {}."``) or one literal
  template containing ``{}``.
* :class:`HardLabeler` turns a classification sample's source label (a WordNet id, given as an index
  into a class list in ``.cls`` or as a field of ``.json``) into the LVIS class whose synset has that
  WordNet id (RichSem Eq. 6), or -1. The synset -> WordNet id table ships with the package
  (``assets/lvis_v1_synset_wnid.txt``, built from WordNet 3.0 by ``scripts/build_lvis_wnid.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..assets import asset_path
from ..errors import ConfigError, LtDistillError
from ..store import REASON_CODES, vocabulary_sha256

NAMED_VOCABULARIES = {"lvis-v1": "lvis_v1_train_cat_info.json"}

TEMPLATE_SET_NAMES = ("openai", "simple", "single")


@functools.cache
def template_sets() -> dict[str, tuple[str, ...]]:
    """The named template sets. open_clip keeps the templates as lambdas; as format strings they can be
    stored and hashed. Read on first use: importing open_clip costs seconds, and the training data
    pipeline imports this module without needing any template."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {
        "openai": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),  # CLIP's 80 ImageNet templates
        "simple": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
        "single": ("a photo of a {}.",),
    }


def __getattr__(name: str) -> Any:
    # ``TEMPLATE_SETS`` stays importable as a module constant, built on first access (PEP 562).
    if name == "TEMPLATE_SETS":
        return template_sets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# ---------------------------------------------------------------------------------------------------- class lists
@dataclasses.dataclass(frozen=True)
class ClassListInfo:
    """A named ``.cls`` index space: line i of timm's ``timm/data/_info/<timm_file>`` is class index i.
    ``sha256`` is :func:`class_list_sha256` of the ordered wnids (what a label store records)."""

    name: str
    timm_file: str
    size: int
    sha256: str
    source: str


# The index spaces in use. They are read from timm at run time (timm is a dependency of open_clip and of
# lt-distill); the sizes and hashes pin the content, so a timm release that changed a list is refused
# instead of silently relabelling. assets/README.md documents the same table (a test keeps them equal).
CLASS_LISTS: dict[str, ClassListInfo] = {c.name: c for c in (
    ClassListInfo("imagenet21k-fall11", "imagenet21k_goog_synsets.txt", 21843,
                  "c03345e3490e010defaeac86b00012db28ecb79af13daba0b72525fa37c66e94",
                  "Google's fall-11 ImageNet-21k release, sorted wnids (BiT / ViT 'in21k' checkpoints; "
                  "timm's imagenet21k_goog)"),
    ClassListInfo("imagenet21k-winter21", "imagenet22k_synsets.txt", 21841,
                  "6320b72b72e43c09a768f0253d28c3b55707760bbf3b9d308887800b0d86658d",
                  "the official winter-21 ImageNet-21k release (image-net.org), sorted wnids: fall-11 without "
                  "n03931044 and n09859684 (timm's imagenet22k)"),
    ClassListInfo("imagenet22k-ms", "imagenet22k_ms_synsets.txt", 21842,
                  "57d68b4f40ef1181c022b488650d3fcb08ab4a95dc7d75d286fff16922ee6c2d",
                  "Microsoft's 22k ordering (Swin, BEiT): the 1,000 ImageNet-1k classes first, then the rest "
                  "of winter-21 (which lacks one ImageNet-1k class, n04399382)"),
    ClassListInfo("imagenet21k-p-fall11", "imagenet21k_miil_synsets.txt", 11221,
                  "e96927e3af1cf32cd60c35b4407ba6e16396a2696feefed66c4017b403c5596a",
                  "ImageNet-21K-P (Alibaba MIIL) processed from fall-11"),
    ClassListInfo("imagenet21k-p-winter21", "imagenet21k_miil_w21_synsets.txt", 10450,
                  "68202583aa200623fa7f326a1a4f8ff8f9a2e33ee8cd78ae16d52fb34e345dd4",
                  "ImageNet-21K-P (Alibaba MIIL) processed from winter-21"),
    ClassListInfo("imagenet12k", "imagenet12k_synsets.txt", 11821,
                  "009d4c9f19667ccf35878fb10718a90ccc9afe27004b4d42880d5feab073a3b1",
                  "timm's ImageNet-12k subset of winter-21"),
    ClassListInfo("imagenet1k", "imagenet_synsets.txt", 1000,
                  "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd",
                  "ImageNet-1k (ILSVRC-2012), sorted wnids"),
)}

# Names that more than one index space goes by; each is refused with the unambiguous choices.
AMBIGUOUS_CLASS_LISTS = {
    "imagenet21k": ("imagenet21k-fall11", "imagenet21k-winter21", "imagenet22k-ms"),
    "imagenet22k": ("imagenet21k-winter21", "imagenet22k-ms", "imagenet21k-fall11"),
    "in21k": ("imagenet21k-fall11", "imagenet21k-winter21", "imagenet22k-ms"),
    "in22k": ("imagenet21k-winter21", "imagenet22k-ms", "imagenet21k-fall11"),
    "imagenet21k-p": ("imagenet21k-p-fall11", "imagenet21k-p-winter21"),
}

WNID_RE = re.compile(r"^n\d{8}$")


class VocabularyError(LtDistillError):
    """A vocabulary, class list or label specification cannot be used."""


@dataclasses.dataclass(frozen=True)
class Category:
    """One target class. ``name`` is the LVIS-style name (underscores for spaces)."""

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    synset: str | None = None
    frequency: str | None = None  # LVIS r / c / f
    image_count: int | None = None
    wnid: str | None = None  # WordNet id given directly (else looked up from the synset)

    @property
    def text(self) -> str:
        """The name as prompt text: underscores become spaces."""
        return name_to_text(self.name)


def name_to_text(name: str) -> str:
    return name.replace("_", " ").strip()


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The ordered target classes; ``source`` says where they came from."""

    source: str
    categories: tuple[Category, ...]

    def __len__(self) -> int:
        return len(self.categories)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def sha256(self) -> str:
        """SHA-256 of the ordered names (what the label store records and checks)."""
        return vocabulary_sha256(self.names)

    def prompts(self, templates: tuple[str, ...], synonyms: bool = False) -> list[list[str]]:
        """Per class, every prompt: each template filled with the name (and, with ``synonyms``, with
        every distinct synonym too). The class text embedding is the normalised mean over its prompts."""
        out = []
        for cat in self.categories:
            texts = [cat.text]
            if synonyms:
                texts += [name_to_text(s) for s in cat.synonyms if name_to_text(s) not in texts]
            out.append([t.format(text) for text in texts for t in templates])
        return out


def _category_from_dict(raw: dict[str, Any], where: str) -> Category:
    if not isinstance(raw, dict) or "id" not in raw or "name" not in raw:
        raise VocabularyError(f"{where}: every category needs 'id' and 'name', got {str(raw)[:80]}")
    synonyms = raw.get("synonyms") or []
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise VocabularyError(f"{where}: category {raw['id']}: 'synonyms' must be a list of strings")
    return Category(
        id=int(raw["id"]),
        name=str(raw["name"]),
        synonyms=tuple(synonyms),
        synset=raw.get("synset"),
        frequency=raw.get("frequency"),
        image_count=raw.get("image_count"),
        wnid=raw.get("wnid"),
    )


def imagenet1k_vocabulary() -> Vocabulary:
    """ImageNet-1k (the label space of classifier teachers) from timm's class info: class i = output i,
    named by its first lemma (with the WordNet id where two classes share it: crane, maillot), the other
    lemmas as synonyms, ``wnid`` set (so :class:`WnidMapper` maps it onto other vocabularies)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    lemmas = [[w.strip().replace(" ", "_") for w in info.index_to_description(i).split(",")]
              for i in range(info.num_classes())]
    firsts = collections.Counter(words[0] for words in lemmas)
    cats = []
    for i, words in enumerate(lemmas):
        wnid = info.index_to_label_name(i)
        name = words[0] if firsts[words[0]] == 1 else f"{words[0]}_{wnid}"
        cats.append(Category(id=i, name=name, synonyms=tuple(words[1:]), wnid=wnid))
    return Vocabulary(source="imagenet-1k", categories=tuple(cats))


def load_vocabulary(spec: str = "lvis-v1") -> Vocabulary:
    """A named vocabulary (``lvis-v1``, ``imagenet-1k``), an LVIS/COCO annotation JSON (its ``categories``),
    or a JSON list of categories. Classes are sorted by id; ids and names must be unique."""
    if spec == "imagenet-1k":
        return imagenet1k_vocabulary()
    if spec in NAMED_VOCABULARIES:
        path = asset_path(NAMED_VOCABULARIES[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            named = ", ".join([*NAMED_VOCABULARIES, "imagenet-1k"])
            raise VocabularyError(f"vocabulary {spec!r} is neither a named vocabulary ({named}) nor a file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"vocabulary file {path} is not valid JSON: {exc}") from exc
    raw = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise VocabularyError(f"vocabulary file {path} has no category list (a list, or a dict with 'categories')")
    cats = sorted((_category_from_dict(c, str(path)) for c in raw), key=lambda c: c.id)
    for field in ("id", "name"):
        values = [getattr(c, field) for c in cats]
        if len(set(values)) != len(values):
            raise VocabularyError(f"vocabulary file {path}: duplicate category {field}s")
    return Vocabulary(source=spec, categories=tuple(cats))


def resolve_templates(spec: str = "openai") -> tuple[str, ...]:
    """A named template set (``openai`` 80, ``simple`` 7, ``single`` 1) or one literal template with ``{}``."""
    if spec in TEMPLATE_SET_NAMES:
        return template_sets()[spec]
    if "{}" not in spec:
        raise ConfigError(
            f"prompt templates {spec!r}: use {', '.join(TEMPLATE_SET_NAMES)} or a template containing '{{}}'")
    return (spec,)


# ---------------------------------------------------------------------------------------------------- taxonomy
def load_synset_wnids(path: str | Path | None = None) -> dict[str, str]:
    """Synset name (``aerosol.n.02``) -> WordNet 3.0 id (``n02682922``), from the shipped table."""
    path = Path(path) if path is not None else asset_path("lvis_v1_synset_wnid.txt")
    if not path.is_file():
        raise VocabularyError(f"synset -> wnid table not found: {path}")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not WNID_RE.match(parts[1].strip()):
            raise VocabularyError(f"{path}:{number}: expected 'synset<TAB>n########', got {line[:60]!r}")
        table[parts[0].strip()] = parts[1].strip()
    return table


def timm_info_dir() -> Path:
    """timm's ``data/_info`` folder, found without importing timm (which would import torchvision models)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        raise VocabularyError("named class lists are read from timm, which is not installed (pip install timm)")
    return Path(spec.origin).parent / "data" / "_info"


def _read_wnids(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"class list {what}: cannot read {path}: {exc}") from exc
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [w for w in wnids if not WNID_RE.match(w)]
    if bad or not wnids:
        raise VocabularyError(f"class list {what}: expected one WordNet id (n########) per line, got {bad[:3]}")
    return wnids


def load_class_list(spec: str) -> list[str]:
    """WordNet ids, one per class index: a named list (:data:`CLASS_LISTS`, read from timm and checked
    against its documented size and SHA-256) or a file with one wnid a line. An ambiguous name
    (``imagenet21k``) is refused with the unambiguous choices."""
    if spec in AMBIGUOUS_CLASS_LISTS:
        choices = ", ".join(f"{n} ({CLASS_LISTS[n].size:,})" for n in AMBIGUOUS_CLASS_LISTS[spec])
        raise VocabularyError(f"class list {spec!r} is ambiguous (several index spaces go by that name, and "
                              f"a wrong one shifts every label): use one of {choices}, or a file")
    if spec in CLASS_LISTS:
        info = CLASS_LISTS[spec]
        wnids = _read_wnids(timm_info_dir() / info.timm_file, spec)
        if len(wnids) != info.size or class_list_sha256(wnids) != info.sha256:
            raise VocabularyError(f"class list {spec}: timm's {info.timm_file} has {len(wnids)} wnids with SHA-256 "
                                  f"{class_list_sha256(wnids)[:12]}, expected {info.size} and {info.sha256[:12]}; "
                                  "pass the list as a file instead")
        return wnids
    path = Path(spec)
    if not spec or not path.is_file():
        raise VocabularyError(
            f"class list {spec!r} is neither a named list ({', '.join(CLASS_LISTS)}) nor a file")
    return _read_wnids(path, spec)


def class_list_sha256(wnids: list[str]) -> str:
    """SHA-256 of the ordered wnids joined by newlines (no trailing newline)."""
    return hashlib.sha256("\n".join(wnids).encode()).hexdigest()


class WnidMapper:
    """Maps WordNet ids to vocabulary indices (-1 when no class has it). A category's WordNet id is its
    ``wnid`` field when it has one, else its synset's entry in ``synset_wnids`` (default: the shipped
    LVIS table, :func:`load_synset_wnids`)."""

    def __init__(self, vocabulary: Vocabulary, synset_wnids: dict[str, str] | None = None) -> None:
        table = load_synset_wnids() if synset_wnids is None else synset_wnids
        self.wnid_to_class: dict[str, int] = {}
        for i, cat in enumerate(vocabulary.categories):
            wnid = cat.wnid or (table.get(cat.synset) if cat.synset else None)
            if wnid is not None:
                self.wnid_to_class.setdefault(wnid, i)

    def __call__(self, wnid: str) -> int:
        return self.wnid_to_class.get(wnid, -1)

    def map_class_list(self, wnids: list[str]) -> np.ndarray:
        """(len(wnids),) int32: vocabulary index of each class-list entry, -1 where unmapped."""
        return np.array([self(w) for w in wnids], dtype=np.int32)


# ---------------------------------------------------------------------------------------------------- hard labels
LABEL_KINDS = ("cls", "json", "none")


@dataclasses.dataclass(frozen=True)
class LabelSource:
    """Where a classification sample's label is: ``cls`` (an integer index into the class list in the
    ``.cls`` member), ``json`` (field ``field`` of the ``.json`` member: a wnid string or a class-list
    index), or ``none`` (no source label; the hard label is the teacher's confident argmax, Eq. 7)."""

    kind: str = "cls"
    field: str = "wnid"

    @classmethod
    def parse(cls, spec: str) -> "LabelSource":
        """``"cls"``, ``"none"``, ``"json"`` (field ``wnid``) or ``"json:FIELD"``."""
        kind, _, field = spec.partition(":")
        if kind not in LABEL_KINDS or (field and kind != "json"):
            raise ConfigError(f"--labels {spec!r}: use cls, none, json or json:FIELD")
        return cls(kind, field or "wnid")

    @property
    def spec(self) -> str:
        return f"json:{self.field}" if self.kind == "json" else self.kind


def label_class_list(source: LabelSource, spec: str) -> list[str] | None:
    """The class list that ``source``'s integer labels index, or None when none is needed. ``cls`` labels
    need one named explicitly: there is no default, because a wrong list shifts every label silently."""
    if source.kind == "none" or (source.kind == "json" and not spec):
        return None
    if not spec:
        names = ", ".join(CLASS_LISTS)
        raise ConfigError(f"--labels cls needs --class-list, the index space of the .cls numbers: one of {names}, "
                          "or a file with one wnid a line")
    return load_class_list(spec)


class HardLabeler:
    """Source label of one sample -> (vocabulary index or -1, failure reason code or 0).

    Reasons: ``missing_label`` (the member is absent), ``unparsable_label`` (not an integer / not a wnid),
    ``unknown_label`` (an index outside the class list). A valid wnid that no class has maps to -1 and is
    not a failure. With ``kind == "none"`` every sample gets (-1, 0): the job fills in pseudo labels."""

    def __init__(self, source: LabelSource, mapper: WnidMapper, class_list: list[str] | None) -> None:
        self.source = source
        self.mapper = mapper
        self.class_list = class_list
        self._index_map = mapper.map_class_list(class_list) if class_list is not None else None

    def _from_index(self, value: int) -> tuple[int, int]:
        if self._index_map is None:
            return -1, REASON_CODES["unparsable_label"]
        if not 0 <= value < len(self._index_map):
            return -1, REASON_CODES["unknown_label"]
        return int(self._index_map[value]), 0

    def __call__(self, sample: dict[str, bytes]) -> tuple[int, int]:
        kind = self.source.kind
        if kind == "none":
            return -1, 0
        raw = sample.get(kind)
        if raw is None:
            return -1, REASON_CODES["missing_label"]
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return -1, REASON_CODES["unparsable_label"]
        if kind == "cls":
            if not re.fullmatch(r"[+-]?\d+", text):
                return -1, REASON_CODES["unparsable_label"]
            return self._from_index(int(text))
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return -1, REASON_CODES["unparsable_label"]
        if not isinstance(data, dict) or self.source.field not in data:
            return -1, REASON_CODES["missing_label"]
        value = data[self.source.field]
        if isinstance(value, bool):
            return -1, REASON_CODES["unparsable_label"]
        if isinstance(value, int):
            return self._from_index(value)
        if isinstance(value, str) and WNID_RE.match(value.strip()):
            return self.mapper(value.strip()), 0
        return -1, REASON_CODES["unparsable_label"]
