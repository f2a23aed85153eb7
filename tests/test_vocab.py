"""Vocabulary, prompt templates, and the WordNet taxonomy mapping (pipeline/vocab)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lt_distill.assets import asset_path
from lt_distill.errors import ConfigError
from lt_distill.pipeline.vocab import (
    TEMPLATE_SETS,
    HardLabeler,
    LabelSource,
    VocabularyError,
    WnidMapper,
    load_class_list,
    load_synset_wnids,
    load_vocabulary,
    resolve_templates,
)
from lt_distill.store import REASON_CODES, vocabulary_sha256

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lvis():
    return load_vocabulary("lvis-v1")


def test_lvis_v1_vocabulary(lvis):
    assert len(lvis) == 1203
    assert [c.id for c in lvis.categories] == list(range(1, 1204))
    freq = [c.frequency for c in lvis.categories]
    assert (freq.count("r"), freq.count("c"), freq.count("f")) == (337, 461, 405)
    assert lvis.categories[0].name == "aerosol_can" and lvis.categories[0].synset == "aerosol.n.02"
    assert lvis.sha256 == vocabulary_sha256(lvis.names)


def test_prompts_templates_and_synonyms(lvis):
    assert len(TEMPLATE_SETS["openai"]) == 80 and all("{}" in t for t in TEMPLATE_SETS["openai"])
    assert TEMPLATE_SETS["openai"][0] == "a bad photo of a {}."
    prompts = lvis.prompts(("a photo of a {}.",))
    assert prompts[0] == ["a photo of a aerosol can."]
    with_syn = lvis.prompts(("a {}",), synonyms=True)[0]
    assert with_syn == ["a aerosol can", "a spray can"]  # the synonym equal to the name is not repeated
    assert len(lvis.prompts(TEMPLATE_SETS["openai"])[5]) == 80


def test_resolve_templates():
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates("an image of a {}") == ("an image of a {}",)
    assert len(resolve_templates("simple")) == 7
    with pytest.raises(ConfigError, match="containing"):
        resolve_templates("no placeholder")


def test_vocabulary_from_annotation_json_and_list(tmp_path):
    cats = [{"id": 7, "name": "b_thing", "synset": "dog.n.01"}, {"id": 3, "name": "a_thing", "synonyms": ["x"]}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    (tmp_path / "list.json").write_text(json.dumps(cats))
    for name in ("ann.json", "list.json"):
        vocab = load_vocabulary(str(tmp_path / name))
        assert vocab.names == ["a_thing", "b_thing"]  # sorted by id
        assert vocab.categories[1].synset == "dog.n.01"
    (tmp_path / "dup.json").write_text(json.dumps(cats + [{"id": 3, "name": "c"}]))
    with pytest.raises(VocabularyError, match="duplicate"):
        load_vocabulary(str(tmp_path / "dup.json"))
    with pytest.raises(VocabularyError, match="neither a named vocabulary"):
        load_vocabulary(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabularyError, match="not valid JSON"):
        load_vocabulary(str(tmp_path / "bad.json"))


def test_wnid_mapping_on_real_lvis_synsets(lvis):
    table = load_synset_wnids()
    assert len(table) == 1202 and "stop_sign.n.01" not in table  # not in WordNet 3.0
    # Well-known ImageNet ids of LVIS classes.
    assert table["dog.n.01"] == "n02084071" and table["cat.n.01"] == "n02121620"
    assert table["banana.n.02"] == "n07753592" and table["zebra.n.01"] == "n02391049"
    mapper = WnidMapper(lvis)
    assert lvis.names[mapper("n02084071")] == "dog"
    assert lvis.names[mapper("n02391049")] == "zebra"
    assert mapper("n99999999") == -1
    # Every one of the 997 ImageNet-21k ids that Detic maps to LVIS (by synset) maps to a distinct class.
    imagenet_lvis = asset_path("imagenet_lvis_wnid.txt").read_text().split()
    classes = [mapper(w) for w in imagenet_lvis]
    assert len(imagenet_lvis) == 997 and min(classes) >= 0 and len(set(classes)) == 997


def test_class_list_imagenet21k_fall11():
    wnids = load_class_list("imagenet21k-fall11")
    assert len(wnids) == 21843 and wnids[0] == "n00004475"
    assert wnids.index("n02084071") == 2167


def test_class_list_file_errors(tmp_path):
    (tmp_path / "ok.txt").write_text("n02084071\nn02121620\n")
    assert load_class_list(str(tmp_path / "ok.txt")) == ["n02084071", "n02121620"]
    (tmp_path / "bad.txt").write_text("dog\n")
    with pytest.raises(VocabularyError, match="WordNet id"):
        load_class_list(str(tmp_path / "bad.txt"))
    with pytest.raises(VocabularyError, match="neither"):
        load_class_list(str(tmp_path / "none.txt"))


def test_hard_labeler_cls(lvis):
    class_list = ["n02084071", "n00004475", "n02391049"]  # dog, (entity: not in LVIS), zebra
    lab = HardLabeler(LabelSource.parse("cls"), WnidMapper(lvis), class_list)
    dog, zebra = lvis.names.index("dog"), lvis.names.index("zebra")
    assert lab({"cls": b"0"}) == (dog, 0)
    assert lab({"cls": b" 2\n"}) == (zebra, 0)
    assert lab({"cls": b"1"}) == (-1, 0)  # a valid class that no LVIS class has: no label, not a failure
    assert lab({"cls": b"3"}) == (-1, REASON_CODES["unknown_label"])
    assert lab({"cls": b"-1"}) == (-1, REASON_CODES["unknown_label"])
    assert lab({"cls": b"dog"}) == (-1, REASON_CODES["unparsable_label"])
    assert lab({"cls": b"\xff\xfe"}) == (-1, REASON_CODES["unparsable_label"])
    assert lab({"jpg": b""}) == (-1, REASON_CODES["missing_label"])


def test_hard_labeler_json_and_none(lvis):
    lab = HardLabeler(LabelSource.parse("json"), WnidMapper(lvis), ["n02391049"])
    dog, zebra = lvis.names.index("dog"), lvis.names.index("zebra")
    assert lab({"json": b'{"wnid": "n02084071"}'}) == (dog, 0)
    assert lab({"json": b'{"wnid": 0}'}) == (zebra, 0)  # an integer is a class-list index
    assert lab({"json": b'{"wnid": "dog"}'}) == (-1, REASON_CODES["unparsable_label"])
    assert lab({"json": b'{"label": 3}'}) == (-1, REASON_CODES["missing_label"])
    assert lab({"json": b"{oops"}) == (-1, REASON_CODES["unparsable_label"])
    assert lab({}) == (-1, REASON_CODES["missing_label"])
    other = HardLabeler(LabelSource.parse("json:synset_id"), WnidMapper(lvis), None)
    assert other({"json": b'{"synset_id": "n02391049"}'}) == (zebra, 0)
    none = HardLabeler(LabelSource.parse("none"), WnidMapper(lvis), None)
    assert none({}) == (-1, 0)
    for bad in ("label", "cls:x", "none:y"):
        with pytest.raises(ConfigError, match="--labels"):
            LabelSource.parse(bad)


def test_category_wnid_field_and_custom_table(tmp_path):
    cats = [{"id": 1, "name": "red_star", "wnid": "n90000001"}, {"id": 2, "name": "blue_ring", "synset": "ring.n.99"}]
    (tmp_path / "cats.json").write_text(json.dumps(cats))
    (tmp_path / "table.tsv").write_text("# comment\nring.n.99\tn90000002\n")
    vocab = load_vocabulary(str(tmp_path / "cats.json"))
    mapper = WnidMapper(vocab, load_synset_wnids(tmp_path / "table.tsv"))
    assert mapper("n90000001") == 0 and mapper("n90000002") == 1
    np.testing.assert_array_equal(mapper.map_class_list(["n90000002", "n1", "n90000001"]), [1, -1, 0])
    (tmp_path / "bad.tsv").write_text("ring.n.99 n90000002\n")
    with pytest.raises(VocabularyError, match="synset<TAB>"):
        load_synset_wnids(tmp_path / "bad.tsv")


@pytest.mark.skipif(not Path("/usr/share/wordnet/index.noun").is_file(), reason="WordNet 3.0 (wordnet-base) not installed")
def test_build_script_reproduces_shipped_table(tmp_path):
    out = tmp_path / "table.tsv"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_lvis_wnid.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_text() == asset_path("lvis_v1_synset_wnid.txt").read_text()
