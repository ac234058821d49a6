"""Tests of kdctl.data.synth: determinism, COCO validity, splits, box tightness, refusal to overwrite."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycocotools.coco import COCO  # noqa: E402

from kdctl.data.synth import CLASSES, render_image, split_counts, synthesize  # noqa: E402
from kdctl.errors import KdctlError  # noqa: E402

SMALL = (64, 112)  # image sides for fast tests


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, synthesize(out, 30, seed=3, size=SMALL)


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / f"{split}.json"))


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert synthesize(a, 6, seed=11, size=SMALL) == synthesize(b, 6, seed=11, size=SMALL)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) == 6 + 3 and ha == hb
    synthesize(c, 6, seed=12, size=SMALL)
    hc = _hashes(c)
    assert all(ha[k] != hc[k] for k in ha if k.startswith("images"))


def test_jpeg_output(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 3, seed=2, size=SMALL, image_format="jpg")
    synthesize(tmp_path / "b", 3, seed=2, size=SMALL, image_format="jpg")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    coco = _load(tmp_path / "a", "train")
    name = next(iter(coco.imgs.values()))["file_name"]
    assert name.endswith(".jpg") and Image.open(tmp_path / "a/images" / name).format == "JPEG"


def test_image_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", 4, seed=5, size=SMALL)
    synthesize(tmp_path / "b", 9, seed=5, size=SMALL)
    for name in ("000001.png", "000004.png"):
        assert (tmp_path / "a/images" / name).read_bytes() == (tmp_path / "b/images" / name).read_bytes()


def test_coco_schema(dataset: tuple[Path, dict[str, int]]) -> None:
    root, counts = dataset
    assert counts == {"train": 21, "val": 6, "test": 3}
    image_ids, ann_ids = [], []
    for split, n in counts.items():
        raw = json.loads((root / f"{split}.json").read_text())
        assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
        assert raw["categories"] == [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
        coco = _load(root, split)
        assert len(coco.imgs) == n and len(coco.anns) == len(raw["annotations"]) >= n
        image_ids += list(coco.imgs)
        ann_ids += list(coco.anns)
        for img in coco.imgs.values():
            with Image.open(root / "images" / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
            assert SMALL[0] <= img["width"] <= SMALL[1] and SMALL[0] <= img["height"] <= SMALL[1]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 8
            for a in anns:
                x, y, w, h = a["bbox"]
                assert all(isinstance(v, float) for v in a["bbox"])
                assert x >= 0 and y >= 0 and w > 0 and h > 0
                assert x + w <= img["width"] and y + h <= img["height"]
                assert 0 < a["area"] <= w * h and a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(CLASSES)
    assert len(set(image_ids)) == len(image_ids) == 30
    assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))  # unique across the whole dataset
    assert len({w for c in counts for w in (i["width"] for i in _load(root, c).imgs.values())}) > 1  # sizes vary


@pytest.mark.parametrize("n", [3, 4, 5])
def test_every_split_non_empty_for_small_n(tmp_path: Path, n: int) -> None:
    counts = synthesize(tmp_path / "ds", n, seed=0, size=SMALL)
    assert sum(counts.values()) == n and min(counts.values()) >= 1
    for split, count in counts.items():
        assert len(json.loads((tmp_path / "ds" / f"{split}.json").read_text())["images"]) == count
    assert len(list((tmp_path / "ds/images").iterdir())) == n


def test_split_counts() -> None:
    assert split_counts(3, {"train": 0.7, "val": 0.2, "test": 0.1}) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(10, {"train": 0.7, "val": 0.2, "test": 0.1}) == {"train": 7, "val": 2, "test": 1}
    assert split_counts(1, {"train": 0.7, "val": 0.2, "test": 0.1}) == {"train": 1, "val": 0, "test": 0}
    assert split_counts(7, {"a": 1.0, "b": 1.0}) == {"a": 4, "b": 3}


def _isolated(boxes: list[list[float]], i: int, margin: int) -> bool:
    """True if box i, grown by ``margin`` px, touches no other box."""
    x, y, w, h = boxes[i]
    for j, (u, v, bw, bh) in enumerate(boxes):
        if j != i and u < x + w + margin and x - margin < u + bw and v < y + h + margin and y - margin < v + bh:
            return False
    return True


def _foreground(pix: np.ndarray, box: tuple[int, int, int, int], threshold: float = 70.0) -> np.ndarray:
    """bool [H, W]: pixels of box (x, y, w, h) grown by 2 px whose colour is far from the median of the 2-px ring
    around the box (the local background)."""
    x, y, w, h = box
    grown = np.zeros(pix.shape[:2], dtype=bool)
    grown[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
    inside = np.zeros_like(grown)
    inside[y:y + h, x:x + w] = True
    background = np.median(pix[grown & ~inside], axis=0)
    return grown & (np.linalg.norm(pix - background, axis=-1) > threshold)


def _pixel_box(fg: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(fg)
    return int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())


def test_boxes_are_tight(dataset: tuple[Path, dict[str, int]]) -> None:
    """For objects isolated from other boxes, the pixels that differ from the background of the box's border span
    exactly the annotated box (a box 1 px too loose or too tight fails), and their count is the area."""
    root, _ = dataset
    coco = _load(root, "train")
    checked = 0
    for img in coco.imgs.values():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        boxes = [a["bbox"] for a in anns]
        pix = np.asarray(Image.open(root / "images" / img["file_name"])).astype(np.float32)
        for i, ann in enumerate(anns):
            if not _isolated(boxes, i, margin=3):
                continue
            box = tuple(int(v) for v in ann["bbox"])
            assert box == tuple(ann["bbox"])  # integer pixel edges
            fg = _foreground(pix, box)
            assert _pixel_box(fg) == box, (img["file_name"], ann)
            assert fg.sum() == ann["area"]
            checked += 1
    assert checked >= 15


def test_render_image_single_object_box_and_area() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    for _ in range(20):
        image, objects = render_image(rng, 96, 80, max_objects=1)
        assert image.shape == (96, 80, 3) and image.dtype == np.uint8 and len(objects) == 1
        box = tuple(int(v) for v in objects[0].bbox)
        fg = _foreground(image.astype(np.float32), box)
        assert _pixel_box(fg) == box and fg.sum() == objects[0].area


def test_occlusion_keeps_objects_mostly_visible() -> None:
    """Later shapes cover earlier ones (some objects lose pixels and boxes overlap), but never below min_visible."""
    rng = np.random.Generator(np.random.PCG64(1))
    fractions, overlaps = [], 0
    for _ in range(12):
        _, objects = render_image(rng, 128, 128, max_objects=8, min_visible=0.6)
        boxes = [list(o.bbox) for o in objects]
        overlaps += sum(not _isolated(boxes, i, margin=0) for i in range(len(boxes)))
        fractions += [o.area / o.full_area for o in objects]
        assert all(0 < o.area <= o.bbox[2] * o.bbox[3] for o in objects)
    assert overlaps > 0 and min(fractions) >= 0.6 and sum(f < 1 for f in fractions) >= 3


def test_rejects_bad_input_and_never_overwrites(tmp_path: Path) -> None:
    with pytest.raises(KdctlError, match="positive"):
        synthesize(tmp_path / "x", 0)
    with pytest.raises(KdctlError, match="seed"):
        synthesize(tmp_path / "x", 3, seed=-1)
    with pytest.raises(KdctlError, match="size"):
        synthesize(tmp_path / "x", 3, size=(8, 16))
    with pytest.raises(KdctlError, match="min_object"):
        synthesize(tmp_path / "x", 3, size=SMALL, min_object=40)
    with pytest.raises(KdctlError, match="split name"):
        synthesize(tmp_path / "x", 3, size=SMALL, splits={"../evil": 1.0})
    with pytest.raises(KdctlError, match="min_visible"):
        synthesize(tmp_path / "x", 3, size=SMALL, min_visible=1.5)
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ds"
    synthesize(out, 3, seed=0, size=SMALL)
    before = _hashes(out)
    with pytest.raises(KdctlError, match="already holds a dataset") as err:
        synthesize(out, 5, seed=1, size=SMALL)
    assert "\n" not in str(err.value)
    assert _hashes(out) == before
    (out / "train.json").unlink()
    (out / "val.json").unlink()
    (out / "test.json").unlink()
    with pytest.raises(KdctlError, match="already holds a dataset"):  # leftover images alone also refuse
        synthesize(out, 3, seed=0, size=SMALL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdctlError, match="not a directory"):
        synthesize(tmp_path / "file", 3)
    unrelated = tmp_path / "other"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    assert synthesize(unrelated, 3, size=SMALL) == {"train": 1, "val": 1, "test": 1}
    assert (unrelated / "notes.txt").read_text() == "keep me"
