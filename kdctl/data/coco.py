"""COCO-format datasets: find the files, validate them before any work starts, and serve (image, target) pairs.

Two folder layouts are recognised (``--train-ann``, ``--val-ann`` and ``--images`` override either):

* ``DIR/{train,val,test}.json`` + ``DIR/images/`` (as ``shared/data/bccd``);
* the official ``DIR/annotations/instances_{train,val}2017.json`` + ``DIR/{train,val}2017/``.

Validation (:func:`load_coco`) sorts problems into

* fatal ones, reported together, one line per kind with a count (:class:`KdctlError`, exit code 2): missing or
  malformed annotation file, no images, no categories, duplicate image/annotation/category ids, annotations of
  unknown images or categories, missing image files, images without a positive size, malformed or non-finite
  boxes, boxes with a negative width or height, boxes entirely outside their image;
* fixable ones, fixed with one warning line per kind with a count: degenerate boxes (zero width or height, or
  under 1 pixel after clipping) are dropped; boxes that stick out of their image are clipped to it.

Inside kdctl a class is its *dataset class index*: the position of its category in the categories sorted by id.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError

SPLITS = ("train", "val", "test")


@dataclass
class CocoData:
    """A validated COCO annotation file.

    ``coco`` is the (cleaned) JSON dict, usable as pycocotools ground truth. ``cat_ids[k]`` is the category id of
    dataset class k and ``names[k]`` its name. ``anns_by_image`` maps image id -> cleaned annotations.
    """

    ann_path: Path
    image_dir: Path
    coco: dict[str, Any]
    names: list[str]
    cat_ids: list[int]
    images: list[dict[str, Any]]
    anns_by_image: dict[int, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def class_index(self) -> dict[int, int]:
        """Category id -> dataset class index."""
        return {c: i for i, c in enumerate(self.cat_ids)}

    def pycocotools(self):
        """A pycocotools COCO object over the cleaned annotations (without printing)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        gt = COCO()
        gt.dataset = self.coco
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        return gt


# --------------------------------------------------------------------------- layout
def find_split(
    root: str | Path | None,
    split: str,
    *,
    ann: str | Path | None = None,
    images: str | Path | None = None,
) -> tuple[Path, Path]:
    """Locate the annotation file and image folder of ``split`` in a dataset folder.

    ``ann`` and ``images`` override what the layout gives. Raises KdctlError when nothing is found.
    """
    if root is None and ann is None:
        raise KdctlError("no dataset: pass --data DIR (or --train-ann/--val-ann with --images)")
    root_p = Path(root).expanduser() if root is not None else None
    if root_p is not None and not root_p.is_dir():
        raise KdctlError(f"dataset folder {root_p} does not exist or is not a folder")
    ann_p = Path(ann).expanduser() if ann is not None else None
    img_p = Path(images).expanduser() if images is not None else None
    if ann_p is None:
        candidates = [root_p / f"{split}.json", root_p / "annotations" / f"instances_{split}2017.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise KdctlError(
                f"{root_p}: no annotations for split {split!r} (looked for {split}.json and "
                f"annotations/instances_{split}2017.json); pass --{split}-ann FILE"
            )
        ann_p = found[0]
    elif not ann_p.is_file():
        raise KdctlError(f"annotation file {ann_p} does not exist")
    if img_p is None:
        base = root_p if root_p is not None else ann_p.parent
        official = ann_p.parent.name == "annotations" and ann_p.name.startswith("instances_")
        if official:
            img_p = ann_p.parent.parent / ann_p.stem.removeprefix("instances_")
        elif (base / "images").is_dir():
            img_p = base / "images"
        else:
            img_p = base
    if not img_p.is_dir():
        raise KdctlError(f"image folder {img_p} does not exist (pass --images DIR)")
    return ann_p, img_p


