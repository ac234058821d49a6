"""Label statistics of ``kdctl data check``: per-class counts, COCO size buckets, classes missing from a split, the
PNG plot and the tables the command prints."""

from __future__ import annotations

import json
import re

import pytest
from clitools import invoke as run_cli
from conftest import write_coco

from kdctl.data.coco import load_coco
from kdctl.data.stats import ClassGap, class_gaps, plot_labels, size_bucket, split_stats
from kdctl.errors import KdctlError

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}, {"id": 11, "name": "fish"}]
IMAGES = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
          for i, (w, h) in enumerate([(128, 128), (64, 32), (128, 128), (100, 100)], start=1)]


def box(i, image_id, cat, bbox, area=None, crowd=0):
    a = {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd}
    if area is not None:
        a["area"] = area
    return a


# train: cat 3 boxes (one crowd), dog 2, bird 2, fish 0; image 4 empty; small 3, medium 3, large 1. The `area`
# field, not w * h, decides the bucket: a 10x10 box of area 1024 is medium, a 100x100 box of area 9215 is medium.
TRAIN = [
    box(1, 1, 3, [0, 0, 31, 33], area=1023),    # small (just under 32^2)
    box(2, 1, 3, [40, 40, 10, 10], area=1024),  # medium (exactly 32^2, box area 100)
    box(3, 1, 7, [0, 60, 100, 60], area=9215),  # medium (just under 96^2)
    box(4, 1, 7, [0, 0, 96, 96], area=9216),    # large (exactly 96^2)
    box(5, 2, 9, [16, 8, 32, 16]),              # no area: w * h = 512, small; half the 64x32 image, centred
    box(6, 3, 9, [0, 0, 32, 32]),               # no area: w * h = 1024, medium
    box(7, 3, 3, [50, 50, 20, 20], area=400, crowd=1),
]
# val: no bird (train has two), one cat, one dog
VAL = [box(1, 1, 3, [0, 0, 20, 20], area=400), box(2, 3, 7, [0, 0, 100, 100], area=10000)]


@pytest.fixture
def two_splits(tmp_path):
    root = write_coco(tmp_path / "d", IMAGES, TRAIN, CATS, splits=("train",))
    (root / "val.json").write_text(json.dumps({"images": IMAGES[:3], "annotations": VAL, "categories": CATS}))
    return root


def stats_of(root, split):
    return split_stats(load_coco(root / f"{split}.json", root / "images"), split)


@pytest.mark.parametrize(("area", "bucket"), [
    (0.5, "small"), (1023.99, "small"), (1024, "medium"), (1024.01, "medium"), (9215.99, "medium"),
    (9216, "large"), (1e6, "large")])
def test_size_bucket_boundaries(area, bucket):
    assert size_bucket(area) == bucket


def test_split_stats_counts(two_splits):
    st = stats_of(two_splits, "train")
    assert st.names == ["cat", "dog", "bird", "fish"]  # categories sorted by id
    assert st.per_class == [3, 2, 2, 0]
    assert st.boxes == 7 and st.images == 4
    assert st.images_without_boxes == 1 and st.crowd == 1
    assert st.sizes == {"small": 3, "medium": 3, "large": 1}  # the crowd box (400) is small
    assert st.count("bird") == 2 and st.count("fish") == 0 and st.count("horse") == 0
    i = 4  # annotation 5: [16, 8, 32, 16] in a 64x32 image
    assert (st.rel_w[i], st.rel_h[i], st.rel_cx[i], st.rel_cy[i]) == (0.5, 0.5, 0.5, 0.5)
    assert st.rel_w[3] == pytest.approx(0.75) and st.rel_cy[3] == pytest.approx(0.375)  # 96x96 at 0,0 in 128x128
    val = stats_of(two_splits, "val")
    assert val.per_class == [1, 1, 0, 0] and val.sizes == {"small": 1, "medium": 0, "large": 1}
    assert val.images_without_boxes == 1


def test_class_missing_from_a_split(two_splits):
    gaps = class_gaps([stats_of(two_splits, "train"), stats_of(two_splits, "val")])
    assert gaps == [ClassGap("bird", ("train",), ("val",)), ClassGap("fish", (), ("train", "val"))]


def test_plot_is_a_png(two_splits, tmp_path):
    from PIL import Image

    out = plot_labels([stats_of(two_splits, "train"), stats_of(two_splits, "val")], tmp_path / "sub" / "labels.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(out) as im:
        assert im.size == (990, 810)  # 11 x 9 inches at 90 dpi
        assert len(im.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 50  # not a blank canvas
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.png"]  # no temp file left


def test_plot_to_unwritable_path_is_one_line(two_splits, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KdctlError, match="cannot write"):
        plot_labels([stats_of(two_splits, "train")], tmp_path / "afile" / "labels.png")


def cells(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in out.splitlines():
        parts = [p.strip() for p in line.strip().strip("│").split("│")]
        if parts and parts[0] == first:
            return parts[1:]
    raise AssertionError(f"no row {first!r} in\n{out}")


def test_cli_prints_the_tables_and_warns(two_splits, tmp_path, capsys):
    png = tmp_path / "labels.png"
    code, out, err = run_cli(["data", "check", str(two_splits), "--plot", str(png)], capsys)
    assert code == 0, err
    assert out.index("boxes per class") > out.index("warnings")  # the summary table first
    assert cells(out, "cat") == ["3", "1"] and cells(out, "dog") == ["2", "1"]
    assert cells(out, "bird") == ["2", "0"] and cells(out, "fish") == ["0", "0"]
    # summary row (split, images, boxes, classes, warnings), then the size row (small, medium, large, crowd, empty)
    rows = [line for line in out.splitlines() if re.match(r"^│\s*train\s*│", line)]
    assert [r.replace(" ", "") for r in rows] == ["│train│4│7│4│0│", "│train│3│3│1│1│1│"]
    assert "class 'bird' has boxes in train but none in val" in err
    assert "class 'fish' has no boxes in train, val" in err
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out


def test_cli_unwritable_plot_is_one_error_line(two_splits, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(["data", "check", str(two_splits), "--plot", str(tmp_path / "afile" / "l.png")], capsys)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0]
