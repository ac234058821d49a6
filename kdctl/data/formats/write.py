"""Write validated splits as a COCO or a YOLO dataset folder (``kdctl data convert``), without losing boxes or
class names.

* COCO: ``DST/{split}.json`` + ``DST/images/`` (the files keep their relative names; under ``images/{split}/``
  when two splits hold different files of one name). Boxes, ids, crowd flags and class names are kept as read.
* YOLO: ``DST/data.yaml`` (``path: .``, ``train: images/train``, ``val: images/val``, ``test: images/test``,
  ``names`` in the dataset's class order) + ``images/{split}/`` + ``labels/{split}/`` (a file per image, empty
  without boxes). Coordinates get 10 decimals, so that reading them back gives the boxes to well under 1e-3 px
  (a 100,000-px image moves a box edge by 1e-5 px). YOLO has no crowd flag: crowd boxes (Pascal VOC's
  ``difficult`` ones) are left out, with a warning.

Nothing is overwritten: ``DST`` must not exist or be empty. Every name is planned before the first file is
written, and the folder is written under a temporary name beside ``DST`` and renamed at the end, so a failure
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kdctl.data.validate import CocoData
from kdctl.errors import KdctlError
from kdctl.io import write_error, write_text

TARGETS = ("coco", "yolo")
DECIMALS = 10


def check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise KdctlError(f"{dst} already exists and is not an empty folder (data convert overwrites nothing)")


def plan_images(splits: dict[str, CocoData], per_split: bool) -> dict[str, dict[int, tuple[Path, str]]]:
    """split -> image id -> (source file, relative name under the images folder)."""
    out: dict[str, dict[int, tuple[Path, str]]] = {}
    for s, cd in splits.items():
        out[s] = {im["id"]: (cd.image_dir / im["file_name"], f"{s}/{im['file_name']}" if per_split
                             else im["file_name"]) for im in cd.images}
    return out


def coco_names(splits: dict[str, CocoData]) -> dict[str, dict[int, tuple[Path, str]]]:
    """Flat names, unless two splits hold different files of one name: then ``{split}/NAME`` for all."""
    plan = plan_images(splits, per_split=False)
    seen: dict[str, Path] = {}
    for files in plan.values():
        for src, rel in files.values():
            if seen.setdefault(rel, src.resolve()) != src.resolve():
                return plan_images(splits, per_split=True)
    return plan


def write_coco(splits: dict[str, CocoData], out: Path) -> list[str]:
    plan = coco_names(splits)
    copied: set[str] = set()
    for s, cd in splits.items():
        images = [dict(im, file_name=plan[s][im["id"]][1]) for im in cd.images]
        for src, rel in plan[s].values():
            if rel not in copied:
                copy_file(src, out / "images" / rel)
                copied.add(rel)
        coco = dict(cd.coco, images=images)
        coco["categories"] = sorted(coco["categories"], key=lambda c: c["id"])
        write_text(out / f"{s}.json", json.dumps(coco))
    return []


def yolo_line(k: int, box: list[float], W: float, H: float) -> str:
    x, y, w, h = box
    vals = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
    return f"{k} " + " ".join(f"{min(max(v, 0.0), 1.0):.{DECIMALS}f}" for v in vals)


def write_yolo(splits: dict[str, CocoData], out: Path) -> list[str]:
    import yaml

    names = next(iter(splits.values())).names
    plan = plan_images(splits, per_split=True)
    for files in plan.values():  # a.jpg and a.png of one folder would share a label file
        stems: dict[str, str] = {}
        for _, rel in files.values():
            other = stems.setdefault(str(Path(rel).with_suffix("")), rel)
            if other != rel:
                raise KdctlError(f"{other} and {rel} would share one YOLO label file; rename one of them")
    crowd = 0
    for s, cd in splits.items():
        cls = cd.class_index()
        for im in cd.images:
            src, rel = plan[s][im["id"]]
            copy_file(src, out / "images" / rel)
            anns = cd.anns_by_image.get(im["id"], [])
            crowd += sum(1 for a in anns if a.get("iscrowd", 0))
            lines = [yolo_line(cls[a["category_id"]], a["bbox"], float(im["width"]), float(im["height"]))
                     for a in anns if not a.get("iscrowd", 0)]
            write_text((out / "labels" / rel).with_suffix(".txt"), "".join(f"{line}\n" for line in lines))
    cfg = {"path": ".", **{s: f"images/{s}" for s in splits}, "names": list(names)}
    write_text(out / "data.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return [f"crowd boxes left out (YOLO has no crowd flag): {crowd}"] if crowd else []


def copy_file(src: Path, dst: Path) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    except OSError as e:
        raise write_error(dst, e) from e


def convert(splits: dict[str, CocoData], dst: str | Path, to: str) -> list[str]:
    """Write ``splits`` (kdctl split name -> validated split, sharing their classes) to the new folder ``dst`` as
    ``to`` (coco or yolo); returns warnings. Nothing is left behind on failure."""
    if to not in TARGETS:
        raise KdctlError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    if not splits:
        raise KdctlError("nothing to convert (no split)")
    dst = Path(dst).expanduser().absolute()
    check_destination(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        warnings = (write_coco if to == "coco" else write_yolo)(splits, tmp)
        if dst.exists():  # an empty folder (perhaps the working directory): move the contents in
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, dst / entry.name)
        else:
            os.replace(tmp, dst)
    except OSError as e:
        raise write_error(dst, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return warnings
