"""The torchvision CNN-detector adapter: one-pass taps, no second resize, original-pixel boxes, save/load, specs."""

from __future__ import annotations

import json
import os
import urllib.error
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from kdctl.data.batch import Batch, collate
from kdctl.errors import KdctlError
from kdctl.models.cnn import TorchvisionDetector
from kdctl.specs import load_detector

TV_NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the smallest torchvision detection builder
TV_FILE = "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
SMALL_RPN = {
    "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50, "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 16,
}
TINY = {
    "fasterrcnn-r18-fpn": {"fpn_channels": 32, "representation_size": 64, **SMALL_RPN},
    "fasterrcnn-mobilenet-v2-fpn": {"fpn_channels": 32, "representation_size": 64, **SMALL_RPN},
    "retinanet-r18-fpn": {"fpn_channels": 32},
    "fcos-r18-fpn": {"fpn_channels": 32},
}
LOSSES = {
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
}
NAMES = ["cat", "dog"]


def make_batch() -> Batch:
    """Two images: 64x96 resized from 128x192 (scale 0.5) and 80x64 at its original size; padded to 96x96."""
    g = torch.Generator().manual_seed(0)
    samples = [
        (torch.rand(3, 64, 96, generator=g),
         {"boxes": [[4.0, 6.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]], "labels": [0, 1], "orig_size": (128, 192)}),
        (torch.rand(3, 80, 64, generator=g), {"boxes": [[10.0, 10.0, 30.0, 60.0]], "labels": [1], "orig_size": (80, 64)}),
    ]
    return collate(samples)


def tiny(preset: str, names: list[str] = NAMES, **extra) -> TorchvisionDetector:
    torch.manual_seed(0)
    return load_detector(preset, label_names=names, pretrained_backbone=False, overrides={**TINY[preset], **extra})


@pytest.fixture(scope="module")
def batch() -> Batch:
    return make_batch()


# --------------------------------------------------------------------------- 1. one pass, taps
@pytest.mark.parametrize("preset,norm", [
    ("fasterrcnn-r18-fpn", "auto"), ("retinanet-r18-fpn", "auto"), ("fcos-r18-fpn", "frozen_bn"),
    ("fasterrcnn-mobilenet-v2-fpn", "auto"),
])
def test_forward_train_taps(preset: str, norm: str, batch: Batch) -> None:
    det = tiny(preset, norm=norm)
    arch = det.architecture
    strides = [4, 8, 16, 32, 64] if arch == "fasterrcnn" else [8, 16, 32, 64, 128]
    assert det.fpn_strides == strides and det.fpn_channels == 32
    calls = []
    det.model.backbone.register_forward_hook(lambda m, a, o: calls.append(1))
    det.train()
    out = det.forward_train(batch)
    assert len(calls) == 1  # losses and taps from ONE backbone pass
    assert set(out.losses) == LOSSES[arch]
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    feats = out.taps["features"]
    assert list(feats) == strides
    for s, f in feats.items():  # the model pads 80x96 to 96x96; level s is ceil(96 / s) wide
        assert f.shape == (2, 32, -(-96 // s), -(-96 // s)) and f.requires_grad
    assert out.taps["image_sizes"] == [(64, 96), (80, 64)]
    assert torch.equal(out.taps["boxes"][0], batch.targets[0]["boxes"])
    assert out.taps["labels"][1].tolist() == [1]
    sum(out.losses.values()).backward()  # the taps are the graph the losses came from
    assert det.model.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    det.eval()
    with torch.no_grad():
        taps = det.forward_taps(batch)
    assert list(taps["features"]) == strides and taps["image_sizes"] == out.taps["image_sizes"]
    for s in strides:  # GroupNorm / FrozenBatchNorm2d: train-mode features == teacher-side features
        assert torch.equal(taps["features"][s], feats[s].detach())


def test_frozen_modes_and_defaults() -> None:
    det = tiny("fasterrcnn-r18-fpn")
    assert det.config["norm"] == "gn" and det.config["trainable_layers"] == 5  # from scratch: GN, all trainable
    assert all(p.requires_grad for p in det.model.backbone.parameters())
    assert isinstance(det.model.backbone.body.bn1, torch.nn.GroupNorm)
    assert det.model.roi_heads.box_head.fc6.out_features == 64 and det.model.rpn.fg_bg_sampler.batch_size_per_image == 32


# --------------------------------------------------------------------------- 2. pixels and coordinates
def test_predict_original_coordinates_and_no_resize(batch: Batch, monkeypatch) -> None:
    det = tiny("fasterrcnn-r18-fpn")
    seen = {}
    det.model.backbone.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))

    def fake_roi_heads(features, proposals, image_shapes, targets=None):
        seen["image_shapes"] = list(image_shapes)
        det_ = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 50.0, 60.0], [1.0, 1.0, 2.0, 2.0]]),
                "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 1])}
        return [dict(det_) for _ in image_shapes], {}

    monkeypatch.setattr(det.model.roi_heads, "forward", fake_roi_heads)
    out = det.predict(batch, score_threshold=0.5, max_detections=10)
    # the model saw exactly the batch's pixels (normalised), in the batch's frame: no resize
    assert seen["image_shapes"] == [(64, 96), (80, 64)]
    assert seen["x"].shape == batch.images.shape
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for i, (h, w) in enumerate(batch.sizes):
        assert torch.allclose(seen["x"][i, :, :h, :w], (batch.images[i, :, :h, :w] - mean) / std, atol=1e-6)
    # image 0 was resized 128x192 -> 64x96: boxes come back x2; image 1 was not resized
    assert out[0]["boxes"].tolist() == [[20.0, 40.0, 60.0, 80.0], [0.0, 0.0, 100.0, 120.0], [2.0, 2.0, 4.0, 4.0]]
    assert out[1]["boxes"].tolist() == [[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 50.0, 60.0], [1.0, 1.0, 2.0, 2.0]]
    assert out[0]["labels"].tolist() == [0, 1, 0]  # model label - 1 = index into label_names
    det.set_classes(["dog", "cat"])
    assert det.predict(batch)[0]["labels"].tolist() == [1, 0, 1]  # cat -> dataset 1, dog -> dataset 0