# --------------------------------------------------------------------------- validation
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco(ann_path: str | Path, image_dir: str | Path, *, check_files: bool = True) -> CocoData:
    """Read and validate a COCO detection annotation file (see the module docstring for the rules).

    Raises KdctlError listing every fatal problem, one line per kind with a count. Fixable problems are fixed
    and described in ``CocoData.warnings``.
    """
    ann_path, image_dir = Path(ann_path), Path(image_dir)
    try:
        raw = json.loads(ann_path.read_text())
    except FileNotFoundError as e:
        raise KdctlError(f"annotation file {ann_path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdctlError(f"{ann_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise KdctlError(f"{ann_path}: not a COCO annotation file (top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(raw.get(k), list)]
    if "annotations" in missing and isinstance(raw.get("images"), list) and "annotations" not in raw:
        raw["annotations"], missing = [], [k for k in missing if k != "annotations"]  # image-only file: no boxes
    if missing:
        raise KdctlError(f"{ann_path}: not a COCO detection file (missing or non-list key(s): {', '.join(missing)})")

    fatal: Counter[str] = Counter()
    fixed: Counter[str] = Counter()
    examples: dict[str, str] = {}

    def bad(kind: str, example: Any) -> None:
        fatal[kind] += 1
        examples.setdefault(kind, str(example))

    cats = raw["categories"]
    if not cats:
        bad("no categories", "the 'categories' list is empty")
    cat_ids = []
    for c in cats:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            bad("malformed categories (need integer id and string name)", c)
            continue
        cat_ids.append(c["id"])
    for cid, n in Counter(cat_ids).items():
        if n > 1:
            bad("duplicate category ids", f"id {cid} used {n} times")

    images = raw["images"]
    if not images:
        bad("no images", "the 'images' list is empty")
    img_by_id: dict[int, dict] = {}
    seen_img: Counter[Any] = Counter()
    for im in images:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            bad("malformed images (need integer id and file_name)", im)
            continue
        seen_img[im["id"]] += 1
        if not (_is_num(im.get("width")) and _is_num(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            bad("images without a positive width/height", f"image id {im['id']}")
        img_by_id[im["id"]] = im
    for iid, n in seen_img.items():
        if n > 1:
            bad("duplicate image ids", f"id {iid} used {n} times")
    if check_files:
        for im in img_by_id.values():
            if not (image_dir / im["file_name"]).is_file():
                bad("missing image files", image_dir / im["file_name"])

    known_cats = set(cat_ids)
    seen_ann: Counter[Any] = Counter()
    anns_by_image: dict[int, list[dict]] = {i: [] for i in img_by_id}
    clean_anns = []
    for a in raw["annotations"]:
        if not isinstance(a, dict) or "id" not in a:
            bad("malformed annotations (need an id)", a)
            continue
        seen_ann[a["id"]] += 1
        if a.get("image_id") not in img_by_id:
            bad("annotations of unknown image ids", f"annotation {a['id']} -> image_id {a.get('image_id')}")
            continue
        if a.get("category_id") not in known_cats:
            bad("annotations of unknown category ids", f"annotation {a['id']} -> category_id {a.get('category_id')}")
            continue
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box)):
            bad("malformed or non-finite bbox (need [x, y, w, h])", f"annotation {a['id']}: {box}")
            continue
        x, y, w, h = (float(v) for v in box)
        if w < 0 or h < 0:
            bad("boxes with a negative width or height", f"annotation {a['id']}: {box}")
            continue
        im = img_by_id[a["image_id"]]
        W, H = float(im.get("width") or 0), float(im.get("height") or 0)
        if W > 0 and H > 0 and (x >= W or y >= H or x + w <= 0 or y + h <= 0) and w > 0 and h > 0:
            bad("boxes entirely outside their image", f"annotation {a['id']}: {box} in {W:g}x{H:g}")
            continue
        if W > 0 and H > 0:
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                fixed["boxes sticking out of their image, clipped"] += 1
                x, y, w, h = x0, y0, x1 - x0, y1 - y0
        if w < 1 or h < 1:
            fixed["degenerate boxes (under 1 px wide or high), dropped"] += 1
            continue
        b = dict(a)
        b["bbox"] = [x, y, w, h]
        b.setdefault("area", w * h)
        b.setdefault("iscrowd", 0)
        clean_anns.append(b)
        anns_by_image[a["image_id"]].append(b)
    for aid, n in seen_ann.items():
        if n > 1:
            bad("duplicate annotation ids", f"id {aid} used {n} times")

    if fatal:
        lines = [f"{ann_path}: invalid COCO dataset"]
        lines += [f"  {kind}: {n} (e.g. {examples[kind]})" for kind, n in fatal.items()]
        raise KdctlError("\n".join(lines))

    order = sorted(range(len(cats)), key=lambda i: cats[i]["id"])
    sorted_cats = [cats[i] for i in order]
    coco = dict(raw)
    coco["annotations"] = clean_anns
    coco.setdefault("info", {})
    coco.setdefault("licenses", [])
    warnings = [f"{ann_path.name}: {kind}: {n}" for kind, n in fixed.items()]
    return CocoData(
        ann_path=ann_path,
        image_dir=image_dir,
        coco=coco,
        names=[c["name"] for c in sorted_cats],
        cat_ids=[c["id"] for c in sorted_cats],
        images=sorted(img_by_id.values(), key=lambda im: im["id"]),
        anns_by_image=anns_by_image,
        warnings=warnings,
    )


def load_label_map(path: str | Path | None) -> dict[str, str] | None:
    """Read a ``--label-map`` JSON file: {"dataset class name": "model label name"}."""
    if path is None:
        return None
    p = Path(path).expanduser()
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise KdctlError(f"label map {p} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdctlError(f"label map {p}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise KdctlError(f"label map {p}: must be a JSON object of dataset name -> model name strings")
    return m


def check_same_classes(a: CocoData, b: CocoData) -> None:
    """Train and val splits must define the same categories (ids and names)."""
    if list(zip(a.cat_ids, a.names, strict=True)) != list(zip(b.cat_ids, b.names, strict=True)):
        raise KdctlError(
            f"{a.ann_path.name} and {b.ann_path.name} define different categories "
            f"({a.names} vs {b.names}); the splits of one dataset must share them"
        )
