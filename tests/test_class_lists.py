"""Named class lists (sizes, hashes, documentation, ambiguity) and the class-list check before labelling."""

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from lt_distill.assets import ASSETS_DIR
from lt_distill.errors import ConfigError
from lt_distill.pipeline.labelcheck import check_class_list
from lt_distill.pipeline.teacher import TeacherConfig
from lt_distill.pipeline.vocab import (
    CLASS_LISTS,
    LabelSource,
    VocabularyError,
    class_list_sha256,
    label_class_list,
    load_class_list,
    timm_info_dir,
)
from lt_distill.stages import precompute as precompute_stage
from lt_distill.stages.precompute import PrecomputeConfig, run_precompute

sys.path.insert(0, str(Path(__file__).parent))
from precompute_helpers import jpeg, photo, write_tar  # noqa: E402

DOCUMENTED = {  # name: size, as the issue gives them
    "imagenet21k-fall11": 21843, "imagenet21k-winter21": 21841, "imagenet22k-ms": 21842,
    "imagenet21k-p-fall11": 11221, "imagenet21k-p-winter21": 10450, "imagenet12k": 11821, "imagenet1k": 1000,
}


@pytest.mark.parametrize("name", sorted(CLASS_LISTS))
def test_named_lists_have_their_documented_size_and_hash(name):
    info = CLASS_LISTS[name]
    wnids = load_class_list(name)
    assert len(wnids) == info.size == DOCUMENTED[name] and len(set(wnids)) == len(wnids)
    raw = [w.strip() for w in (timm_info_dir() / info.timm_file).read_text().splitlines() if w.strip()]
    assert wnids == raw
    digest = hashlib.sha256("\n".join(raw).encode()).hexdigest()
    assert class_list_sha256(wnids) == digest == info.sha256
    # the documentation table in assets/README.md names the same size and hash
    row = next(line for line in (ASSETS_DIR / "README.md").read_text().splitlines() if line.startswith(f"| `{name}`"))
    assert f"{info.size:,}" in row and digest in row and info.timm_file in row


def test_the_two_21k_releases_differ_by_two_wnids():
    fall, winter = load_class_list("imagenet21k-fall11"), load_class_list("imagenet21k-winter21")
    assert set(fall) - set(winter) == {"n03931044", "n09859684"} and set(winter) <= set(fall)
    ms = load_class_list("imagenet22k-ms")
    assert ms[:1000] == load_class_list("imagenet1k")  # Microsoft's order puts ImageNet-1k first


@pytest.mark.parametrize("name", ["imagenet21k", "imagenet22k", "in21k", "imagenet21k-p"])
def test_ambiguous_names_are_refused_with_the_choices(name):
    with pytest.raises(VocabularyError, match="ambiguous") as err:
        load_class_list(name)
    assert "imagenet21k-fall11" in str(err.value) or "imagenet21k-p-fall11" in str(err.value)


def test_cls_labels_need_an_explicit_list():
    with pytest.raises(ConfigError, match="--labels cls needs --class-list"):
        label_class_list(LabelSource.parse("cls"), "")
    assert label_class_list(LabelSource.parse("json"), "") is None  # wnid strings need no list
    assert label_class_list(LabelSource.parse("none"), "imagenet21k") is None


def _in21k_shard(path: Path, wnids: list[str], classes: list[str], json_wnid: bool = False) -> None:
    """ImageNet-style samples: key ``<wnid>_<n>``, ``.cls`` = the wnid's index in ``classes``."""
    members = []
    image = jpeg(photo("coffee")[:64, :64])
    for n, wnid in enumerate(wnids):
        key = f"{wnid}_{1000 + n}" if not json_wnid else f"img{n:04d}"
        members += [(f"{key}.jpg", image), (f"{key}.cls", str(classes.index(wnid)).encode())]
        if json_wnid:
            members.append((f"{key}.json", json.dumps({"wnid": wnid}).encode()))
    write_tar(path, members)


def test_check_names_the_rate_an_example_and_the_list_that_agrees(tmp_path):
    winter = load_class_list("imagenet21k-winter21")
    fall = load_class_list("imagenet21k-fall11")
    # wnids on both sides of the first difference: those before it agree under both lists
    first_diff = fall.index("n03931044")
    picks = [winter[10], winter[5000], winter[first_diff + 5], winter[20000]]
    _in21k_shard(tmp_path / "a.tar", picks, winter)
    _in21k_shard(tmp_path / "b.tar", picks, winter, json_wnid=True)
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert check_class_list(urls, LabelSource.parse("cls"), "imagenet21k-winter21", winter) == {
        "checked": 8, "disagree": 0}
    with pytest.raises(VocabularyError) as err:
        check_class_list(urls, LabelSource.parse("cls"), "imagenet21k-fall11", fall)
    msg = str(err.value)
    assert "\n" not in msg and "class list imagenet21k-fall11" in msg
    assert "on 4 of 8 checked samples (50.0%)" in msg
    assert f"index {winter.index(picks[2])} = {fall[winter.index(picks[2])]}" in msg and f"says {picks[2]}" in msg
    assert "--class-list imagenet21k-winter21" in msg
    # only the first N samples of each shard are read
    assert check_class_list(urls, LabelSource.parse("cls"), "imagenet21k-fall11", fall, samples_per_shard=2)[
        "checked"] == 4


def test_precompute_refuses_the_wrong_list_before_building_the_teacher(tmp_path, monkeypatch, capsys):
    winter = load_class_list("imagenet21k-winter21")
    picks = [winter[i] for i in (3, 9000, 15000, 21000)]
    _in21k_shard(tmp_path / "in21k-0.tar", picks, winter)

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher was built although the class list is wrong")

    monkeypatch.setattr(precompute_stage, "build_teacher", no_teacher)
    cfg = PrecomputeConfig(store=str(tmp_path / "store"), shards=str(tmp_path / "in21k-0.tar"),
                           class_list="imagenet21k-fall11", progress=False,
                           teacher=TeacherConfig(model="lt-tiny-rn", random_init=True, templates="single"))
    with pytest.raises(VocabularyError, match=r"2 of 4 .*--class-list imagenet21k-winter21"):
        run_precompute(cfg, log=lambda _m: None)
    assert not (tmp_path / "store").exists()
    # the CLI prints it as one error line
    from lt_distill.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["precompute", "--store", str(tmp_path / "store"), "--shards", str(tmp_path / "in21k-0.tar"),
              "--model", "lt-tiny-rn", "--random-init", "--class-list", "imagenet21k-fall11", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert re.match(r"error: class list imagenet21k-fall11 disagrees", err)
