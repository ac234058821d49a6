"""New class heads (issue #16, items 1-2): the decision (--head), every family's head replacement, the engine.

Rows of classes a checkpoint knew must give exactly the checkpoint's logits for those classes (same hidden states,
same weights: bitwise equal on CPU); new rows start at the architecture's init (prior-probability bias for the
sigmoid / focal heads, whose value is checked to float32 precision).
"""

from __future__ import annotations

import copy
import math
import os
import shlex
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from clitools import invoke  # noqa: E402
from conftest import write_coco  # noqa: E402

from kdctl.data.batch import Batch  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.models.labels import HeadPlan, plan_head  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

OLD = ["Car", "person", "dog"]  # the checkpoint's labels
NEW = ["car", "bike", "person"]  # the data's: car (case differs) and person kept, bike new
KEEP = {0: 0, 2: 1}  # class 0 stays class 0: two-stage Deformable picks its proposals by class 0's logit
F32 = 2 * torch.finfo(torch.float32).eps  # relative precision of a float32 value written once

BACKBONE = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}
DETRS = {  # name -> (transformers class, config class, config kwargs)
    "detr": ("DetrForObjectDetection", "DetrConfig", {"d_model": 32}),
    "table": ("TableTransformerForObjectDetection", "TableTransformerConfig", {"d_model": 32}),
    "conditional": ("ConditionalDetrForObjectDetection", "ConditionalDetrConfig", {"d_model": 32}),
    "dab": ("DabDetrForObjectDetection", "DabDetrConfig", {"hidden_size": 32}),
    "deformable-refine": ("DeformableDetrForObjectDetection", "DeformableDetrConfig",
                          {"d_model": 32, "with_box_refine": True}),
    "deformable-2stage": ("DeformableDetrForObjectDetection", "DeformableDetrConfig",
                          {"d_model": 32, "with_box_refine": True, "two_stage": True, "two_stage_num_proposals": 10}),
}
PRIOR = {  # the bias a new sigmoid row starts at: -log((1 - p) / p)
    "conditional": -math.log(99.0), "deformable-refine": -math.log(99.0), "deformable-2stage": -math.log(99.0),
    "dab": -math.log(3.0),  # DAB-DETR (transformers): p = 1 / (num_labels + 1) = 1 / 4
}


def tiny_detr(kind: str, names: list[str], directory: Path) -> Path:
    import transformers

    model_cls, config_cls, extra = DETRS[kind]
    deformable = "deformable" in kind
    kwargs = dict(use_timm_backbone=False, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
                  id2label=dict(enumerate(names)), auxiliary_loss=True, **extra)
    if deformable:
        kwargs.update(num_feature_levels=4, encoder_n_points=2, decoder_n_points=2)
    stages = ["stage2", "stage3", "stage4"] if deformable else ["stage4"]
    config = getattr(transformers, config_cls)(backbone_config={**BACKBONE, "out_features": stages}, **kwargs)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    return directory


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, 64, 96)
    images[0] = torch.rand(3, 64, 96, generator=g)
    images[1, :, :48, :64] = torch.rand(3, 48, 64, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[4.0, 4.0, 30.0, 44.0]]), "labels": torch.tensor([2])}]
    return Batch(images=images, sizes=[(64, 96), (48, 64)], orig_sizes=[(64, 96), (48, 64)], targets=targets)


