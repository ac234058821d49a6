"""kdctl predict / Detector.predict_paths: the same detections as predict_images, COCO results and YOLO labels
that say what was drawn, ONNX graphs in onnxruntime, videos, class filter and NMS, one-line refusals.

A tiny DETR (random weights, perturbed so that its queries differ) and the PNG images of ``tiny_coco``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from batches import save_tiny_detr
from clitools import invoke

from kdctl.errors import KdctlError
from kdctl.specs import load_detector

NAMES = ["cat", "dog"]


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> Path:  # jitter: distinct boxes and scores per query
    return Path(save_tiny_detr(tmp_path_factory.mktemp("detr") / "m", NAMES, jitter=0.3))


def images(tiny_coco: Path) -> list[Path]:
    return sorted((tiny_coco / "images").glob("*.png"))


def test_predict_paths_writes_what_predict_images_finds(detr_dir, tiny_coco, tmp_path):
    det = load_detector(str(detr_dir)).eval()
    det.imgsz = 64
    files = images(tiny_coco)
    res = det.predict_paths([tiny_coco / "images"], conf=0.0, save_dir=tmp_path, save_txt=True, batch_size=1)
    ref = [det.predict_images([f], score_threshold=0.0)[0] for f in files]
    assert [r.path for r in res.images] == files and len(res.images) == 4
    for r, want in zip(res.images, ref, strict=True):  # the file API and the image API agree
        np.testing.assert_allclose(r.boxes, want["boxes"], atol=1e-3)
        np.testing.assert_allclose(r.scores, want["scores"], atol=1e-5)
        assert r.names == want["names"] and len(r.labels) == 8
    coco = json.loads((tmp_path / "predictions.json").read_text())
    first = [e for e in coco if e["image_id"] == 1]
    x0, y0, x1, y1 = res.images[0].boxes[0]
    assert first[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
    assert first[0]["category_id"] == res.images[0].labels[0] + 1
    cats = json.loads((tmp_path / "images.json").read_text())["categories"]
    assert [c["name"] for c in cats] == NAMES and cats[0]["id"] == 1
    line = (tmp_path / "labels" / f"{files[0].stem}.txt").read_text().splitlines()[0].split()
    w, h = res.images[0].width, res.images[0].height
    assert int(line[0]) == res.images[0].labels[0] and len(line) == 5
    assert float(line[1]) == pytest.approx((x0 + x1) / 2 / w, abs=1e-5)
    assert float(line[4]) == pytest.approx((y1 - y0) / h, abs=1e-5)
    from PIL import Image

    src = np.asarray(Image.open(files[0]).convert("RGB"), dtype=float)
    drawn = np.asarray(Image.open(tmp_path / files[0].name).convert("RGB"), dtype=float)
    assert drawn.shape == src.shape and np.abs(drawn - src).mean() > 1.0  # boxes were drawn, PNG kept lossless


def test_classes_and_classwise_nms(detr_dir, tiny_coco):
    from torchvision.ops import box_iou

    det = load_detector(str(detr_dir)).eval()
    det.imgsz = 64
    src = [images(tiny_coco)[0]]
    every = det.predict_paths(src, conf=0.0).images[0]
    only_dog = det.predict_paths(src, conf=0.0, classes=["DOG"]).images[0]
    assert set(only_dog.names) <= {"dog"} and len(only_dog.labels) == every.names.count("dog")
    nms = det.predict_paths(src, conf=0.0, iou=0.3).images[0]
    boxes, labels = torch.tensor(nms.boxes), torch.tensor(nms.labels)
    assert 0 < len(nms.labels) < len(every.labels)  # overlapping boxes of a class were removed
    for c in labels.unique():
        b = boxes[labels == c]
        iou = box_iou(b, b) - torch.eye(len(b))
        assert float(iou.max()) <= 0.3 + 1e-6
    with pytest.raises(KdctlError, match="--classes 'bird'"):
        det.predict_paths(src, classes=["bird"])


def test_onnx_graph_predicts_as_pytorch_fp32_and_fp16(detr_dir, tiny_coco, tmp_path):
    from kdctl.export import export_model
    from kdctl.predict.onnx_runner import OnnxDetector

    det = load_detector(str(detr_dir)).eval()
    det.imgsz = 64
    ref = det.predict_paths([tiny_coco / "images"], conf=0.0).images
    for half, tol in ((False, 1e-4), (True, 2e-2)):
        out = tmp_path / f"onnx{int(half)}"
        export_model(str(detr_dir), "onnx", out, imgsz=64, half=half)
        graph = OnnxDetector(out / "model.onnx")
        got = graph.predict_paths([tiny_coco / "images"], conf=0.0).images
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(sorted(a.scores), sorted(b.scores), atol=tol)
            if not half:
                np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
    meta = json.loads((tmp_path / "onnx1" / "model.onnx.json").read_text())
    assert meta["dtype"] == "float16" and meta["inputs"][0]["dtype"] == "float16"


def test_cli_predict_auto_numbers_runs_and_refuses_bad_input(detr_dir, tiny_coco, tmp_path, capsys):
    base = ["predict", "--model", str(detr_dir), "--device", "cpu", "--imgsz", "64", "--output", str(tmp_path)]
    code, out, _ = invoke([*base, str(tiny_coco / "images" / "a.png"), str(tiny_coco / "images" / "*.png")], capsys)
    assert code == 0 and "detections per image" in out and "a.png" in out
    assert len(list((tmp_path / "predict" / "exp").glob("*.png"))) == 4  # a.png once, though named twice
    code, _, _ = invoke([*base, str(tiny_coco / "images"), "--no-save"], capsys)
    exp2 = tmp_path / "predict" / "exp2"
    assert code == 0 and (exp2 / "predictions.json").is_file() and not list(exp2.glob("*.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad, says in [(tmp_path / "nothing", "no such file"), (tmp_path / "empty", "no images or videos"),
                      (tmp_path / "notes.txt", "not an image or video"), (tmp_path / "x" / "*.jpg", "matches no")]:
        code, _, err = invoke([*base, str(bad)], capsys)
        assert code == 2 and err.startswith("error:") and says in err and err.count("\n") == 1, err
    code, _, err = invoke([*base, str(tiny_coco / "images"), "--save-dir", str(exp2)], capsys)
    assert code == 2 and "nothing is overwritten" in err
    assert sorted(p.name for p in (tmp_path / "predict").iterdir()) == ["exp", "exp2"]  # refusals made no run


def test_video_frames_and_unreadable_video(detr_dir, tmp_path):
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, dtype=np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    det = load_detector(str(detr_dir)).eval()
    det.imgsz = 64
    seen = []
    res = det.predict_paths([video], conf=0.0, save_dir=tmp_path / "out", progress=lambda d, t: seen.append(d))
    assert [r.frame for r in res.images] == [0, 1, 2] and (res.images[0].width, res.images[0].height) == (64, 48)
    assert sorted(p.name for p in (tmp_path / "out" / "clip").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert seen[-1] == 3
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(KdctlError, match="broken.mp4: cannot read the video"):
        det.predict_paths([bad])


def test_no_video_reader_is_one_line(monkeypatch, tmp_path):
    import importlib.util

    from kdctl.predict import sources

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    (tmp_path / "v.mp4").write_bytes(b"x")
    with pytest.raises(KdctlError, match="needs PyAV"):
        sources.collect_sources([tmp_path / "v.mp4"])
