"""pipeline.evaluate and `lt-distill eval`: parity with calling lvis-api / pycocotools directly."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from lt_distill.cli import main
from lt_distill.pipeline import evaluate as ev


def _dataset(rng, num_images=12, num_cats=6, lvis=True):
    """Ground truth with a few boxes per image and noisy detections (some wrong classes, some misses)."""
    cats = [{"id": 10 + i, "name": f"c{i}", "frequency": "rcf"[i % 3], "image_count": 1} for i in range(num_cats)]
    images, anns, dets = [], [], []
    for i in range(num_images):
        image = {"id": 100 + i, "width": 320, "height": 240, "file_name": f"{i}.jpg"}
        present = set()
        for _ in range(rng.integers(1, 4)):
            w, h = rng.uniform(8, 150), rng.uniform(8, 120)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            c = int(rng.integers(num_cats)) + 10
            present.add(c)
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(0, 3)):
                label = c if rng.random() < 0.7 else int(rng.integers(num_cats)) + 10
                dets.append({"image_id": image["id"], "category_id": label, "score": float(rng.random()),
                             "bbox": [x + rng.normal(0, 6), y + rng.normal(0, 6), w * rng.uniform(0.8, 1.2), h]})
        if lvis:
            absent = sorted({c["id"] for c in cats} - present)
            image["neg_category_ids"] = absent[: len(absent) // 2]
            image["not_exhaustive_category_ids"] = absent[len(absent) // 2:][:1]
        images.append(image)
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _write(tmp_path, gt, dets):
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    return gt_path, dt_path


def _official_lvis(gt_path, dt_path, monkeypatch):
    from lvis import LVIS, LVISEval, LVISResults

    monkeypatch.setattr(np, "float", float, raising=False)  # what a user of lvis 0.5.3 has to do by hand
    gt = LVIS(str(gt_path))
    evaluator = LVISEval(gt, LVISResults(gt, str(dt_path)), "bbox")
    evaluator.run()
    return dict(evaluator.get_results())


def _official_coco(gt_path, dt_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(dt_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_lvis_cli_equals_official_lvis_api(tmp_path, rng, monkeypatch):
    gt, dets = _dataset(rng)
    gt_path, dt_path = _write(tmp_path, gt, dets)
    out = tmp_path / "metrics.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--detections", str(dt_path), "--annotations", str(gt_path), "--json", str(out)])
    assert exit_info.value.code == 0
    ours = json.loads(out.read_text())
    assert ours["format"] == "lvis"
    assert not hasattr(np, "float")  # evaluating did not patch NumPy
    official = _official_lvis(gt_path, dt_path, monkeypatch)
    for key in ev.LVIS_KEYS:
        assert ours["metrics"][key] == official[key], key
    assert 0 < ours["metrics"]["AP"] < 1


def test_coco_equals_official_pycocotools(tmp_path, rng):
    gt, dets = _dataset(rng, lvis=False)
    gt_path, dt_path = _write(tmp_path, gt, dets)
    assert ev.annotation_format(gt) == "coco"
    ours = ev.evaluate_detections(gt_path, dt_path)
    official = _official_coco(gt_path, dt_path)
    assert [ours[k] for k in ev.COCO_KEYS] == [float(v) for v in official]
    assert json.loads(dt_path.read_text()) == dets  # inputs untouched


def test_lvis_compat_does_not_touch_numpy_or_lvis():
    import lvis.eval

    assert not hasattr(np, "float")
    assert lvis.eval.np is np
    assert ev.LVISEvalCompat.accumulate is not lvis.eval.LVISEval.accumulate
    assert ev.LVISEvalCompat.accumulate.__globals__["np"].float is float
    assert ev.LVISEvalCompat.accumulate.__globals__["np"].cumsum is np.cumsum


def test_lvis_keeps_300_best_per_image(rng):
    gt, _ = _dataset(rng, num_images=2)
    image = gt["images"][0]["id"]
    ann = next(a for a in gt["annotations"] if a["image_id"] == image)
    good = {"image_id": image, "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.5}
    junk = [{"image_id": image, "category_id": ann["category_id"], "bbox": [0, 0, 2, 2], "score": 0.6}
            for _ in range(300)]
    # The perfect box ranks 301st: it is cut, so this category's AP is 0 ...
    cut = ev.evaluate_detections(gt, junk + [good])
    kept = ev.evaluate_detections(gt, junk[:299] + [good])  # ... and 300th: it counts.
    assert kept["AR@300"] > cut["AR@300"]


def test_rank_files_merge_to_the_single_process_result(tmp_path, rng):
    gt, dets = _dataset(rng)
    shards = [dets[r::3] for r in range(3)]
    for r, part in enumerate(shards):
        ev.write_rank_detections(part, tmp_path, r)
    merged = ev.merge_rank_detections(tmp_path, 3)
    assert sorted(map(json.dumps, merged)) == sorted(map(json.dumps, dets))
    assert not list(tmp_path.glob("detections.rank*"))
    assert ev.evaluate_detections(gt, merged) == ev.evaluate_detections(gt, dets)
    with pytest.raises(ev.EvaluationError, match="missing"):
        ev.merge_rank_detections(tmp_path, 2)


def test_predictions_to_detections_threshold_topk_and_xywh():
    pred = {"scores": torch.tensor([0.9, 5e-5, 0.3, 0.5]), "labels": torch.tensor([0, 1, 2, 1]),
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]] * 4)}
    dets = ev.predictions_to_detections([7], [pred], category_ids=[3, 5, 9], max_dets=2)
    assert [d["score"] for d in dets] == [0.9, 0.5]  # below 1e-4 dropped, best 2 kept, sorted
    assert [d["category_id"] for d in dets] == [3, 5]
    assert dets[0]["bbox"] == [10.0, 20.0, 20.0, 40.0] and dets[0]["image_id"] == 7


def test_bad_detections_are_clear_errors(tmp_path, rng):
    gt, dets = _dataset(rng)
    with pytest.raises(ev.EvaluationError, match="image_id 999"):
        ev.evaluate_detections(gt, [dict(dets[0], image_id=999)])
    with pytest.raises(ev.EvaluationError, match="category_id"):
        ev.evaluate_detections(gt, [dict(dets[0], category_id=1)])
    with pytest.raises(ev.EvaluationError, match="not found"):
        ev.evaluate_detections(tmp_path / "nope.json", dets)
    with pytest.warns(UserWarning, match="no detections"):
        assert ev.evaluate_detections(gt, [])["AP"] == 0.0


def test_eval_cli_errors_are_one_line(tmp_path, rng, capsys):
    gt, dets = _dataset(rng)
    gt_path, dt_path = _write(tmp_path, gt, dets)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--annotations", str(gt_path)])
    assert exit_info.value.code == 2
    assert "exactly one of --detections" in capsys.readouterr().err
