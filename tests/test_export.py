"""kdctl export: transformers dir (pipeline parity), safetensors (+ fp16), ONNX parity in onnxruntime, refusals.

Tiny random models built from configs, saved to temp dirs; a run directory is laid out by hand (config.toml,
last/ with a trainer.pt holding distiller weights, eval/best.json). Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kdctl.cli import main  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402
from kdctl.export import export_model, run_onnx  # noqa: E402
from kdctl.specs import load_detector  # noqa: E402

NAMES = ["RBC", "WBC", "Platelets"]
BACKBONE = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 16, 32], "embedding_size": 8}
COMMON = dict(use_timm_backbone=False, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
              decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=10,
              id2label=dict(enumerate(NAMES)))
TINY_CNN = {"fpn_channels": 16, "trainable_layers": 5}


def tiny_detr(directory: Path, kind: str = "detr") -> Path:
    import transformers

    torch.manual_seed(0)
    if kind == "deformable":
        cfg = transformers.DeformableDetrConfig(
            backbone_config={**BACKBONE, "out_features": ["stage2", "stage3", "stage4"]}, d_model=32,
            num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, with_box_refine=True, two_stage=True,
            two_stage_num_proposals=10, **COMMON)
        transformers.DeformableDetrForObjectDetection(cfg).save_pretrained(directory)
    else:
        cfg = transformers.DetrConfig(backbone_config={**BACKBONE, "out_features": ["stage4"]}, d_model=16, **COMMON)
        transformers.DetrForObjectDetection(cfg).save_pretrained(directory)
    return directory


def tiny_cnn(directory: Path, preset: str = "fasterrcnn-r18-fpn") -> Path:
    det = load_detector(preset, label_names=NAMES, pretrained_backbone=False, overrides=TINY_CNN)
    torch.manual_seed(0)
    with torch.no_grad():  # break the ties of a fresh random model: detections get distinct scores
        for p in det.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return det.save(directory)


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> Path:
    return tiny_detr(tmp_path_factory.mktemp("detr") / "m")


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    return tiny_cnn(tmp_path_factory.mktemp("cnn") / "m")


def state(det) -> dict[str, torch.Tensor]:
    return det.model.state_dict()


# --------------------------------------------------------------------------- hf
def test_hf_export_matches_kdctl_predict_through_pipeline(detr_dir, tmp_path):
    from PIL import Image
    from transformers import AutoModelForObjectDetection, pipeline

    out = tmp_path / "hf"
    res = export_model(str(detr_dir), "hf", out)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(res.files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(NAMES)} and cfg["label2id"]["WBC"] == 1
    det = load_detector(str(detr_dir))
    det.imgsz = 64
    # same pixels for both: an image already at the model size (no resize on either side)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    hf_model = AutoModelForObjectDetection.from_pretrained(out).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = hf_model(pixel_values=x), det.model(pixel_values=x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)

    ours = det.predict_images([img], imgsz=64, score_threshold=0.0)[0]
    proc_cfg = json.loads((out / "preprocessor_config.json").read_text())
    proc_cfg["size"] = {"max_height": 64, "max_width": 64}
    (out / "preprocessor_config.json").write_text(json.dumps(proc_cfg))
    theirs = pipeline("object-detection", model=str(out), threshold=0.0)(img)
    assert len(theirs) == len(ours["scores"]) == 10
    theirs = sorted(theirs, key=lambda d: -d["score"])
    assert [d["label"] for d in theirs] == ours["names"]
    np.testing.assert_allclose([d["score"] for d in theirs], ours["scores"], atol=1e-4)
    boxes = [[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in theirs]
    np.testing.assert_allclose(boxes, ours["boxes"], atol=1.0)  # the pipeline rounds boxes to whole pixels


def test_cnn_hf_is_a_kdctl_dir_that_loads_back(cnn_dir, tmp_path):
    res = export_model(str(cnn_dir), "hf", tmp_path / "o")
    assert res.files == ["kdctl.json", "model.safetensors"] and "kdctl.load" in " ".join(res.notes)
    back, ref = load_detector(str(tmp_path / "o")), load_detector(str(cnn_dir))
    assert back.label_names == NAMES
    assert all(torch.equal(state(back)[k], v) for k, v in state(ref).items())


# --------------------------------------------------------------------------- safetensors / run dirs
def fake_run(root: Path, model_dir: Path, *, with_best: bool) -> Path:
    """A run directory as the trainer writes it, without training: last/ holds distiller state in trainer.pt."""
    import shutil

    run = root / "run"
    shutil.copytree(model_dir, run / "last")
    torch.save({"distiller": {"distiller.adapt.weight": torch.ones(2, 2)}, "step": 3}, run / "last" / "trainer.pt")
    if with_best:
        shutil.copytree(model_dir, run / "best")
    (run / "config.toml").write_text('task = "distill"\nmodel = "fasterrcnn-r18-fpn"\n')
    return run


@pytest.mark.parametrize("with_best", [True, False], ids=["best", "last-fallback"])
def test_run_dir_exports_the_student_only(cnn_dir, tmp_path, with_best):
    run = fake_run(tmp_path, cnn_dir, with_best=with_best)
    res = export_model(str(run), "safetensors", tmp_path / "o")
    assert res.files == ["kdctl.json", "model.safetensors"]  # no trainer.pt
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "o" / "model.safetensors"))
    ref = state(load_detector(str(cnn_dir)))
    assert set(exported) == set(ref) and not any("distill" in k or "teacher" in k for k in exported)
    assert all(torch.equal(exported[k], ref[k]) for k in ref)


def test_safetensors_half_detr_loads_back(detr_dir, tmp_path):
    res = export_model(str(detr_dir), "safetensors", tmp_path / "o", half=True)
    assert {"config.json", "kdctl.json", "model.safetensors"} <= set(res.files)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.float16}
    back, ref = load_detector(str(tmp_path / "o")), load_detector(str(detr_dir))
    assert back.label_names == NAMES and back.family == "detr"
    for k, v in state(ref).items():
        if v.is_floating_point():
            assert torch.equal(state(back)[k].half(), v.half()), k


def test_output_is_never_overwritten_without_force(detr_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(detr_dir), "--format", "safetensors", "--output", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_model(str(detr_dir), "safetensors", out, force=True)
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- onnx
def detr_inputs(det, n: int, h: int, w: int, pad: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(n * 1000 + h + w)
    mask = torch.ones(n, h, w, dtype=torch.long)
    if pad:
        mask[-1, :, w - pad:] = 0
    mean, std = torch.tensor(det.image_mean).view(1, 3, 1, 1), torch.tensor(det.image_std).view(1, 3, 1, 1)
    return {"pixel_values": ((torch.rand(n, 3, h, w) - mean) / std) * mask[:, None], "pixel_mask": mask}


def assert_detr_parity(det, onnx_path: Path, feeds: dict[str, torch.Tensor]) -> list[float]:
    logits, boxes = run_onnx(onnx_path, feeds)
    with torch.no_grad():
        ref = det.model(**feeds)
    diffs = [float(np.abs(logits - ref.logits.numpy()).max()), float(np.abs(boxes - ref.pred_boxes.numpy()).max())]
    assert max(diffs) < 1e-4, diffs
    return diffs


def test_onnx_detr_dynamic_batch_and_size(detr_dir, tmp_path, capsys):
    out = tmp_path / "o"
    main_ok(["export", "--model", str(detr_dir), "--format", "onnx", "--output", str(out), "--imgsz", "64"])
    printed = capsys.readouterr().out
    assert "pixel_values" in printed and "max abs diff" in printed
    meta = json.loads((out / "model.onnx.json").read_text())
    assert meta["label_names"] == NAMES and meta["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert meta["outputs"][0]["shape"] == ["batch", 10, len(NAMES) + 1]  # DETR: + no-object
    assert max(meta["parity"]["max_abs_diff"].values()) < 1e-4
    det = load_detector(str(detr_dir))
    for n, h, w, pad in [(1, 64, 64, 0), (3, 96, 64, 16)]:  # other batch sizes and sizes than traced
        assert_detr_parity(det, out / "model.onnx", detr_inputs(det, n, h, w, pad))


def test_onnx_deformable_fixed_size_dynamic_batch(tmp_path):
    src = tiny_detr(tmp_path / "deformable", "deformable")
    res = export_model(str(src), "onnx", tmp_path / "o", imgsz=96)
    meta = res.onnx
    assert meta["inputs"][0]["shape"] == ["batch", 3, 96, 96] and "fixed" in meta["shapes"]
    det = load_detector(str(src))
    assert_detr_parity(det, tmp_path / "o" / "model.onnx", detr_inputs(det, 3, 96, 96, pad=24))


def test_onnx_fasterrcnn_one_image_dynamic_size(cnn_dir, tmp_path):
    res = export_model(str(cnn_dir), "onnx", tmp_path / "o", imgsz=128)
    parity = res.onnx["parity"]
    diffs = parity["max_abs_diff"]
    assert parity["unmatched"] == 0 and parity["matched"] > 0 and "warning" not in parity
    assert diffs["scores"] < 1e-4 and diffs["boxes"] < 1e-2
    det = load_detector(str(cnn_dir)).eval()
    img = torch.rand(1, 3, 96, 160)  # another size than traced
    boxes, scores, labels = run_onnx(tmp_path / "o" / "model.onnx", {"images": img})
    from kdctl.models.cnn.onnx import CnnOnnx

    with torch.no_grad(), det.postprocessing(score_threshold=0.001, max_detections=100):
        rb, rs, rl = CnnOnnx(det.model)(img)
    assert len(scores) == len(rs) > 0 and labels.min() >= 0 and labels.max() < len(NAMES)
    np.testing.assert_allclose(np.sort(scores), np.sort(rs.numpy()), atol=1e-4)
    top = int(np.argmax(scores))
    assert np.abs(boxes[top] - rb[int(rs.argmax())].numpy()).max() < 1e-2


def test_unsupported_onnx_is_one_line(detr_dir, tmp_path, capsys, monkeypatch):
    from kdctl.models.detr import VARIANTS_BY_CLASS

    monkeypatch.setattr(VARIANTS_BY_CLASS["DetrForObjectDetection"], "onnx_kind", None)  # DETR without ONNX support
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(detr_dir), "--format", "onnx", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "not supported yet" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    with pytest.raises(KdctlError, match="unknown export format"):
        export_model(str(detr_dir), "tflite", tmp_path / "t")


def main_ok(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e.code
