"""Deployable ONNX: fp16 graphs checked against fp32 PyTorch, the description in metadata_props, --simplify.

Tiny random DETRs built from configs; a two-layer conv net for the weights-only fp16 path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from batches import save_tiny_detr

from kdctl.errors import KdctlError
from kdctl.export import export_model, run_onnx
from kdctl.onnx_check import FP16_RTOL
from kdctl.specs import load_detector

NAMES = ["RBC", "WBC", "Platelets"]


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> Path:
    return Path(save_tiny_detr(tmp_path_factory.mktemp("detr") / "m", NAMES, widths=(16, 32, 32, 64), d_model=32,
                               decoder_layers=2, ffn=32, num_queries=10))


def weight_bytes(path: Path) -> dict[str, int]:
    import onnx
    from onnx import numpy_helper

    out: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + numpy_helper.to_array(t).nbytes
    return out


def test_fp16_detr_graph_within_the_stated_tolerance_of_fp32_pytorch(detr_dir, tmp_path):
    import onnx

    export_model(str(detr_dir), "onnx", tmp_path / "fp32", imgsz=64)
    res = export_model(str(detr_dir), "onnx", tmp_path / "fp16", imgsz=64, half=True)
    path = tmp_path / "fp16" / "model.onnx"
    w32, w16 = weight_bytes(tmp_path / "fp32" / "model.onnx"), weight_bytes(path)
    assert set(w16) == {"FLOAT16"} and w16["FLOAT16"] * 2 == w32["FLOAT"]  # every weight stored in half
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    parity = res.onnx["parity"]
    assert parity["reference"] == "float32 PyTorch" and "fp16" in parity["tolerance_rule"]
    for k, v in parity["max_abs_diff"].items():
        assert v <= parity["tolerance"][k]
    assert json.loads((tmp_path / "fp16" / "model.onnx.json").read_text())["parity"]["tolerance"] == parity["tolerance"]
    # independently: another batch and size than the example; fp16 differs from fp32, within FP16_RTOL
    det = load_detector(str(detr_dir)).eval()
    x = torch.randn(3, 3, 96, 64)
    mask = torch.ones(3, 96, 64, dtype=torch.long)
    logits, boxes = run_onnx(path, {"pixel_values": x, "pixel_mask": mask})
    assert logits.dtype == np.float16
    with torch.no_grad():
        ref = det.model(pixel_values=x, pixel_mask=mask)
    for got, want in ((logits, ref.logits), (boxes, ref.pred_boxes)):
        diff = float(np.abs(got.astype(np.float32) - want.numpy()).max())
        assert 0 < diff <= FP16_RTOL * max(1.0, float(want.abs().max()))


def test_metadata_props_describe_the_graph_without_the_side_json(detr_dir, tmp_path):
    import onnx

    from kdctl.onnx_deploy import read_metadata
    from kdctl.predict.onnx_runner import OnnxDetector

    export_model(str(detr_dir), "onnx", tmp_path / "o", imgsz=64)
    path = tmp_path / "o" / "model.onnx"
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["names"]) == {str(i): n for i, n in enumerate(NAMES)}
    assert json.loads(props["imgsz"]) == 64 and json.loads(props["image_mean"]) == [0.485, 0.456, 0.406]
    assert props["box_format"].startswith("cxcywh") and props["scores"].startswith("softmax")
    assert read_metadata(path)["label_names"] == NAMES
    (tmp_path / "o" / "model.onnx.json").unlink()
    graph = OnnxDetector(path)  # everything it needs is in the file
    assert graph.label_names == NAMES and graph.imgsz == 64 and not graph.sigmoid


def test_weights_only_fp16_keeps_float32_io(tmp_path):
    import onnx

    from kdctl.onnx_deploy import to_half

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 4, 3)).eval()
    path = tmp_path / "m.onnx"
    x = torch.rand(1, 3, 16, 16)
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["images"], output_names=["out"])
    size32 = path.stat().st_size
    note = to_half(path, "weights")
    assert "float32 compute" in note and path.stat().st_size < 0.6 * size32
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (got,) = run_onnx(path, {"images": x})
    with torch.no_grad():
        want = net(x).numpy()
    diff = float(np.abs(got - want).max())
    assert got.dtype == np.float32 and 0 < diff <= FP16_RTOL * max(1.0, float(np.abs(want).max()))


def test_simplify(detr_dir, tmp_path, monkeypatch):
    from kdctl import onnx_deploy

    if onnx_deploy.simplifier() is not None:
        res = export_model(str(detr_dir), "onnx", tmp_path / "s", imgsz=64, simplify=True)
        note = next(n for n in res.notes if "simplif" in n)
        before, after = (int(v) for v in note.split(": ")[1].split(" nodes")[0].split(" -> "))
        assert after < before and max(res.onnx["parity"]["max_abs_diff"].values()) < 1e-4
    monkeypatch.setattr(onnx_deploy, "simplifier", lambda: None)
    with pytest.raises(KdctlError, match="--simplify needs onnxslim or onnxsim"):
        export_model(str(detr_dir), "onnx", tmp_path / "n", imgsz=64, simplify=True)
    assert not (tmp_path / "n").exists()


def test_cnn_half_graph_predicts_as_pytorch(tiny_retinanet, synth, tmp_path):
    from kdctl.predict.onnx_runner import OnnxDetector

    det = load_detector(tiny_retinanet)
    torch.manual_seed(0)
    with torch.no_grad():  # distinct scores: no ties for the two runtimes to break differently
        for p in det.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = str(det.save(tmp_path / "m"))
    export_model(spec, "onnx", tmp_path / "fp32", imgsz=64)
    res = export_model(spec, "onnx", tmp_path / "fp16", imgsz=64, half=True)
    assert res.onnx["precision"].startswith("float16 weights (") and res.onnx["dtype"] == "float32"
    size32, size16 = ((tmp_path / d / "model.onnx").stat().st_size for d in ("fp32", "fp16"))
    assert size16 < 0.55 * size32
    det = load_detector(spec).eval()
    src = sorted((synth / "images").iterdir())[:2]
    ref = det.predict_paths(src, conf=0.0).images
    for d, atol in (("fp32", 1e-4), ("fp16", FP16_RTOL)):
        got = OnnxDetector(tmp_path / d / "model.onnx").predict_paths(src, conf=0.0).images
        for a, b in zip(got, ref, strict=True):  # the best detection: same class, score and box
            assert a.labels[0] == b.labels[0] and abs(a.scores[0] - b.scores[0]) <= atol
            np.testing.assert_allclose(a.boxes[0], b.boxes[0], atol=100 * atol)
