"""Dataset formats (COCO layouts incl. Roboflow, YOLO, Pascal VOC, Hugging Face datasets), detection, --format,
bad input, and ``kdctl data convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_coco

from kdctl.cli import main
from kdctl.data.coco import detect_format, open_split, present_splits
from kdctl.errors import KdctlError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def image(path: Path, w: int, h: int, orientation: int = 1) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pic = Image.new("RGB", (w, h), (90, 30, 160))
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        pic.save(path, exif=exif.tobytes())
    else:
        pic.save(path)
    return path


def yolo_folder(root: Path, lines: dict[str, str], names_yaml: str = "names: {0: cat, 1: dog}") -> Path:
    """images/{train,val}/a.png (100x50) and b.png (60x80), with labels/SPLIT/a.txt from ``lines``."""
    for s in ("train", "val"):
        image(root / "images" / s / "a.png", 100, 50)
        image(root / "images" / s / "b.png", 60, 80)
        for stem, text in lines.items():
            (root / "labels" / s).mkdir(parents=True, exist_ok=True)
            (root / "labels" / s / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n{names_yaml}\n")
    return root


def boxes(cd) -> list[tuple]:
    name = dict(zip(cd.cat_ids, cd.names, strict=True))
    files = {im["id"]: Path(im["file_name"]).name for im in cd.images}
    return sorted((files[a["image_id"]], name[a["category_id"]], *(round(v, 6) for v in a["bbox"]), a["iscrowd"])
                  for a in cd.coco["annotations"])


def test_convert_help_does_not_import_torch():
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdctl", "data", "convert", "--help"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), timeout=60)
    assert p.returncode == 0 and "--to" in p.stdout and "--format" in p.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "torchvision", "numpy", "yaml", "datasets"}


# --------------------------------------------------------------------------- YOLO
def test_yolo_boxes_in_pixels_names_from_yaml(tmp_path):
    root = yolo_folder(tmp_path / "y", {"a": "1 0.5 0.5 0.2 0.4\n\n0 0.25 0.1 0.5 0.2\n", "b": "0 0.5 0.5 1 1\n"})
    assert detect_format(root) == "yolo" and present_splits(root) == ("yolo", ["train", "val"])
    cd = open_split(root, "val")
    assert cd.names == ["cat", "dog"] and cd.image_dir == root / "images" / "val"
    assert boxes(cd) == [("a.png", "cat", 0.0, 0.0, 50.0, 10.0, 0), ("a.png", "dog", 40.0, 15.0, 20.0, 20.0, 0),
                         ("b.png", "cat", 0.0, 0.0, 60.0, 80.0, 0)]
    assert {im["file_name"]: (im["width"], im["height"]) for im in cd.images} == {"a.png": (100, 50), "b.png": (60, 80)}
    assert cd.warnings == []


def test_yolo_size_is_the_exif_oriented_one(tmp_path):
    root = yolo_folder(tmp_path / "y", {"c": "0 0.5 0.25 1 0.5\n"}, "names: [cat]")
    image(root / "images" / "train" / "c.jpg", 40, 20, orientation=6)  # stored 40x20, shown 20x40
    cd = open_split(root, "train")
    c = next(im for im in cd.images if im["file_name"] == "c.jpg")
    assert (c["width"], c["height"]) == (20, 40) and c["id"] in cd.apply_exif
    assert [a["bbox"] for a in cd.anns_by_image[c["id"]]] == [[0.0, 0.0, 20.0, 20.0]]


def test_yolo_roboflow_style_paths_and_list_file(tmp_path):
    root = tmp_path / "rf"
    image(root / "train" / "images" / "a.png", 100, 50)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    image(root / "valid" / "images" / "v.png", 100, 50)
    (root / "val.txt").write_text("./valid/images/v.png\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: val.txt\nnc: 1\nnames: ['cell']\n")
    assert boxes(open_split(root, "train")) == [("a.png", "cell", 40.0, 15.0, 20.0, 20.0, 0)]
    val = open_split(root, "val")
    assert [im["file_name"] for im in val.images] == ["v.png"] and val.coco["annotations"] == []


def test_yolo_bad_labels_are_one_fatal_line_each(tmp_path, capsys):
    root = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.4\n99 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n"
                                             "1 1.5 0.5 0.1 0.1\n7 0.5 0.5 0.1 0.1\n0 x 0.5 0.1 0.1\n"})
    with pytest.raises(KdctlError) as e:
        open_split(root, "train")
    msg = str(e.value)
    assert msg.splitlines()[0].endswith("invalid YOLO dataset")
    assert "class indices outside names (0-1): 2 (e.g. labels/train/a.txt:2: class 99)" in msg
    assert "label lines without 5 columns (class cx cy w h): 1 (e.g. labels/train/a.txt:3:" in msg
    assert "label coordinates outside [0, 1]: 1 (e.g. labels/train/a.txt:4:" in msg
    assert "label values that are not numbers: 1" in msg
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code == 2 and out.startswith("error: ") and "Traceback" not in out and "class 99" in out


def test_yolo_bad_yaml(tmp_path):
    root = yolo_folder(tmp_path / "y", {}, "names: {0: cat}\nnc: 3")
    with pytest.raises(KdctlError, match="nc is 3 but names has 1"):
        open_split(root, "train")
    (root / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(KdctlError, match="no class names"):
        open_split(root, "train")
    (root / "data.yaml").write_text("names: [a]\ntrain: images/nope\n")
    with pytest.raises(KdctlError, match="images/nope .* does not exist"):
        open_split(root, "train")
    with pytest.raises(KdctlError, match="has no 'val' split"):
        open_split(root, "val")


# --------------------------------------------------------------------------- COCO: Roboflow
def test_roboflow_export(tmp_path, capsys):
    root = tmp_path / "rf"
    cats = [{"id": 0, "name": "cells", "supercategory": "none"}, {"id": 1, "name": "RBC", "supercategory": "cells"},
            {"id": 2, "name": "WBC", "supercategory": "cells"}]
    for folder in ("train", "valid"):
        image(root / folder / f"{folder}.png", 64, 48)
        coco = {"images": [{"id": 5, "file_name": f"{folder}.png", "width": 64, "height": 48}],
                "annotations": [{"id": 1, "image_id": 5, "category_id": 2, "bbox": [1.5, 2, 10, 20]}],
                "categories": cats}
        (root / folder / "_annotations.coco.json").write_text(json.dumps(coco))
    assert present_splits(root) == ("coco", ["train", "val"])
    cd = open_split(root, "val")
    assert cd.names == ["RBC", "WBC"] and cd.image_dir == root / "valid"
    assert boxes(cd) == [("valid.png", "WBC", 1.5, 2.0, 10.0, 20.0, 0)]
    assert any(w.startswith("valid/_annotations.coco.json: Roboflow project categories") for w in cd.warnings)
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code in (0, None) and "RBC" in out


# --------------------------------------------------------------------------- Pascal VOC
def voc_xml(name: str, objects: list[tuple], size: bool = True) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    sz = "<size><width>80</width><height>60</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{name}.jpg</filename>{sz}{objs}</annotation>"


def voc_folder(root: Path, size: bool = True) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("t1", "v1"):
        image(root / "JPEGImages" / f"{stem}.jpg", 80, 60)
    t1 = [("dog", (1, 1, 20, 30), 0), ("dog", (30, 5, 50, 25), 1)]
    (root / "Annotations" / "t1.xml").write_text(voc_xml("t1", t1))
    (root / "Annotations" / "v1.xml").write_text(voc_xml("v1", [("bird", (11, 21, 40, 50), 0)], size=size))
    (root / "ImageSets" / "Main" / "train.txt").write_text("t1\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("v1\n")
    return root


def test_voc_boxes_difficult_and_shared_names(tmp_path):
    import torch

    from kdctl.data.dataset import CocoDetection

    root = voc_folder(tmp_path / "voc")
    assert detect_format(root) == "voc"
    cd = open_split(root, "train")
    assert cd.names == ["bird", "dog"]  # bird only appears in val: every split's names, sorted
    assert boxes(cd) == [("t1.jpg", "dog", 0.0, 0.0, 20.0, 30.0, 0), ("t1.jpg", "dog", 29.0, 4.0, 21.0, 21.0, 1)]
    _, target = CocoDetection(cd, imgsz=80, train=False)[0]
    assert target["labels"].tolist() == [1]  # the difficult box is no training target
    gt = cd.pycocotools()
    assert [a["iscrowd"] for a in gt.loadAnns(gt.getAnnIds())] == [0, 1]  # ...and ignored by the evaluation
    assert torch.allclose(target["boxes"], torch.tensor([[0.0, 0.0, 20.0, 30.0]]))


def test_voc_without_size_is_fatal(tmp_path, capsys):
    root = voc_folder(tmp_path / "voc", size=False)
    code, out = run_cli(["data", "check", str(root), "--split", "val"], capsys)
    assert code == 2 and "invalid Pascal VOC dataset" in out and "Traceback" not in out
    assert "XML files without <size> (width and height): 1 (e.g. " in out and "v1.xml" in out


# --------------------------------------------------------------------------- Hugging Face datasets
def hf_rows(src: Path) -> dict[str, list]:
    image(src / "p.png", 50, 40)
    image(src / "q.png", 30, 20)
    return {"image": [str(src / "p.png"), str(src / "q.png")],
            "objects": [{"bbox": [[1.0, 2.0, 10.0, 12.5]], "category": [1]}, {"bbox": [], "category": []}]}


def test_hf_save_to_disk_images_cached_byte_for_byte(tmp_path, monkeypatch):
    D = pytest.importorskip("datasets")
    monkeypatch.setenv("KDCTL_CACHE", str(tmp_path / "cache"))
    rows = hf_rows(tmp_path / "src")
    feats = D.Features({"image": D.Image(), "objects": D.Sequence(
        {"bbox": D.Sequence(D.Value("float32"), length=4), "category": D.ClassLabel(names=["ant", "bee"])})})
    ds = D.Dataset.from_dict(rows, features=feats)
    D.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    root = tmp_path / "hf"
    assert detect_format(root) == "hf" and present_splits(root) == ("hf", ["train", "val"])
    cd = open_split(root, "val")
    assert cd.names == ["ant", "bee"] and boxes(cd) == [("p.png", "bee", 1.0, 2.0, 10.0, 12.5, 0)]
    assert (tmp_path / "cache") in cd.image_dir.parents
    cached = cd.image_dir / "p.png"
    assert cached.read_bytes() == (tmp_path / "src" / "p.png").read_bytes()
    stamp = cached.stat().st_mtime_ns
    assert open_split(root, "val").image_dir == cd.image_dir and cached.stat().st_mtime_ns == stamp  # not rewritten


def test_hf_parquet_list_of_dicts_with_paths(tmp_path):
    D = pytest.importorskip("datasets")
    rows = hf_rows(tmp_path / "src")
    rows["objects"] = [[{"bbox": b, "category": c} for b, c in zip(o["bbox"], o["category"], strict=True)]
                       for o in rows["objects"]]
    feats = D.Features({"image": D.Value("string"), "objects": [
        {"bbox": D.Sequence(D.Value("float32"), length=4), "category": D.ClassLabel(names=["ant", "bee"])}]})
    (tmp_path / "pq" / "data").mkdir(parents=True)
    D.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    cd = open_split(tmp_path / "pq", "train")
    assert cd.image_dir == tmp_path / "src" and boxes(cd) == [("p.png", "bee", 1.0, 2.0, 10.0, 12.5, 0)]


def test_hf_without_objects_is_fatal(tmp_path, capsys):
    D = pytest.importorskip("datasets")
    rows = hf_rows(tmp_path / "src")
    D.Dataset.from_dict({"image": rows["image"], "label": [0, 1]}).save_to_disk(str(tmp_path / "hf"))
    code, out = run_cli(["data", "check", str(tmp_path / "hf")], capsys)
    assert code == 2 and "invalid Hugging Face dataset" in out and "no 'objects' column" in out
    assert "columns: image, label" in out and "Traceback" not in out


# --------------------------------------------------------------------------- --format
def test_format_is_forced_and_checked(tmp_path, tiny_coco, capsys):
    root = yolo_folder(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.4\n"})
    with pytest.raises(KdctlError, match="--format voc"):
        open_split(root, "train", format="voc")  # not a VOC folder: its own error
    with pytest.raises(KdctlError, match="expected one of auto, coco, yolo, voc, hf"):
        open_split(root, "train", format="darknet")
    with pytest.raises(KdctlError, match="give COCO files"):
        open_split(root, "train", ann=tiny_coco / "train.json", format="yolo")
    assert len(open_split(None, "train", ann=tiny_coco / "train.json", images=tiny_coco / "images").images) == 4
    code, out = run_cli(["data", "check", str(tiny_coco), "--format", "yolo"], capsys)
    assert code == 2 and "data.yaml" in out


def test_run_config_format_reaches_open_data(tmp_path):
    from kdctl.engine.build import open_data
    from kdctl.engine.config import RunConfig

    root = yolo_folder(tmp_path / "y", {"a": "1 0.5 0.5 0.2 0.4\n"})
    assert RunConfig().format == "auto"
    data = open_data(RunConfig(data=str(root)), warn=print)
    assert data.names == ["cat", "dog"] and len(data.train.coco["annotations"]) == 1
    with pytest.raises(KdctlError, match="data.yaml"):
        open_data(RunConfig(data=str(root), format="coco"), warn=print)


# --------------------------------------------------------------------------- data convert
def test_convert_round_trip_coco_yolo_coco(tmp_path, capsys):
    images = [{"id": 3, "file_name": "a.png", "width": 640, "height": 480},
              {"id": 9, "file_name": "b.png", "width": 333, "height": 517}]
    anns = [{"id": 1, "image_id": 3, "category_id": 7, "bbox": [10.123456, 20.654321, 100.5, 33.333333]},
            {"id": 2, "image_id": 3, "category_id": 4, "bbox": [0, 0, 640, 480]},
            {"id": 3, "image_id": 9, "category_id": 7, "bbox": [300.001, 500.002, 32.999, 17.0]},
            {"id": 4, "image_id": 9, "category_id": 4, "bbox": [1, 1, 5, 5], "iscrowd": 1}]
    src = write_coco(tmp_path / "src", images, anns, [{"id": 7, "name": "zebra"}, {"id": 4, "name": "ant"}])
    code, out = run_cli(["data", "convert", str(src), str(tmp_path / "y"), "--to", "yolo"], capsys)
    assert code in (0, None) and "crowd boxes left out" in out
    assert "names:\n- ant\n- zebra" in (tmp_path / "y" / "data.yaml").read_text()
    assert (tmp_path / "y" / "labels" / "train" / "a.txt").read_text().splitlines()[0].startswith("1 0.094")
    code, out = run_cli(["data", "convert", str(tmp_path / "y"), str(tmp_path / "c"), "--to", "coco"], capsys)
    assert code in (0, None)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["images", "train.json", "val.json"]
    a, b = boxes(open_split(src, "train")), boxes(open_split(tmp_path / "c", "train"))
    a = [x for x in a if not x[-1]]  # YOLO has no crowd flag
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert max(abs(u - v) for x, y in zip(a, b, strict=True) for u, v in zip(x[2:6], y[2:6], strict=True)) < 1e-3


def test_convert_writes_nothing_on_bad_input_or_busy_destination(tmp_path, tiny_coco, capsys):
    root = yolo_folder(tmp_path / "y", {"a": "9 0.5 0.5 0.2 0.4\n"})
    code, out = run_cli(["data", "convert", str(root), str(tmp_path / "out"), "--to", "coco"], capsys)
    assert code == 2 and "class 9" in out and not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    code, out = run_cli(["data", "convert", str(tiny_coco), str(tmp_path / "busy"), "--to", "yolo"], capsys)
    assert code == 2 and "not an empty folder" in out
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    code, out = run_cli(["data", "convert", str(tiny_coco), str(tmp_path / "z"), "--to", "voc"], capsys)
    assert code == 2 and "--to voc" in out and not (tmp_path / "z").exists()
    (tmp_path / "empty").mkdir()
    code, _ = run_cli(["data", "convert", str(tiny_coco), str(tmp_path / "empty"), "--to", "coco"], capsys)
    assert code in (0, None) and json.loads((tmp_path / "empty" / "val.json").read_text())["annotations"][0]["bbox"] \
        == [4.0, 6.0, 30.0, 20.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
