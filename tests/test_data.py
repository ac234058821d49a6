"""COCO folder layouts, validation (fatal vs fixable problems), the Dataset and the collated Batch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_coco

from kdctl.cli import main
from kdctl.data.batch import collate
from kdctl.data.coco import find_split, load_coco, load_label_map
from kdctl.data.dataset import CocoDetection, make_loader
from kdctl.errors import KdctlError

IMG = {"id": 1, "file_name": "a.png", "width": 64, "height": 48}
CATS = [{"id": 1, "name": "cat"}]


def ann(i, **kw):
    a = {"id": i, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0}
    a.update(kw)
    return a


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


# (what to write, expected words in the one error line per kind)
FATAL_CASES = {
    "unknown image id": ([IMG], [ann(1, image_id=7)], CATS, "annotations of unknown image ids: 1"),
    "unknown category": ([IMG], [ann(1, category_id=9)], CATS, "unknown category ids: 1"),
    "negative box": ([IMG], [ann(1, bbox=[1, 1, -5, 5])], CATS, "negative width or height: 1"),
    "outside box": ([IMG], [ann(1, bbox=[100, 100, 5, 5])], CATS, "entirely outside their image: 1"),
    "malformed bbox": ([IMG], [ann(1, bbox=[1, 2, 3])], CATS, "malformed or non-finite bbox"),
    "nan bbox": ([IMG], [ann(1, bbox=[1, 2, float("nan"), 3])], CATS, "malformed or non-finite bbox"),
    "duplicate image ids": ([IMG, dict(IMG)], [ann(1)], CATS, "duplicate image ids: 1"),
    "duplicate ann ids": ([IMG], [ann(1), ann(1)], CATS, "duplicate annotation ids: 1"),
    "duplicate cat ids": ([IMG], [ann(1)], CATS + [{"id": 1, "name": "dog"}], "duplicate category ids: 1"),
    "no categories": ([IMG], [], [], "no categories"),
    "no images": ([], [], CATS, "no images"),
    "image without size": ([{"id": 1, "file_name": "a.png", "width": 0, "height": 48}], [], CATS, "positive width"),
}


@pytest.mark.parametrize("case", sorted(FATAL_CASES))
def test_fatal_problem_is_one_line_and_exit_2(tmp_path, capsys, case):
    images, anns, cats, expected = FATAL_CASES[case]
    root = write_coco(tmp_path / "d", images, anns, cats, draw=False)
    for im in images:  # image files exist unless the case is about them
        if im.get("width", 0) > 0:
            from PIL import Image

            Image.new("RGB", (im["width"], im["height"])).save(root / "images" / im["file_name"])
    with pytest.raises(KdctlError) as e:
        load_coco(root / "val.json", root / "images")
    assert expected in str(e.value)
    code, out = run_cli(["data", "check", str(root), "--split", "val"], capsys)
    assert code == 2 and "Traceback" not in out and expected in out
    # eval validates the data before loading any model: the bogus spec is never reached
    code, out = run_cli(["eval", "--model", "no-such-preset", "--data", str(root), "--device", "cpu"], capsys)
    assert code == 2 and expected in out


def test_several_problems_reported_together_with_counts(tmp_path):
    anns = [ann(1, image_id=7), ann(2, image_id=8), ann(3, bbox=[1, 1, -5, 5])]
    root = write_coco(tmp_path / "d", [IMG, {"id": 2, "file_name": "missing.png", "width": 8, "height": 8}],
                      anns, CATS, draw=False)
    from PIL import Image

    Image.new("RGB", (64, 48)).save(root / "images" / "a.png")
    with pytest.raises(KdctlError) as e:
        load_coco(root / "val.json", root / "images")
    lines = str(e.value).splitlines()
    assert any("unknown image ids: 2" in ln for ln in lines)
    assert any("negative width or height: 1" in ln for ln in lines)
    assert any("missing image files: 1" in ln for ln in lines)


def test_fixable_problems_are_fixed_with_counts(tmp_path):
    anns = [ann(1), ann(2, bbox=[5, 5, 0, 7]), ann(3, bbox=[5, 5, 0.5, 7]), ann(4, bbox=[50, 40, 30, 30])]
    root = write_coco(tmp_path / "d", [IMG], anns, CATS)
    cd = load_coco(root / "val.json", root / "images")
    assert [a["id"] for a in cd.coco["annotations"]] == [1, 4]
    assert cd.coco["annotations"][1]["bbox"] == [50.0, 40.0, 14.0, 8.0]  # clipped to the 64x48 image
    text = " ".join(cd.warnings)
    assert "degenerate boxes" in text and ": 2" in text and "clipped: 1" in text


def test_missing_files_and_folders(tmp_path, capsys):
    code, out = run_cli(["data", "check", str(tmp_path / "nope")], capsys)
    assert code == 2 and "does not exist" in out
    (tmp_path / "empty").mkdir()
    code, out = run_cli(["data", "check", str(tmp_path / "empty"), "--split", "val"], capsys)
    assert code == 2 and "no annotations for split 'val'" in out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "val.json").write_text("{not json")
    code, out = run_cli(["data", "check", str(tmp_path / "bad"), "--split", "val"], capsys)
    assert code == 2 and "not valid JSON" in out and "Traceback" not in out
    (tmp_path / "bad" / "val.json").write_text(json.dumps({"images": []}))
    code, out = run_cli(["data", "check", str(tmp_path / "bad"), "--split", "val"], capsys)
    assert code == 2 and "categories" in out


def test_missing_image_file(tmp_path):
    root = write_coco(tmp_path / "d", [IMG], [ann(1)], CATS, draw=False)
    with pytest.raises(KdctlError, match="missing image files: 1"):
        load_coco(root / "val.json", root / "images")


def test_official_layout_and_overrides(tmp_path, tiny_coco):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text((tiny_coco / "val.json").read_text())
    for f in (tiny_coco / "images").iterdir():
        (root / "val2017" / f.name).write_bytes(f.read_bytes())
    a, i = find_split(root, "val")
    assert a == root / "annotations" / "instances_val2017.json" and i == root / "val2017"
    assert len(load_coco(a, i).images) == 4
    a, i = find_split(None, "val", ann=tiny_coco / "val.json", images=tiny_coco / "images")
    assert (a, i) == (tiny_coco / "val.json", tiny_coco / "images")


def test_dataset_resizes_longer_side_and_keeps_boxes_aligned(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    assert cd.names == ["cat", "dog"] and cd.cat_ids == [1, 2]
    ds = CocoDetection(cd, imgsz=48, train=False)
    img, t = ds[0]  # 96x64 -> 48x32: scale 0.5
    assert tuple(img.shape) == (3, 32, 48) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert torch.allclose(t["boxes"], torch.tensor([[2.0, 3.0, 17.0, 13.0], [25.0, 5.0, 45.0, 25.0]]))
    assert t["labels"].tolist() == [0, 1] and t["orig_size"] == (64, 96)
    # the image with no annotation gives an empty target
    img, t = ds[3]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_flip_moves_boxes_with_pixels(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    ds = CocoDetection(cd, imgsz=96, train=True, hflip=1.0)
    img, t = ds[0]
    # the first box [4, 6, 30, 20] of a 96-wide image flips to x in [62, 92]
    assert torch.allclose(t["boxes"][0], torch.tensor([62.0, 6.0, 92.0, 26.0]))
    # the drawn rectangle flipped with it: the pixel inside the flipped box is the box colour, not background
    assert img[:, 15, 80].sub(torch.tensor([40, 40, 40]) / 255).abs().max() > 0.2


def test_collate_pads_and_records_sizes(tiny_coco):
    cd = load_coco(tiny_coco / "val.json", tiny_coco / "images")
    ds = CocoDetection(cd, imgsz=64, train=False)
    batch = next(iter(make_loader(ds, 2, shuffle=False)))
    assert batch.images.shape == (2, 3, 64, 64)  # 64x42 and 51x64 (torchvision floors), padded to multiples of 32
    assert batch.sizes == [(42, 64), (64, 51)] and batch.orig_sizes == [(64, 96), (80, 64)]
    mask = batch.pixel_mask()
    assert mask[0, :42, :64].all() and not mask[0, 42:].any() and not mask[1, :, 51:].any()
    assert batch.image_ids == [1, 2]
    b2 = collate([ds[0]], stride=32)
    assert torch.equal(b2.images[0], batch.images[0])


def test_label_map_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"RBC": "red blood cell"}))
    assert load_label_map(p) == {"RBC": "red blood cell"}
    p.write_text("[1, 2]")
    with pytest.raises(KdctlError, match="JSON object"):
        load_label_map(p)


def test_bccd_is_valid():
    from conftest import BCCD

    if not BCCD.exists():
        pytest.skip("shared BCCD data not present")
    a, i = find_split(BCCD, "val")
    cd = load_coco(a, i)
    assert cd.names == ["RBC", "WBC", "Platelets"] and len(cd.images) == 87 and not cd.warnings