def test_predict_thresholds_reach_the_model(batch: Batch) -> None:
    det = tiny("fasterrcnn-r18-fpn")
    out = det.predict(batch, score_threshold=0.0, max_detections=7)
    assert [len(o["boxes"]) for o in out] == [7, 7]
    assert det.model.roi_heads.score_thresh == 0.05  # restored afterwards
    assert all(bool((o["scores"][:-1] >= o["scores"][1:]).all()) for o in out)


@pytest.mark.parametrize("preset", ["retinanet-r18-fpn", "fcos-r18-fpn"])
def test_dense_heads_never_spend_detections_on_background(preset: str, batch: Batch) -> None:
    det = tiny(preset)
    cls = det.model.head.classification_head
    with torch.no_grad():  # make background (class 0 of 3) the top class everywhere
        cls.cls_logits.bias.view(-1, 3)[:, 0] = 20.0
    out = det.predict(batch, score_threshold=0.0, max_detections=5)
    assert [len(o["labels"]) for o in out] == [5, 5]
    assert all(set(o["labels"].tolist()) <= {0, 1} for o in out)


# --------------------------------------------------------------------------- 3. save / load
def test_save_load_round_trip(batch: Batch, tmp_path: Path) -> None:
    det = tiny("retinanet-r18-fpn", names=["cat", "dog", "bird"])
    path = det.save(tmp_path / "student")
    cfg = json.loads((path / "kdctl.json").read_text())
    assert cfg["format"] == "kdctl" and cfg["version"] == 1 and cfg["family"] == "cnn"
    assert cfg["architecture"] == "retinanet" and cfg["builder"] == "preset" and cfg["weights"] is None
    assert cfg["label_names"] == ["cat", "dog", "bird"] and cfg["imgsz"] == 640
    assert cfg["config"]["backbone"] == "resnet18" and cfg["config"]["fpn_channels"] == 32
    assert cfg["config"]["norm"] == "gn" and cfg["config"]["trainable_layers"] == 5
    back = load_detector(str(path))
    assert isinstance(back, TorchvisionDetector) and back.label_names == det.label_names
    a, b = det.predict(batch, 0.0, 20), back.predict(batch, 0.0, 20)
    assert len(a[0]["boxes"]) > 0
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("boxes", "scores", "labels"))


