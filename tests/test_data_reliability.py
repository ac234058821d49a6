"""Image files before training (issue #13): EXIF orientation, sizes the annotation does not give, unreadable and
truncated files, DataLoader worker errors in one line, and hints that name the command's real options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdctl.cli import main
from kdctl.data.coco import load_coco
from kdctl.data.dataset import CocoDetection, make_loader
from kdctl.data.images import AMBIGUOUS, KEPT_RAW, SIZE_MISMATCH, UNREADABLE, Header, choose_frame
from kdctl.errors import KdctlError, worker_message

CATS = [{"id": 1, "name": "thing"}]
BOX = [20, 10, 150, 60]  # x, y, w, h in the upright 200 x 120 frame
RED = (220, 30, 30)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def upright() -> Image.Image:
    """200 x 120, grey, with a red rectangle where BOX says."""
    im = Image.new("RGB", (200, 120), (60, 60, 60))
    x, y, w, h = BOX
    im.paste(RED, (x, y, x + w, y + h))
    return im


def write_dataset(root: Path, files: dict[str, Image.Image | bytes], size=(200, 120), exif: int | None = None,
                  fmt: str = "JPEG") -> Path:
    """``root/{train,val}.json`` + ``root/images``: one image per file, annotated as ``size`` with BOX."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (name, pic) in enumerate(files.items(), 1):
        path = root / "images" / name
        if isinstance(pic, bytes):
            path.write_bytes(pic)
        else:
            kw = {}
            if exif is not None:
                tags = Image.Exif()
                tags[0x0112] = exif
                kw["exif"] = tags.tobytes()
            pic.save(path, fmt, **kw)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": BOX, "area": BOX[2] * BOX[3], "iscrowd": 0})
    coco = {"images": images, "annotations": anns, "categories": CATS}
    for s in ("train", "val"):
        (root / f"{s}.json").write_text(json.dumps(coco))
    return root