# --------------------------------------------------------------------------- the decision
def test_plan_head_rules() -> None:
    plan = plan_head(NEW, OLD)
    assert plan == HeadPlan(tuple(NEW), KEEP, tuple(OLD))
    assert plan.message() == "new head: 3 classes, 2 kept from the checkpoint (car, person), 1 new"
    assert plan_head(["person", "car"], OLD) is None  # covered: the head stays, set_classes maps by name
    assert plan_head(NEW, OLD, mode="keep") is None  # keep: set_classes refuses the missing class
    fresh = plan_head(["person"], OLD, mode="NEW")
    assert fresh.keep == {} and fresh.fresh and fresh.message() == (
        "new head: 1 classes, 0 kept from the checkpoint, 1 new (--head new)")
    mapped = plan_head(["bicycle", "auto"], OLD, label_map={"AUTO": "car"})
    assert mapped.keep == {1: 0} and mapped.message() == (
        "new head: 2 classes, 1 kept from the checkpoint (auto=Car), 1 new")
    # exact (KD-DETR: the teacher's label space): covering is not enough, the order and spelling must match
    assert plan_head(["person", "Car"], OLD, exact=True).keep == {0: 1, 1: 0}
    assert plan_head(OLD, OLD, exact=True) is None
    with pytest.raises(KdctlError, match="same model label"):
        plan_head(["auto", "car", "bike"], OLD, label_map={"auto": "car"})
    with pytest.raises(KdctlError, match="auto, keep or new"):
        plan_head(NEW, OLD, mode="fresh")


# --------------------------------------------------------------------------- DETR family
@pytest.mark.parametrize("kind", list(DETRS))
def test_detr_new_head_keeps_rows(kind: str, tmp_path: Path) -> None:
    path = tiny_detr(kind, OLD, tmp_path / kind)
    old, det = load_detector(str(path)), load_detector(str(path))
    b = batch()
    with torch.no_grad():
        before = old.model(*old.pixel_inputs(b)).logits
    det.replace_head(NEW, KEEP)
    det.eval()
    with torch.no_grad():
        after = det.model(*det.pixel_inputs(b)).logits
    extra = 1 if det.logit_kind == "softmax" else 0
    assert after.shape[-1] == 3 + extra and det.model.config.num_labels == 3
    assert det.model.config.id2label == dict(enumerate(NEW)) and det.label_names == NEW
    new_cols, old_cols = [0, 2] + ([3] if extra else []), [0, 1] + ([3] if extra else [])  # no-object row last
    assert torch.equal(after[..., new_cols], before[..., old_cols])
    from kdctl.models.detr.heads import class_heads

    heads = class_heads(det.model)
    bias = heads[0].bias[1].item()
    assert abs(bias - PRIOR.get(kind, 0.0)) <= F32 * max(1.0, abs(bias))
    if kind == "deformable-2stage":  # decoder layers + the encoder's proposal head, tied to the decoder's copy
        assert len(det.model.class_embed) == 3
        assert all(a.weight is b.weight for a, b in zip(det.model.class_embed, det.model.model.decoder.class_embed,
                                                        strict=True))
    det.set_classes(NEW)
    det.train()
    losses = det.forward_train(b).losses
    assert all(torch.isfinite(v) for v in losses.values())
    back = load_detector(str(det.save(tmp_path / "saved")))
    assert back.label_names == NEW
    state, got = det.model.state_dict(), back.model.state_dict()
    assert state.keys() == got.keys() and all(torch.equal(state[k], got[k]) for k in state)


# --------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("preset", ["fasterrcnn-r18-fpn", "retinanet-r18-fpn", "fcos-r18-fpn"])
def test_cnn_new_head_keeps_rows(preset: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = {"fpn_channels": 32, **({"representation_size": 64} if preset.startswith("fasterrcnn") else {})}
    det = load_detector(preset, label_names=OLD, pretrained_backbone=False, overrides=tiny)
    old_model = copy.deepcopy(det.model)
    det.replace_head(NEW, KEEP)
    ids_new, ids_old = [0, 1, 3], [0, 1, 2]  # background, car, person (model ids = index + 1)
    if preset.startswith("fasterrcnn"):
        x = torch.randn(5, det.model.roi_heads.box_predictor.cls_score.in_features)
        (s_new, d_new), (s_old, d_old) = det.model.roi_heads.box_predictor(x), old_model.roi_heads.box_predictor(x)
        assert s_new.shape == (5, 4) and torch.equal(s_new[:, ids_new], s_old[:, ids_old])
        d_new, d_old = d_new.view(5, 4, 4), d_old.view(5, 4, 4)  # per-class box deltas, class-major
        assert torch.equal(d_new[:, ids_new], d_old[:, ids_old])
    else:
        feats = [torch.randn(1, 32, 4, 4)]
        head, old_head = det.model.head.classification_head, old_model.head.classification_head
        new_logits, old_logits = head(feats), old_head(feats)  # [N, H*W*A, K]: every anchor's channel kept
        assert new_logits.shape[-1] == 4 and torch.equal(new_logits[..., ids_new], old_logits[..., ids_old])
        anchors = head.cls_logits.out_channels // 4
        prior = -math.log(99.0)
        assert all(abs(head.cls_logits.bias[a * 4 + 2].item() - prior) <= F32 * abs(prior) for a in range(anchors))
    back = load_detector(str(det.save(tmp_path / "m")))
    assert back.label_names == NEW
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in det.model.state_dict().items())