def test_local_backbone_weights_frozen_layers_survive_save(batch: Batch, tmp_path: Path) -> None:
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, tmp_path / "r18.pth")
    det = tiny("fasterrcnn-r18-fpn", backbone_weights=str(tmp_path / "r18.pth"))  # local file: counts as pretrained
    body = det.model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert torch.equal(body.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])
    assert torch.equal(body.layer1[0].bn1.running_var, imagenet["layer1.0.bn1.running_var"])
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad  # trainable_layers = 3: layer2..4
    path = det.save(tmp_path / "s")
    cfg = json.loads((path / "kdctl.json").read_text())["config"]
    assert "backbone_weights" not in cfg and cfg["norm"] == "frozen_bn" and cfg["trainable_layers"] == 3
    back = load_detector(str(path))
    flags = {k: p.requires_grad for k, p in det.model.named_parameters()}
    assert flags == {k: p.requires_grad for k, p in back.model.named_parameters()}
    assert torch.equal(det.predict(batch, 0.0)[0]["boxes"], back.predict(batch, 0.0)[0]["boxes"])


def test_corrupt_weights_are_one_line_errors(tmp_path: Path) -> None:
    path = tiny("fcos-r18-fpn").save(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(KdctlError, match="corrupt"):
        load_detector(str(path))
    with pytest.raises(KdctlError, match="corrupt"):
        (tmp_path / "bad.pth").write_bytes(b"not a zip")
        load_detector(f"torchvision:{TV_NAME}:{tmp_path / 'bad.pth'}")


def test_preset_errors() -> None:
    with pytest.raises(KdctlError, match="label names"):
        load_detector("fasterrcnn-r18-fpn", pretrained_backbone=False)
    with pytest.raises(KdctlError, match="bogus"):
        tiny("retinanet-r18-fpn", bogus=1)
    with pytest.raises(KdctlError, match="multiple of 32"):
        tiny("fcos-r18-fpn", fpn_channels=48)


# --------------------------------------------------------------------------- 4. torchvision specs
def _offline(monkeypatch, tmp_path: Path) -> list[str]:
    """Every torchvision weights download fails as it does without a network (and the cache is empty)."""
    urls: list[str] = []

    def no_network(url, *a, **k):
        urls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    return urls


def test_torchvision_builder_without_weights_has_coco_labels() -> None:
    det = load_detector(f"torchvision:{TV_NAME}")
    assert len(det.label_names) == 90 and det.label_names[:3] == ["person", "bicycle", "car"]
    assert det.label_names[11] == "N/A"  # placeholders keep the COCO ids aligned
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 91 and det.imgsz == 320
    assert det.fpn_strides == [32, 64]  # two levels share stride 32: the first is kept
    two = load_detector(f"torchvision:{TV_NAME}", label_names=NAMES)
    assert two.model.roi_heads.box_predictor.cls_score.out_features == 3 and two.label_names == NAMES


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_local_state_dict(suffix: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = torchvision.models.get_model(TV_NAME, weights=None, weights_backbone=None, num_classes=3)
    # a torchvision-trained file stores FrozenBatchNorm2d statistics (no num_batches_tracked): keep that layout
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    f = tmp_path / f"w{suffix}"
    torch.save(state, f) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    det = load_detector(f"torchvision:{TV_NAME}:{f}", label_names=NAMES)
    got = det.model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert isinstance(det.model.backbone.body["0"][1], FrozenBatchNorm2d)
    ref.eval(), det.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():  # eval BatchNorm2d == FrozenBatchNorm2d with the same statistics
        ours, theirs = det.model.backbone(x), ref.backbone(x)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in theirs)
    back = load_detector(str(det.save(tmp_path / "saved")))  # the frozen layout survives save/load
    assert isinstance(back.model.backbone.body["0"][1], FrozenBatchNorm2d) and back.weights is None
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(KdctlError, match="label names"):
        load_detector(f"torchvision:{TV_NAME}:{f}")  # 3-class file, COCO assumed


def test_torchvision_default_offline_is_one_line(monkeypatch, tmp_path: Path) -> None:
    urls = _offline(monkeypatch, tmp_path)
    with pytest.raises(KdctlError) as e:
        load_detector(f"torchvision:{TV_NAME}:DEFAULT")
    msg = str(e.value)
    assert TV_FILE in msg and "\n" not in msg and urls and urls[0].endswith(TV_FILE)
    with pytest.raises(KdctlError, match="--no-pretrained-backbone") as e:
        load_detector("fasterrcnn-r18-fpn", label_names=NAMES, overrides=TINY["fasterrcnn-r18-fpn"])
    assert "resnet18-f37072fd.pth" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(KdctlError, match="COCO_V1"):
        load_detector(f"torchvision:{TV_NAME}:NOPE")


def test_torchvision_enum_weights_round_trip_without_download(monkeypatch, tmp_path: Path, batch: Batch) -> None:
    torch.manual_seed(2)
    ref = torchvision.models.get_model(TV_NAME, weights=None, weights_backbone=None)
    coco = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda url, *a, **k: coco)
    det = load_detector(f"torchvision:{TV_NAME}:DEFAULT")  # "downloaded"
    assert det.weights == "COCO_V1" and len(det.label_names) == 90
    assert isinstance(det.model.backbone.body["0"][1], FrozenBatchNorm2d)
    path = det.save(tmp_path / "tv")
    assert json.loads((path / "kdctl.json").read_text())["builder"] == "torchvision"
    urls = _offline(monkeypatch, tmp_path)
    back = load_detector(str(path))
    assert not urls and back.weights == "COCO_V1"
    a, b = det.predict(batch, 0.0), back.predict(batch, 0.0)
    assert len(a[0]["boxes"]) > 0 and torch.equal(a[0]["boxes"], b[0]["boxes"])
    assert torch.equal(a[1]["scores"], b[1]["scores"])


