"""COCO files in their three folder layouts (``--train-ann``, ``--val-ann`` and ``--images`` override any):

* ``DIR/{train,val,test}.json`` + ``DIR/images/`` (as ``shared/data/bccd``);
* the official ``DIR/annotations/instances_{train,val}2017.json`` + ``DIR/{train,val}2017/``;
* a Roboflow COCO export: ``DIR/{train,valid,test}/_annotations.coco.json`` with the images beside each file.
  Roboflow adds a category named after the project, the ``supercategory`` of every real one, that no box uses:
  it is left out (with a warning), or it would become a class the model is asked to learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.data.formats.common import SPLIT_ALIASES, SPLITS
from kdctl.data.validate import CocoData, Problems, read_annotations, validate_coco
from kdctl.errors import KdctlError

ROBOFLOW_FILE = "_annotations.coco.json"
LAYOUT = ("DIR/{split}.json with the images in DIR/images/ (or in DIR), the official "
          "DIR/annotations/instances_{split}2017.json with DIR/{split}2017/, or Roboflow's "
          "DIR/{split}/_annotations.coco.json")
OTHERS = "a YOLO (data.yaml), Pascal VOC (Annotations/) or Hugging Face datasets folder is detected too"


def annotation_candidates(root: Path, split: str) -> list[Path]:
    """Where the layouts keep the annotation file of ``split`` in dataset folder ``root``."""
    roboflow = [root / d / ROBOFLOW_FILE for d in SPLIT_ALIASES.get(split, (split,)) if d != "validation"]
    return [root / f"{split}.json", root / "annotations" / f"instances_{split}2017.json", *roboflow]


def looks_like(root: Path) -> bool:
    return bool(splits(root))


def splits(root: Path) -> list[str]:
    return [s for s in SPLITS if any(c.is_file() for c in annotation_candidates(root, s))]


def find_split(
    root: str | Path | None,
    split: str,
    *,
    ann: str | Path | None = None,
    images: str | Path | None = None,
    options: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Locate the annotation file and image folder of ``split`` in a dataset folder.

    ``ann`` and ``images`` override what the layout gives. Raises KdctlError when nothing is found, with a hint
    that names the calling command's options: ``options`` maps ``"data"``, ``"ann"`` (the option giving this
    split's annotation file) and ``"images"`` to them; without one, the hint describes the expected layout.
    """
    opt = options or {}
    layout = LAYOUT.format(split=split)
    if root is None and ann is None:
        if "data" not in opt:
            raise KdctlError(f"no dataset folder given (expected {layout})")
        alt = f" (or {opt['ann']} FILE with {opt['images']} DIR)" if "ann" in opt and "images" in opt else ""
        raise KdctlError(f"no dataset: pass {opt['data']} DIR{alt}")
    root_p = Path(root).expanduser() if root is not None else None
    if root_p is not None and not root_p.is_dir():
        raise KdctlError(f"dataset folder {root_p} does not exist or is not a folder")
    ann_p = Path(ann).expanduser() if ann is not None else None
    img_p = Path(images).expanduser() if images is not None else None
    if ann_p is None:
        found = [c for c in annotation_candidates(root_p, split) if c.is_file()]
        if not found:
            raise KdctlError(
                f"{root_p}: no annotations for split {split!r} (looked for "
                f"{', '.join(str(c.relative_to(root_p)) for c in annotation_candidates(root_p, split))}); "
                + (f"pass {opt['ann']} FILE" if "ann" in opt else f"expected {layout}") + f" ({OTHERS})"
            )
        ann_p = found[0]
    elif not ann_p.is_file():
        raise KdctlError(f"annotation file {ann_p} does not exist")
    if img_p is None:
        base = root_p if root_p is not None else ann_p.parent
        official = ann_p.parent.name == "annotations" and ann_p.name.startswith("instances_")
        if ann_p.name == ROBOFLOW_FILE:
            img_p = ann_p.parent
        elif official:
            img_p = ann_p.parent.parent / ann_p.stem.removeprefix("instances_")
        elif (base / "images").is_dir():
            img_p = base / "images"
        else:
            img_p = base
    if not img_p.is_dir():
        hint = f"pass {opt['images']} DIR" if "images" in opt else f"expected {layout}"
        raise KdctlError(f"image folder {img_p} does not exist ({hint})")
    return ann_p, img_p


def read(root: Path, split: str, *, deep: bool = False) -> CocoData:
    ann_p, img_p = find_split(root, split)
    return load(ann_p, img_p, deep=deep)


def load(ann_path: Path, image_dir: Path, *, deep: bool = False) -> CocoData:
    """Read and validate a COCO file (a Roboflow export's project category left out)."""
    raw = read_annotations(ann_path)
    p = Problems()
    if ann_path.name == ROBOFLOW_FILE:
        raw = drop_roboflow_group(raw, p)
    label = f"{ann_path.parent.name}/{ann_path.name}" if ann_path.name == ROBOFLOW_FILE else None
    return validate_coco(raw, ann_path, image_dir, deep=deep, problems=p, label=label)


def drop_roboflow_group(raw: dict[str, Any], p: Problems) -> dict[str, Any]:
    """Leave out the categories that are the ``supercategory`` of another one and that no box uses."""
    cats = [c for c in raw["categories"] if isinstance(c, dict)]
    parents = {c.get("supercategory") for c in cats if c.get("supercategory") != c.get("name")}
    used = {a.get("category_id") for a in raw["annotations"] if isinstance(a, dict)}
    group = [c for c in cats if c.get("name") in parents and c.get("id") not in used]
    if not group or len(group) == len(cats):
        return raw
    p.fixed[f"Roboflow project categories without boxes, left out ({', '.join(str(c.get('name')) for c in group)})"] \
        += len(group)
    return dict(raw, categories=[c for c in raw["categories"] if not any(c is g for g in group)])