TV = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the smallest torchvision detection builder


def test_torchvision_91_class_file_loads_at_91_then_reheads(tmp_path: Path) -> None:
    from kdctl.engine.build import fit_head
    from kdctl.engine.config import RunConfig

    torch.manual_seed(3)
    ref = torchvision.models.get_model(TV, weights=None, weights_backbone=None, num_classes=91)
    torch.save(ref.state_dict(), tmp_path / "coco.pth")
    det = load_detector(f"torchvision:{TV}:{tmp_path / 'coco.pth'}", label_names=["tumour", "person"])
    assert len(det.label_names) == 90 and det.label_names[0] == "person"  # COCO's head, COCO's names
    said: list[str] = []
    fit_head(RunConfig(), det, ["tumour", "person"], None, False, said.append)
    assert said == ["new head: 2 classes, 1 kept from the checkpoint (person), 1 new"]
    w = det.model.roi_heads.box_predictor.cls_score.weight
    old = ref.roi_heads.box_predictor.cls_score.weight
    assert w.shape[0] == 3 and torch.equal(w[2], old[1]) and torch.equal(w[0], old[0])  # person, background
    back = load_detector(str(det.save(tmp_path / "m")))
    assert back.label_names == ["tumour", "person"] and back.config["num_classes"] == 3
    assert torch.equal(back.model.roi_heads.box_predictor.cls_score.weight, w)


