"""pred-kd (prediction distillation across families) and method combinations: the soft-target forms, the teacher's
detection selection, zero at a perfect match through each student's own assigner, gradients, method choice."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import tomllib
import torch
import transformers
from batches import save_tiny_detr

from kdctl.data.batch import collate
from kdctl.distill.base import choose_method, distiller_class
from kdctl.distill.pred_kd import PredKD, select_detections, student_labels
from kdctl.distill.pred_kd_losses import (
    dense_assignment,
    dense_terms,
    detr_matcher,
    detr_terms,
    quality_focal,
    roi_terms,
    soft_label_kl,
    torchvision_targets,
)
from kdctl.engine.config import RunConfig
from kdctl.engine.objective import Objective
from kdctl.engine.trainer import Trainer
from kdctl.errors import KdctlError
from kdctl.models.registry import methods_for_family
from kdctl.specs import load_detector

NAMES = ["cat", "dog"]
TOL = 1e-6  # float32 terms at an exact match: rounding of logit(s) / box encodings, far below any real error


def tiny_detr(directory, names=NAMES, seed=0):
    """A tiny DETR (softmax head) saved with save_pretrained."""
    return save_tiny_detr(directory, names, widths=(8, 16, 32, 64), decoder_layers=2, ffn=32, num_queries=10,
                          seed=seed, backbone={"layer_type": "basic"})


def cnn(spec, names=NAMES):
    return load_detector(spec, label_names=names, pretrained_backbone=False)


def make_batch():
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, (h, w) in enumerate([(64, 96), (48, 64)]):
        target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 44.0]])[: 1 + i],
                  "labels": torch.tensor([0, 1])[: 1 + i], "image_id": i, "orig_size": (h, w)}
        samples.append((torch.rand(3, h, w, generator=g), target))
    return collate(samples)


# --------------------------------------------------------------------------- soft-target forms
def test_soft_target_forms_zero_at_match_positive_otherwise():
    s = torch.tensor([0.8, 0.35])
    y = torch.zeros(2, 4)
    y[0, 1], y[1, 3] = s
    logits = torch.where(y > 0, torch.logit(y.clamp_min(1e-6)), torch.full_like(y, -30.0))
    assert quality_focal(logits, y).max() < TOL
    assert (quality_focal(logits + 0.3, y) > 1e-4).all() and (quality_focal(logits - 0.3, y) > 1e-4).all()
    dist = torch.tensor([[0.8, 0.0, 0.2], [0.0, 0.35, 0.65]])  # s on the class, 1 - s on background
    exact = torch.log(dist.clamp_min(1e-30))
    assert soft_label_kl(exact, dist).abs().max() < TOL
    assert (soft_label_kl(exact + torch.tensor([0.5, 0.5, 0.0]), dist) > 1e-3).all()


# --------------------------------------------------------------------------- teacher side
def test_selection_threshold_nms_and_label_mapping():
    dets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60],
                                    [20, 20, 30, 30]]),
             "scores": torch.tensor([0.9, 0.8, 0.7, 0.2, 0.6]), "labels": torch.tensor([0, 0, 1, 0, 2])}]
    to_student = torch.tensor([1, 0, -1])  # teacher class 2 is missing in the student
    out = select_detections(dets, to_student, score_threshold=0.3, nms_iou=0.5, max_detections=10)[0]
    # 0.8 is suppressed by the same-class 0.9, 0.7 survives (other class), 0.2 is below the threshold, class 2 dropped
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [1, 0]
    nothing = select_detections(dets, to_student, score_threshold=0.95, nms_iou=0.5, max_detections=10)[0]
    assert nothing["boxes"].shape == (0, 4)


def test_labels_map_by_name_and_drop_what_the_student_lacks():
    teacher = SimpleNamespace(dataset_names=None, label_names=["Dog", "bird", "cat"])
    student = SimpleNamespace(dataset_names=None, label_names=["cat", "dog"])
    assert student_labels(teacher, student) == [1, -1, 0]
    # through the run's dataset classes (the student's own mapping, e.g. --label-map) when they are set
    student = SimpleNamespace(dataset_names=["dog", "cat"], label_names=["kitty", "doggo"],
                              model_labels=lambda t: torch.tensor([1, 0])[t])
    teacher = SimpleNamespace(dataset_names=["dog", "cat"], label_names=["x"])
    assert student_labels(teacher, student) == [1, 0]


# --------------------------------------------------------------------------- zero at a perfect match
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_detr_terms_zero_at_perfect_match(kind):
    frame = [(64, 96)]
    t_xyxy = torch.tensor([[10.0, 8.0, 40.0, 50.0], [50.0, 20.0, 90.0, 60.0]])
    dets = [{"boxes": t_xyxy, "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 0])}]
    c = 3 if kind == "softmax" else 2  # softmax: 2 classes + no-object
    torch.manual_seed(0)
    logits = torch.randn(1, 6, c)
    boxes = torch.tensor([[0.9, 0.9, 0.05, 0.05]]).repeat(1, 6, 1)  # far from both teacher boxes
    scale = torch.tensor([96.0, 64, 96, 64])
    for q, k in ((1, 0), (4, 1)):
        x0, y0, x1, y1 = (t_xyxy[k] / scale).tolist()
        boxes[0, q] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        s, lab = float(dets[0]["scores"][k]), int(dets[0]["labels"][k])
        if kind == "softmax":
            p = torch.full((c,), 1e-30)
            p[lab], p[-1] = s, 1 - s
            logits[0, q] = p.log()
        else:
            logits[0, q] = -30.0
            logits[0, q, lab] = math.log(s / (1 - s))
    config = transformers.DetrConfig() if kind == "softmax" else transformers.DeformableDetrConfig()
    matcher = detr_matcher(SimpleNamespace(config=config), kind)
    t = detr_terms(logits, boxes, dets, frame, matcher, kind, 2.0)
    assert all(float(v) < TOL for v in t.values()), t
    moved = boxes.clone()
    moved[0, 1, :2] += 0.03
    shifted = logits.clone()
    shifted[0, 1, 1] -= 1.0  # query 1 holds teacher box 0 (label 1): its class probability moves off the score
    t2 = detr_terms(shifted, moved, dets, frame, matcher, kind, 2.0)
    assert all(float(v) > 1e-4 for v in t2.values()), t2


@pytest.mark.parametrize("spec", ["fcos-mobilenet-v2-0.5", "retinanet-mobilenet-v2-0.5"])
def test_dense_terms_zero_through_the_students_own_assigner(spec):
    student = cnn(spec).train()
    batch = make_batch()
    taps = student.forward_train(batch).taps
    dets = [{"boxes": torch.tensor([[8.0, 6.0, 40.0, 44.0]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[10.0, 4.0, 50.0, 40.0]]), "scores": torch.tensor([0.4]), "labels": torch.tensor([0])}]
    model, head = student.model, taps["head_outputs"]
    levels = [f.shape[-2] * f.shape[-1] for f in taps["fpn"].values()]
    matched = dense_assignment(model, torchvision_targets(dets), head, taps["anchors"], levels)
    assert all(bool((m >= 0).any()) for m in matched)  # the student's assigner gives each detection anchors
    logits = torch.full_like(head["cls_logits"], -30.0)
    deltas = head["bbox_regression"].detach().clone()
    for i, (m, d) in enumerate(zip(matched, dets, strict=True)):
        pos = m >= 0
        logits[i, pos, int(d["labels"][0]) + 1] = math.log(float(d["scores"][0]) / (1 - float(d["scores"][0])))
        a, goal = taps["anchors"][i][pos], d["boxes"].expand(int(pos.sum()), 4)
        coder = model.box_coder
        deltas[i, pos] = coder.encode_single(goal, a) if hasattr(coder, "encode_single") else coder.encode(a, goal)
    perfect = {**taps, "head_outputs": {**head, "cls_logits": logits, "bbox_regression": deltas}}
    t = dense_terms(model, perfect, dets, 2.0)
    assert float(t["cls"]) < TOL and float(t["box"]) < 1e-5, t
    off = {**perfect, "head_outputs": {**perfect["head_outputs"], "cls_logits": logits + 1.0,
                                       "bbox_regression": deltas + 0.05}}
    t2 = dense_terms(model, off, dets, 2.0)
    assert float(t2["cls"]) > 1e-4 and float(t2["box"]) > 1e-4


def test_roi_terms_zero_through_the_students_own_roi_matcher():
    """Faster R-CNN: a box predictor that outputs exactly the soft targets for the RoIs the student's RoI matcher
    and sampler pick gives zero; any other output gives positive terms."""
    student = cnn("fasterrcnn-mobilenet-v2-0.5").train()
    taps = student.forward_train(make_batch()).taps
    dets = [{"boxes": torch.tensor([[8.0, 6.0, 40.0, 44.0]]), "scores": torch.tensor([0.7]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[10.0, 4.0, 50.0, 40.0]]), "scores": torch.tensor([0.4]), "labels": torch.tensor([0])}]
    roi, seen = student.model.roi_heads, {}
    spy = roi.box_roi_pool.register_forward_pre_hook(lambda module, args: seen.__setitem__("rois", args[1]))

    class Perfect(torch.nn.Module):  # one detection per image: every positive RoI of image i targets dets[i]
        def __init__(self, offset: float = 0.0) -> None:
            super().__init__()
            self.offset = offset

        def forward(self, x):
            logits, deltas = [], []
            for rois, d in zip(seen["rois"], dets, strict=True):
                p = torch.full((rois.shape[0], 3), 1e-30)
                p[:, 0], p[:, int(d["labels"][0]) + 1] = 1 - d["scores"][0], d["scores"][0]
                logits.append(p.log() + torch.tensor([self.offset, 0.0, 0.0]))
                goal = torch.zeros(rois.shape[0], 3, 4)
                goal[:, int(d["labels"][0]) + 1] = roi.box_coder.encode_single(d["boxes"].expand_as(rois), rois)
                deltas.append(goal.flatten(1))
            return torch.cat(logits), torch.cat(deltas) + self.offset

    roi.box_predictor = Perfect()  # the student is this test's own
    t = roi_terms(student.model, taps, dets)
    assert seen["rois"][0].shape[0] > 0 and float(t["cls"]) < TOL and float(t["box"]) < 1e-5, t
    roi.box_predictor = Perfect(offset=0.1)
    t2 = roi_terms(student.model, taps, dets)
    spy.remove()
    assert float(t2["box"]) > 1e-4 and float(t2["cls"]) > 1e-4


# --------------------------------------------------------------------------- end to end: gradients, threshold
@pytest.mark.parametrize("pair", ["detr>fcos-mobilenet-v2-0.5", "fcos-mobilenet-v2-0.5>detr",
                                  "detr>fasterrcnn-mobilenet-v2-0.5"])
def test_cross_family_step_gradients_and_threshold(pair, tmp_path):
    t_spec, s_spec = pair.split(">")
    load = {"detr": lambda: load_detector(tiny_detr(tmp_path / "detr"))}
    teacher = load.get(t_spec, lambda: cnn(t_spec))()
    student = load.get(s_spec, lambda: cnn(s_spec))()
    teacher.set_classes(NAMES)
    student.set_classes(NAMES)
    teacher.eval()  # its parameters still require grad here, so that a leak would show as a .grad
    student.train()
    batch = make_batch()
    terms = Objective(student, PredKD(teacher, student, score_threshold=0.0))(batch)
    kd = {k: v for k, v in terms.items() if k.startswith("kd_pred_")}
    assert len(kd) >= 2 and all(math.isfinite(float(v)) and float(v) > 0 for v in kd.values()), kd
    sum(kd.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    # teacher detections below the threshold contribute nothing: every term is exactly zero
    none = Objective(student, PredKD(teacher, student, score_threshold=1.01))(batch)
    assert all(float(v) == 0.0 for k, v in none.items() if k.startswith("kd_pred_"))


# --------------------------------------------------------------------------- method choice and combinations
def test_auto_picks_pred_kd_across_families_only():
    assert choose_method("auto", "cnn", "cnn") == "drkd"
    assert choose_method("auto", "detr", "detr") == "kd-detr"
    assert choose_method("auto", "detr", "cnn") == "pred-kd" and choose_method("auto", "cnn", "detr") == "pred-kd"
    assert choose_method("pred-kd", "cnn", "cnn") == "pred-kd"
    assert choose_method("drkd+pred-kd", "cnn", "cnn") == "drkd+pred-kd"
    assert choose_method("auto+pred_kd", "detr", "detr") == "kd-detr+pred-kd"
    assert "pred-kd" in methods_for_family("cnn") and "pred-kd" in methods_for_family("detr")
    for bad, match in (("pred-kd+pred-kd", "different methods"), ("drkd+pred-kd", "needs a cnn teacher"),
                       ("none+pred-kd", "different methods"), ("pred-kd+nope", "unknown --method")):
        with pytest.raises(KdctlError, match=match):
            choose_method(bad, "detr", "cnn")
    combo = distiller_class("kd-detr+pred-kd")
    assert combo.name == "kd-detr+pred-kd" and combo.same_label_space


def test_combination_logs_both_terms_and_auto_records_pred_kd(tmp_path, tiny_retinanet, synth):
    base = dict(data=str(synth), max_steps=1, batch_size=2, imgsz=64, device="cpu", workers=0, quiet=True,
                log_every=1, seed=0, output=str(tmp_path / "runs"), task="distill", eval_every=0)
    kd = {"pred-kd": {"score_threshold": 0.0}, "drkd": {"relation_dim": 16}}
    r = Trainer(RunConfig(model=tiny_retinanet, teacher=tiny_retinanet, method="drkd+pred-kd", name="combo", kd=kd,
                          **base)).run()
    assert r.method == "drkd+pred-kd"
    rows = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = {k for row in rows for k in row if k.startswith("kd")}
    assert {"kd_pixel", "kd_relation", "kd_instance", "kd_pred_cls", "kd_pred_box"} <= keys
    assert all(math.isfinite(row[k]) for row in rows for k in keys if k in row)
    as_run = tomllib.loads((r.run_dir / "config.toml").read_text())["resolved"]["kd"]  # every part, defaults filled in
    assert as_run["pred-kd"]["score_threshold"] == 0.0 and as_run["pred-kd"]["nms_iou"] > 0
    assert as_run["drkd"]["relation_dim"] == 16 and as_run["drkd"]["relation_filter"] == "learned"
    assert as_run["drkd"]["pixel"] > 0 and as_run["drkd"]["normalize"] is True
    names = [c["name"] for c in json.loads((synth / "train.json").read_text())["categories"]]
    teacher = tiny_detr(tmp_path / "detr-teacher", names)
    r2 = Trainer(RunConfig(model=tiny_retinanet, teacher=teacher, name="x", kd=kd, **base)).run()
    assert r2.method == "pred-kd"
    resolved = tomllib.loads((r2.run_dir / "config.toml").read_text())["resolved"]
    assert resolved["method"] == "pred-kd" and set(resolved["kd"]) == {"pred-kd"}
