"""COCO evaluation: ground truth as predictions gives AP 1.0; results files reproduce pycocotools exactly."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
import torch
from conftest import BCCD

from kdctl.cli import main
from kdctl.data.coco import load_coco
from kdctl.engine.evaluate import METRIC_NAMES, coco_eval, detections_to_coco, evaluate_results_file
from kdctl.errors import KdctlError


def gt_as_results(coco: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco["annotations"]]


def test_ground_truth_as_predictions_gives_ap_1(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    metrics, per_class, _ = coco_eval(cd.pycocotools(), gt_as_results(cd.coco), cd.names, cd.cat_ids)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == 1.0 and metrics["AR100"] == 1.0
    assert per_class == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_a_wrong_prediction_lowers_ap(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    res = gt_as_results(cd.coco)
    res[0] = dict(res[0], category_id=2)  # one box with the wrong class
    metrics, per_class, _ = coco_eval(cd.pycocotools(), res, cd.names, cd.cat_ids)
    assert metrics["AP"] < 1.0 and per_class["cat"] < 1.0


def test_no_detections_scores_zero(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    metrics, per_class, _ = coco_eval(cd.pycocotools(), [], cd.names, cd.cat_ids)
    assert set(metrics) == set(METRIC_NAMES) and all(v == 0 for v in metrics.values())


def _noisy_results(coco: dict, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for a in coco["annotations"]:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            j = [rng.uniform(-0.2, 0.2) * s for s in (w, h, w, h)]
            out.append({"image_id": a["image_id"], "category_id": rng.choice([a["category_id"]] * 3 + [1, 2]),
                        "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                        "score": rng.random()})
    return out


def test_results_file_reproduces_pycocotools_exactly(tiny_coco, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    res = _noisy_results(cd.coco, 0)
    (tmp_path / "res.json").write_text(json.dumps(res))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tiny_coco / "val.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    ours = evaluate_results_file(tmp_path / "res.json", tiny_coco / "val.json")
    assert [ours.metrics[k] for k in METRIC_NAMES] == [float(v) for v in ev.stats]  # exact, not approx
    assert 0 < ours.metrics["AP"] < 1
    with pytest.raises(SystemExit) as e:
        main(["eval", "--predictions", str(tmp_path / "res.json"), "--annotations", str(tiny_coco / "val.json"),
              "--json", str(tmp_path / "m.json")])
    assert e.value.code in (0, None)
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["metrics"] == ours.metrics and "AP50" in capsys.readouterr().out


def test_results_file_errors(tiny_coco, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                  "score": 1}]))
    with pytest.raises(KdctlError, match="image ids are not in"):
        evaluate_results_file(tmp_path / "r.json", tiny_coco / "val.json")
    (tmp_path / "r.json").write_text(json.dumps({"oops": 1}))
    with pytest.raises(KdctlError, match="not a COCO results list"):
        evaluate_results_file(tmp_path / "r.json", tiny_coco / "val.json")
    with pytest.raises(KdctlError, match="does not exist"):
        evaluate_results_file(tmp_path / "nope.json", tiny_coco / "val.json")


def test_detections_to_coco_converts_to_xywh_and_category_ids():
    dets = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]),
             "labels": torch.tensor([1])}]
    out = detections_to_coco(dets, [7], cat_ids=[3, 9])
    assert out == [{"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]


@pytest.mark.slow
def test_bccd_ground_truth_scores_1():
    cd = load_coco(BCCD / "val.json", BCCD / "images")
    metrics, _, _ = coco_eval(cd.pycocotools(), gt_as_results(cd.coco), cd.names, cd.cat_ids)
    assert metrics["AP"] == pytest.approx(1.0)
