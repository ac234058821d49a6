"""Every spec kind resolves and loads through the same code path; bad specs are one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from batches import save_tiny_detr

from kdctl.cli import main
from kdctl.errors import KdctlError
from kdctl.specs import list_presets, load_detector, resolve

NAMES = ["cat", "dog"]


def tiny_detr_dir(path: Path) -> Path:
    save_tiny_detr(path, NAMES, widths=(8, 8, 16, 16), num_queries=5)
    return path


def fake_hub_snapshot(cache: Path, repo_id: str, src: Path, revision: str = "main") -> Path:
    """Lay out ``src`` as huggingface_hub's cache does for ``repo_id`` at ``revision``."""
    commit = "0123456789abcdef0123456789abcdef01234567" if revision == "main" else "f" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def detr_dir(tmp_path_factory) -> Path:
    return tiny_detr_dir(tmp_path_factory.mktemp("detr") / "d")


def test_hf_dir(detr_dir):
    r = resolve(str(detr_dir))
    assert (r.kind, r.family, r.architecture) == ("hf_dir", "detr", "DetrForObjectDetection")
    det = load_detector(str(detr_dir))
    assert det.label_names == NAMES and det.family == "detr" and "kd-detr" in det.kd_methods()


def test_hub_id_and_revision_through_the_cache(detr_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_snapshot(tmp_path / "hub", "acme/tiny-detr", detr_dir)
    fake_hub_snapshot(tmp_path / "hub", "acme/tiny-detr", detr_dir, revision="v2")
    r = resolve("acme/tiny-detr")
    assert r.kind == "hf_dir" and r.hub_id == "acme/tiny-detr" and "snapshots" in str(r.path)
    det = load_detector("acme/tiny-detr")
    ref = load_detector(str(detr_dir))
    sd, rd = det.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(sd[k], rd[k]) for k in rd)
    assert resolve("acme/tiny-detr@v2").path.name == "f" * 40
    with pytest.raises(KdctlError, match="not in the local Hugging Face cache"):
        resolve("acme/missing-model")
    with pytest.raises(KdctlError, match="acme/tiny-detr"):
        resolve("acme/tiny-detr@nope")


def test_kdctl_dir_run_dir_and_files(tmp_path):
    det = load_detector("fasterrcnn-r18-fpn", label_names=NAMES, pretrained_backbone=False,
                        overrides={"fpn_channels": 16})
    saved = det.save(tmp_path / "run" / "best")
    (tmp_path / "run" / "config.toml").write_text("")
    assert resolve(str(saved)).kind == "kdctl_dir"
    assert resolve(str(tmp_path / "run")).path == saved  # a run directory means its best/ checkpoint
    assert resolve(str(saved / "model.safetensors")).path == saved  # a weights file inside a model dir
    back = load_detector(str(tmp_path / "run"))
    assert back.label_names == NAMES and back.architecture == "fasterrcnn"
    sd, rd = back.model.state_dict(), det.model.state_dict()
    assert all(torch.equal(sd[k], rd[k]) for k in rd)


def test_torchvision_and_preset_specs():
    r = resolve("torchvision:retinanet_resnet50_fpn_v2:DEFAULT")
    assert (r.kind, r.architecture, r.weights, r.family) == ("torchvision", "retinanet_resnet50_fpn_v2", "DEFAULT",
                                                               "cnn")
    with pytest.raises(KdctlError, match="fasterrcnn, retinanet, fcos"):
        resolve("torchvision:resnet50")
    presets = list_presets()
    for name in ("detr-r18", "detr-r50", "dab-detr-r18", "fasterrcnn-r18-fpn", "retinanet-r18-fpn"):
        assert name in presets
        r = resolve(name)
        assert r.kind == "preset" and r.family in ("cnn", "detr") and r.config


@pytest.mark.parametrize("spec, words", [
    ("./missing/dir", "does not exist"),
    ("nonsense", "unknown model spec"),
    ("", "empty model spec"),
])
def test_bad_specs(spec, words):
    with pytest.raises(KdctlError, match=words):
        resolve(spec)


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdctlError, match="not a model directory"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{oops")
    with pytest.raises(KdctlError, match="corrupt config"):
        resolve(str(tmp_path / "corrupt"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(KdctlError, match="model_type 'bert' is not supported"):
        resolve(str(tmp_path / "other"))
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "kdctl.json").write_text("[]")
    with pytest.raises(KdctlError, match="lacks 'family'"):
        resolve(str(tmp_path / "k"))


def test_truncated_weights_are_one_line(detr_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(detr_dir, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err


def test_inspect_json(detr_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(detr_dir), "--json"])
    assert e.value.code in (0, None)
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "detr" and info["class"] == "DetrForObjectDetection"
    assert info["label_names"] == NAMES and info["num_labels"] == 2 and info["kd_methods"] == ["kd-detr", "pred-kd"]
    assert info["parameters"] == sum(p.numel() for p in load_detector(str(detr_dir)).model.parameters())


def test_inspect_torchvision_names_drkd(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "torchvision:fcos_resnet50_fpn"])
    out = capsys.readouterr().out
    assert e.value.code in (0, None) and "drkd" in out and "FCOS" in out


def test_eval_command_on_a_model(detr_dir, tiny_coco, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(detr_dir), "--data", str(tiny_coco), "--device", "cpu", "--batch-size", "2",
              "--workers", "0", "--imgsz", "64", "--output", str(tmp_path / "runs"), "--json", str(tmp_path / "m.json")])
    assert e.value.code in (0, None)
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"} and m["num_images"] == 4
    assert set(m["per_class"]) == set(NAMES)
    preds = json.loads((tmp_path / "runs" / "eval" / "exp" / "predictions.json").read_text())
    assert preds and {p["category_id"] for p in preds} <= {1, 2}
    out = capsys.readouterr().out
    assert "AP per class" in out and "images/s" in out


def test_eval_class_mismatch_names_the_class(detr_dir, tmp_path, capsys):
    from conftest import write_coco

    root = write_coco(tmp_path / "d", [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0}],
                      [{"id": 1, "name": "Zebra"}])
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(detr_dir), "--data", str(root), "--device", "cpu", "--workers", "0",
              "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'Zebra'" in err and "--label-map" in err
    (tmp_path / "map.json").write_text(json.dumps({"zebra": "CAT"}))  # case-insensitive both ways
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(detr_dir), "--data", str(root), "--device", "cpu", "--workers", "0",
              "--output", str(tmp_path / "runs"), "--label-map", str(tmp_path / "map.json"), "--imgsz", "64"])
    assert e.value.code in (0, None)


def test_predict_images_matches_the_dataset_path(detr_dir, tiny_coco):
    import kdctl
    from kdctl.data.batch import collate
    from kdctl.data.coco import load_coco
    from kdctl.data.dataset import CocoDetection

    det = kdctl.load(str(detr_dir))
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    ds = CocoDetection(cd, 64, train=False)
    ref = det.predict(collate([ds[0], ds[1]]), score_threshold=0.0)
    out = det.predict_images([tiny_coco / "images" / "a.png", tiny_coco / "images" / "b.png"], imgsz=64,
                             score_threshold=0.0)
    for r, o in zip(ref, out, strict=True):
        assert torch.allclose(r["boxes"], torch.tensor(o["boxes"]).reshape(-1, 4), atol=1e-4)
        assert o["names"] == [NAMES[i] for i in o["labels"]]
    assert max(b[2] for b in out[0]["boxes"]) <= 96 and max(b[3] for b in out[1]["boxes"]) <= 80  # original frame