def box_is_red(ds: CocoDetection, i: int = 0) -> bool:
    img, t = ds[i]
    x0, y0, x1, y1 = (int(v) for v in t["boxes"][0])
    inside = img[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean(dim=(1, 2))
    return bool((inside - torch.tensor(RED) / 255).abs().max() < 0.1)


# --------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_sideways_photo_with_upright_annotation_is_rotated(tmp_path, capsys, fmt):
    # stored 120 x 200 with orientation 6 ("rotate 90 clockwise to view"); the annotation is upright, 200 x 120
    raw = upright().transpose(Image.Transpose.ROTATE_90)
    root = write_dataset(tmp_path / "d", {"a.img": raw}, exif=6, fmt=fmt)
    cd = load_coco(root / "val.json", root / "images")
    assert cd.apply_exif == {1} and not cd.warnings
    ds = CocoDetection(cd, imgsz=200, train=False)
    img, t = ds[0]
    assert tuple(img.shape) == (3, 120, 200) and t["orig_size"] == (120, 200)
    assert box_is_red(ds)  # the box lands on the red rectangle, not on rescaled sideways pixels
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code == 0, out


def test_annotation_of_the_stored_pixels_keeps_them_with_a_warning(tmp_path):
    # the tool labelled the stored (sideways) pixels: its width/height are the stored ones
    raw = upright().transpose(Image.Transpose.ROTATE_90)
    root = write_dataset(tmp_path / "d", {"a.jpg": raw}, size=(120, 200), exif=6)
    json_ = json.loads((root / "val.json").read_text())
    json_["annotations"][0]["bbox"] = [10, 30, 60, 150]  # where the rectangle is in the stored pixels
    (root / "val.json").write_text(json.dumps(json_))
    cd = load_coco(root / "val.json", root / "images")
    assert cd.apply_exif == set() and any(KEPT_RAW in w and w.endswith(": 1") for w in cd.warnings)
    ds = CocoDetection(cd, imgsz=200, train=False)
    assert tuple(ds[0][0].shape) == (3, 200, 120) and box_is_red(ds)


def test_upside_down_photo_is_turned_as_viewers_do_with_a_warning(tmp_path):
    raw = upright().transpose(Image.Transpose.ROTATE_180)  # orientation 3: same size either way
    root = write_dataset(tmp_path / "d", {"a.jpg": raw}, exif=3)
    cd = load_coco(root / "val.json", root / "images")
    assert cd.apply_exif == {1} and any(AMBIGUOUS in w for w in cd.warnings)
    assert box_is_red(CocoDetection(cd, imgsz=200, train=False))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_frame_rule_for_every_orientation(orientation):
    sideways = orientation >= 5
    h = Header(120, 200, orientation, "JPEG", True) if sideways else Header(200, 120, orientation, "JPEG", True)
    assert choose_frame(h, 200, 120) == ((orientation > 1), AMBIGUOUS if 2 <= orientation <= 4 else None)
    assert choose_frame(h, 150, 90) == (None, None)
    if sideways:
        assert choose_frame(h, 120, 200) == (False, KEPT_RAW)


# --------------------------------------------------------------------------- size mismatch
def test_image_size_that_differs_from_the_annotation_is_fatal(tmp_path, capsys):
    files = {f"{i}.jpg": upright().resize((150, 90)) for i in range(4)}
    root = write_dataset(tmp_path / "d", files)  # annotated 200 x 120
    with pytest.raises(KdctlError) as e:
        load_coco(root / "val.json", root / "images")
    line = next(ln for ln in str(e.value).splitlines() if SIZE_MISMATCH in ln)
    assert f"{SIZE_MISMATCH}: 4 (e.g. " in line and "0.jpg is 150x90, the annotation says 200x120" in line
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code == 2 and out.startswith("error:") and "Traceback" not in out and SIZE_MISMATCH in out
    # eval and train find it before loading any model
    code, out = run_cli(["eval", "--model", "no-such-preset", "--data", str(root), "--device", "cpu"], capsys)
    assert code == 2 and SIZE_MISMATCH in out
    code, out = run_cli(["train", "--model", "no-such-preset", "--data", str(root), "--device", "cpu",
                         "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and SIZE_MISMATCH in out


def test_file_changed_after_validation_is_one_line_not_rescaled(tmp_path):
    root = write_dataset(tmp_path / "d", {"a.jpg": upright()})
    cd = load_coco(root / "val.json", root / "images")
    upright().resize((100, 60)).save(root / "images" / "a.jpg")
    with pytest.raises(KdctlError, match=r"a\.jpg is 100x60 pixels but its annotation says 200x120"):
        CocoDetection(cd, imgsz=200, train=False)[0]


# --------------------------------------------------------------------------- unreadable files
def noise(w=96, h=64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def encoded(pic: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    pic.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["png cut to 300 bytes", "jpeg cut in half", "empty", "text"])
def test_unreadable_or_truncated_file_is_fatal_and_named(tmp_path, capsys, case):
    bad = {"png cut to 300 bytes": encoded(noise(), "PNG")[:300], "jpeg cut in half": encoded(noise(), "JPEG")[:2000],
           "empty": b"", "text": b"not an image\n" * 10}[case]
    files = {"good.png": noise(), "bad.png": bad}
    root = write_dataset(tmp_path / "d", files, size=(96, 64), fmt="PNG")
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code == 2 and "Traceback" not in out and f"{UNREADABLE}: 1" in out and "bad.png" in out


def corrupt_inside_png() -> bytes:
    """A PNG with a valid header and end marker whose pixel data is cut: only decoding finds it."""
    data = encoded(noise(), "PNG")
    return data[: len(data) // 2] + b"\0\0\0\0IEND\xaeB`\x82"


def test_deep_decodes_every_image(tmp_path, capsys):
    root = write_dataset(tmp_path / "d", {"good.png": noise(), "bad.png": corrupt_inside_png()}, size=(96, 64))
    code, out = run_cli(["data", "check", str(root)], capsys)
    assert code == 0, out  # the header check cannot see it
    code, out = run_cli(["data", "check", str(root), "--deep"], capsys)
    assert code == 2 and f"{UNREADABLE}: 1" in out and "bad.png" in out and "Traceback" not in out


# --------------------------------------------------------------------------- worker errors
def test_worker_error_is_the_same_one_line_as_without_workers(tmp_path):
    root = write_dataset(tmp_path / "d", {"good.png": noise(), "bad.png": corrupt_inside_png()}, size=(96, 64))
    cd = load_coco(root / "val.json", root / "images")  # passes: the header check cannot see it
    messages = []
    for workers in (0, 1):
        with pytest.raises(KdctlError) as e:
            for _ in make_loader(CocoDetection(cd, 64, train=False), 2, shuffle=False, workers=workers):
                pass
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "\n" not in messages[0] and "bad.png: cannot read image" in messages[0]


class _Raises(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        try:
            raise RuntimeError("decoder says no")
        except RuntimeError as e:
            raise KdctlError("x.png: cannot read image (decoder says no)") from e


def test_cli_prints_a_worker_error_as_its_own_line(tmp_path, capsys, monkeypatch):
    # what torch itself raises from a worker (a plain DataLoader): the message is the worker's traceback
    with pytest.raises(KdctlError) as e:
        next(iter(torch.utils.data.DataLoader(_Raises(), num_workers=1)))
    assert "Traceback" in str(e.value)
    assert worker_message(str(e.value)) == "x.png: cannot read image (decoder says no)"
    assert worker_message("plain\nmessage") == "plain\nmessage"

    def fail(*a, **k):
        raise e.value

    monkeypatch.setattr("kdctl.commands.data.check_data", fail)
    code, out = run_cli(["data", "check", str(tmp_path)], capsys)
    assert code == 2 and out == "error: x.png: cannot read image (decoder says no)\n"


# --------------------------------------------------------------------------- hints name real options
def options_of(command: list[str], capsys) -> str:
    code, out = run_cli([*command, "--help"], capsys)
    assert code == 0
    return out


def named_options(text: str) -> set[str]:
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


@pytest.mark.parametrize("command,expected", [
    (["data", "check", "{root}"], set()),
    (["data", "check", "{root}", "--split", "val"], set()),
    (["train", "--model", "no-such-preset", "--data", "{root}", "--device", "cpu"], {"--train-ann"}),
    (["eval", "--model", "no-such-preset", "--data", "{root}", "--device", "cpu", "--split", "test"], {"--val-ann"}),
    (["eval", "--model", "no-such-preset", "--data", "{root}", "--device", "cpu", "--split", "train"], {"--val-ann"}),
    (["eval", "--model", "no-such-preset", "--device", "cpu"], {"--data", "--val-ann", "--images"}),
    (["train", "--model", "no-such-preset", "--device", "cpu"], {"--data", "--train-ann", "--images"}),
])
def test_not_found_hints_name_options_the_command_has(tmp_path, capsys, command, expected):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{root}", str(tmp_path / "empty")) for a in command]
    args += ["--output", str(tmp_path / "runs")] if args[0] == "train" else []
    code, out = run_cli(args, capsys)
    assert code == 2 and out.startswith("error:") and "Traceback" not in out
    assert named_options(out) == expected, out
    cmd = args[:2] if args[0] == "data" else args[:1]
    assert expected <= named_options(options_of(cmd, capsys))
    if not expected and "--split" not in args:
        assert "expected DIR/SPLIT.json" in out


def test_official_layout_without_its_image_folder(tmp_path, capsys):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text("{}")
    code, out = run_cli(["data", "check", str(tmp_path / "coco")], capsys)
    assert code == 2 and "val2017 does not exist" in out and "--" not in out
    code, out = run_cli(["eval", "--model", "x", "--data", str(tmp_path / "coco"), "--device", "cpu"], capsys)
    assert code == 2 and "pass --images DIR" in out