def test_torchvision_enum_weights_rehead_round_trip(monkeypatch, tmp_path: Path) -> None:
    """A model built from a weights enum keeps its frozen layout once re-headed: rebuilt with the enum's own head
    (from the saved file, no download), then given the saved head."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(2)
    coco = {k: v for k, v in torchvision.models.get_model(TV, weights=None, weights_backbone=None).state_dict().items()
            if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, *a, **k: coco)
    det = load_detector(f"torchvision:{TV}:DEFAULT")
    det.replace_head(["tumour", "person"], {1: 0})
    path = det.save(tmp_path / "tv")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download"))
    back = load_detector(str(path))
    assert back.weights == "COCO_V1" and isinstance(back.model.backbone.body["0"][1], FrozenBatchNorm2d)
    state = det.model.state_dict()
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in state.items())
    person = coco["roi_heads.box_predictor.cls_score.weight"][1]
    assert torch.equal(back.model.roi_heads.box_predictor.cls_score.weight[2], person)  # kept through the rebuild


# --------------------------------------------------------------------------- the engine and the command line
@pytest.fixture
def three(tmp_path: Path) -> Path:
    """A 3-class dataset (Person, car, tumour): 4 images 64x64."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, 5)]
    anns = [{"id": i, "image_id": 1 + i % 4, "category_id": 1 + i % 3, "bbox": [4 + 3 * i, 6, 20, 24], "area": 480,
             "iscrowd": 0} for i in range(8)]
    cats = [{"id": 1, "name": "Person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "tumour"}]
    return write_coco(tmp_path / "three", images, anns, cats)


def build(task: str, model: Path, data: Path, teacher: Path | None = None, **kw):
    from kdctl.engine.build import build_models, open_data
    from kdctl.engine.config import RunConfig

    cfg = RunConfig(task=task, model=str(model), teacher=str(teacher) if teacher else None, data=str(data),
                    device="cpu", imgsz=64, batch_size=2, max_steps=1, **kw).absolute_paths()
    said: list[str] = []
    data_ = open_data(cfg, said.append)
    return build_models(cfg, data_, "cpu", None, said.append), said


COCO = [c for c in torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT.meta["categories"]][1:]


def test_distill_coco_student_takes_the_teachers_label_space(three: Path, tmp_path: Path, capsys) -> None:
    teacher = tiny_detr("detr", ["person", "car", "tumour"], tmp_path / "teacher")
    student = tiny_detr("detr", COCO, tmp_path / "coco-student")
    coco = load_detector(str(student)).model.class_labels_classifier
    m, said = build("distill", student, three, teacher)
    assert m.method == "kd-detr" and m.student.label_names == m.teacher.label_names == ["person", "car", "tumour"]
    assert said == ["new head: 3 classes, 2 kept from the checkpoint (person, car), 1 new"]
    head = m.student.model.class_labels_classifier
    assert head.weight.shape[0] == 4
    assert torch.equal(head.weight[0], coco.weight[0]) and torch.equal(head.weight[1], coco.weight[2])  # person, car
    assert torch.equal(head.weight[3], coco.weight[90]) and torch.equal(head.bias[3], coco.bias[90])  # no-object
    capsys.readouterr()
    code, out, err = invoke(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(three),
                             "--max-steps", "1", "--device", "cpu", "--batch-size", "2", "--imgsz", "64",
                             "--output", str(tmp_path / "runs"), "--name", "kd", "--quiet"], capsys)
    assert code == 0, err
    saved = load_detector(str(tmp_path / "runs" / "distill" / "kd" / "last"))
    assert saved.label_names == ["person", "car", "tumour"]


def test_teacher_without_the_data_classes_says_how_to_fine_tune_it(three: Path, tmp_path: Path) -> None:
    teacher = tiny_detr("detr", ["person", "car"], tmp_path / "teacher")
    with pytest.raises(KdctlError) as e:
        build("distill", tiny_detr("detr", COCO, tmp_path / "s"), three, teacher, name="kd")
    msg = str(e.value)
    want = shlex.join(["kdctl", "train", "--model", str(teacher), "--data", str(three), "--name", "kd-teacher"])
    assert "'tumour'" in msg and f"`{want}`" in msg and "\n" not in msg


def test_train_reheads_keep_refuses_eval_never_changes(three: Path, tmp_path: Path, capsys) -> None:
    catdog = tiny_detr("detr", ["cat", "CAR"], tmp_path / "catdog")
    m, said = build("train", catdog, three)
    assert said == ["new head: 3 classes, 1 kept from the checkpoint (car), 2 new"]
    assert m.student.label_names == ["Person", "car", "tumour"]
    m, said = build("train", catdog, three, head="new")
    assert said == ["new head: 3 classes, 0 kept from the checkpoint, 3 new (--head new)"]
    capsys.readouterr()  # the tiny model's save progress
    common = ["--data", str(three), "--device", "cpu", "--batch-size", "2", "--imgsz", "64", "--quiet"]
    code, out, err = invoke(["train", "--model", str(catdog), "--max-steps", "1", "--head", "keep",
                             "--output", str(tmp_path / "runs"), *common], capsys)
    assert code == 2 and "'Person'" in err and "--head auto" in err and len(err.strip().splitlines()) == 1
    code, out, err = invoke(["eval", "--model", str(catdog), *common[:-1]], capsys)
    assert code == 2 and "'tumour'" in err and "--head" not in err
    code, out, err = invoke(["train", "--model", str(catdog), "--max-steps", "1", "--head", "odd",
                             "--output", str(tmp_path / "runs"), *common], capsys)
    assert code == 2 and "auto, keep or new" in err
