"""`lt-distill demo`: the whole job end to end (reduced size), and the eval/report commands on its output."""

import json

import pytest

from lt_distill.cli import main
from lt_distill.errors import LtDistillError
from lt_distill.stages.demo.driver import _prepare_workdir, chance_detections
from lt_distill.store import verify_store


def _cli(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0, args


@pytest.mark.slow
def test_small_demo_end_to_end_beats_chance(tmp_path, capsys):
    work = tmp_path / "demo"
    _cli(["demo", "--small", "--workdir", str(work), "--threads", "1"])
    printed = capsys.readouterr().out
    assert "box AP (%)" in printed and "label store" in printed
    summary = json.loads((work / "summary.json").read_text())
    metrics, chance = summary["eval"]["metrics"], summary["eval"]["chance"]
    assert metrics["AP"] > 3 * chance["AP"] and metrics["AP50"] > 0.01, (metrics, chance)
    for key in ("APr", "APc", "APf"):
        assert metrics[key] >= 0  # every frequency group is present in the validation split
    assert summary["store"]["images"] == 32 and summary["store"]["objects"] > 0
    assert summary["store"]["bytes_per_image"] < 2048
    assert verify_store(work / "store.zarr") == []
    assert summary["train"]["images_per_s"] > 0
    assert {p.split("/")[-1] for p in summary["plots"]} == {"losses.png", "training.png", "ap_groups.png",
                                                            "label_store.png"}

    # The two ways of `lt-distill eval` agree with the demo (which called the same code).
    run = work / "run"
    _cli(["eval", "--checkpoint", str(run / "model_final.pt"), "--annotations", str(work / "data" / "val.json"),
          "--images", str(work / "data" / "val"), "--out", str(tmp_path / "dets.json"), "--json",
          str(tmp_path / "m1.json"), "--device", "cpu"])
    _cli(["eval", "--detections", str(tmp_path / "dets.json"), "--annotations", str(work / "data" / "val.json"),
          "--json", str(tmp_path / "m2.json")])
    m1, m2 = (json.loads((tmp_path / f"m{i}.json").read_text())["metrics"] for i in (1, 2))
    assert m1 == m2 == metrics

    _cli(["report", str(run), "--store", str(work / "store.zarr"), "--out", str(tmp_path / "plots")])
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "ap_groups.png", "label_store.png", "losses.png", "training.png"]


def test_demo_never_deletes_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LtDistillError, match="not a previous demo directory"):
        _prepare_workdir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    demo = tmp_path / "demo"
    _prepare_workdir(demo)
    (demo / "run").mkdir()
    _prepare_workdir(demo)  # a previous demo directory is recreated
    assert not (demo / "run").exists()


def test_chance_detections_cover_every_image():
    gt = {"images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 50, "height": 60}],
          "categories": [{"id": 3}, {"id": 7}]}
    dets = chance_detections(gt, 5)
    assert len(dets) == 10 and {d["category_id"] for d in dets} <= {3, 7}
    for d in dets:
        im = gt["images"][d["image_id"] - 1]
        x, y, w, h = d["bbox"]
        assert 0 <= x and x + w <= im["width"] + 1e-6 and 0 <= y and y + h <= im["height"] + 1e-6


@pytest.mark.slow
def test_small_demo_of_baseline_and_bacl_side_by_side_beats_chance(tmp_path, capsys):
    work = tmp_path / "demo"
    _cli(["demo", "--small", "--workdir", str(work), "--threads", "1", "--methods", "baseline,bacl"])
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["methods"]) == {"baseline", "bacl"}
    for name, result in summary["methods"].items():
        metrics, chance = result["eval"]["metrics"], result["eval"]["chance"]
        assert metrics["AP"] > 3 * chance["AP"] and metrics["AP50"] > 0.01, (name, metrics, chance)
    # BACL ran its two stages: the classifier stage started from the representation stage's model.
    config = json.loads((work / "run_bacl" / "config.json").read_text())
    assert config["method_options"]["stage"] == "classifier"
    assert config["finetune_from"].endswith("stage_representation/model_final.pt")
    assert config["data"]["cls_shards"] == "" and config["model"]["denoising"]["dn_number"] == 0
    baseline = json.loads((work / "run_baseline" / "config.json").read_text())
    assert baseline["model"]["head"]["semantic_branch"] is False
    table = json.loads((work / "compare" / "compare.json").read_text())
    assert set(table) == {"baseline", "bacl"}
    assert table["bacl"]["AP"] == summary["methods"]["bacl"]["eval"]["metrics"]["AP"]
    assert (work / "compare" / "compare.png").stat().st_size > 1000
    # `lt-distill report` on the two runs draws the same comparison.
    _cli(["report", str(work / "run_baseline"), str(work / "run_bacl"), "--out", str(tmp_path / "cmp")])
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == {
        "run_baseline": table["baseline"], "run_bacl": table["bacl"]}