# --------------------------------------------------------------------------- 5. labels
def test_training_targets_use_model_labels(batch: Batch) -> None:
    det = tiny("fasterrcnn-r18-fpn", names=["cat", "bird", "dog"])
    det.set_classes(["dog", "cat"])  # dataset 0 = dog (model index 2), dataset 1 = cat (model index 0)
    seen = {}
    det.model.transform.register_forward_pre_hook(lambda m, a: seen.update(targets=a[1]))
    det.train()
    out = det.forward_train(batch)
    assert seen["targets"][0]["labels"].tolist() == [3, 1]  # model index + 1 (0 is background)
    assert seen["targets"][1]["labels"].tolist() == [1]
    assert out.taps["labels"][0].tolist() == [0, 1]  # taps keep dataset indices (same for teacher and student)


def test_retinanet_group_norm_head(batch: Batch, tmp_path: Path) -> None:
    """head_norm = "gn" builds torchvision's v2 RetinaNet head (GroupNorm in both towers), trains, and survives a
    save/load round trip; other detectors and other values are refused in one line."""
    det = load_detector("retinanet-mobilenet-v2-0.5", label_names=NAMES, pretrained_backbone=False,
                        overrides={"fpn_channels": 32})
    norms = [m for m in det.model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8  # 4 convs in each of the two towers
    det.train()
    out = det.forward_train(batch)
    assert set(out.losses) == LOSSES["retinanet"] and all(torch.isfinite(v) for v in out.losses.values())
    det.eval()
    back = load_detector(str(det.save(tmp_path / "m")))
    a, b = det.predict(batch, 0.0, 20), back.predict(batch, 0.0, 20)
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(KdctlError, match="head_norm"):
        load_detector("fcos-r18-fpn", label_names=NAMES, pretrained_backbone=False, overrides={"head_norm": "gn"})
    with pytest.raises(KdctlError, match="head_norm"):
        load_detector("retinanet-r18-fpn", label_names=NAMES, pretrained_backbone=False, overrides={"head_norm": "bn"})
