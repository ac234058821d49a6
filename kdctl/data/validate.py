"""The neutral in-memory dataset of kdctl (:class:`CocoData`) and the rules that validate a COCO dict into it.

Every dataset format (COCO files, YOLO, Pascal VOC, Hugging Face ``datasets``: :mod:`kdctl.data.formats`) is read
into a COCO detection dict (ids, file names relative to an image folder, width/height) and then goes through
:func:`validate_coco`, which sorts problems into

* fatal ones, reported together, one line per kind with a count and an example (:class:`KdctlError`, exit code
  2): missing or malformed annotation file, no images, no categories, duplicate image/annotation/category ids,
  annotations of unknown images or categories, missing image files, unreadable or truncated image files, images
  without a positive size, images whose pixel size is not the annotation's width/height (neither as stored nor
  with the EXIF orientation applied), malformed or non-finite boxes, boxes with a negative width or height, boxes
  entirely outside their image; a format reader adds its own (a YOLO class index outside ``names``...) to the
  same list;
* fixable ones, fixed with one warning line per kind with a count: degenerate boxes (zero width or height, or
  under 1 pixel after clipping) are dropped; boxes that stick out of their image are clipped to it; images whose
  frame the EXIF orientation leaves open are used as :mod:`kdctl.data.images` says.

Every image file is opened (header, size, EXIF orientation; ``deep`` decodes it); the EXIF orientation is applied
to the images listed in ``CocoData.apply_exif`` (the rule is in :mod:`kdctl.data.images`). pycocotools evaluates
the cleaned dict as it is.

Inside kdctl a class is its *dataset class index*: the position of its category in the categories sorted by id.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl.data.images import check_image_files
from kdctl.errors import KdctlError
from kdctl.io import read_json


@dataclass
class CocoData:
    """A validated dataset split, held as a COCO dict (whatever format it was read from).

    ``coco`` is the (cleaned) JSON dict, usable as pycocotools ground truth. ``cat_ids[k]`` is the category id of
    dataset class k and ``names[k]`` its name. ``anns_by_image`` maps image id -> cleaned annotations.
    ``apply_exif`` holds the ids of the images whose EXIF orientation is applied when they are decoded.
    ``ann_path`` names where the split came from (the COCO file; a YOLO label folder, a VOC split file, an HF
    split folder); ``image_dir / file_name`` is each image's file.
    """

    ann_path: Path
    image_dir: Path
    coco: dict[str, Any]
    names: list[str]
    cat_ids: list[int]
    images: list[dict[str, Any]]
    anns_by_image: dict[int, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)
    apply_exif: set[int] = field(default_factory=set)

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


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Problems:
    """Fatal problems (kind -> count, and the first example of each) and fixed ones (kind -> count)."""

    def __init__(self) -> None:
        self.fatal: Counter[str] = Counter()
        self.fixed: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def bad(self, kind: str, example: Any) -> None:
        self.fatal[kind] += 1
        self.examples.setdefault(kind, str(example))

    def raise_fatal(self, source: Path, what: str = "COCO") -> None:
        """Raise one KdctlError listing every fatal problem (one line per kind) found in ``source``."""
        if self.fatal:
            lines = [f"{source}: invalid {what} dataset"]
            lines += [f"  {kind}: {n} (e.g. {self.examples[kind]})" for kind, n in self.fatal.items()]
            raise KdctlError("\n".join(lines))


def read_annotations(ann_path: Path) -> dict[str, Any]:
    if not ann_path.is_file():
        raise KdctlError(f"annotation file {ann_path} does not exist")
    raw = read_json(ann_path, "COCO annotation file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(raw.get(k), list)]
    if "annotations" in missing and isinstance(raw.get("images"), list) and "annotations" not in raw:
        raw["annotations"], missing = [], [k for k in missing if k != "annotations"]  # image-only file: no boxes
    if missing:
        raise KdctlError(f"{ann_path}: not a COCO detection file (missing or non-list key(s): {', '.join(missing)})")
    return raw


def _check_categories(cats: list, p: Problems) -> list[int]:
    if not cats:
        p.bad("no categories", "the 'categories' list is empty")
    cat_ids = []
    for c in cats:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            p.bad("malformed categories (need integer id and string name)", c)
            continue
        cat_ids.append(c["id"])
    for cid, n in Counter(cat_ids).items():
        if n > 1:
            p.bad("duplicate category ids", f"id {cid} used {n} times")
    return cat_ids


def _check_images(images: list, p: Problems) -> tuple[dict[int, dict], list[dict]]:
    """(image id -> entry, the entries with a positive width and height)."""
    if not images:
        p.bad("no images", "the 'images' list is empty")
    img_by_id: dict[int, dict] = {}
    sized: list[dict] = []
    seen_img: Counter[Any] = Counter()
    for im in images:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            p.bad("malformed images (need integer id and file_name)", im)
            continue
        seen_img[im["id"]] += 1
        if not (_is_num(im.get("width")) and _is_num(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            p.bad("images without a positive width/height", f"image id {im['id']}")
        else:
            sized.append(im)
        img_by_id[im["id"]] = im
    for iid, n in seen_img.items():
        if n > 1:
            p.bad("duplicate image ids", f"id {iid} used {n} times")
    return img_by_id, sized


def _check_files(img_by_id: dict[int, dict], sized: list[dict], image_dir: Path, deep: bool, p: Problems) -> set[int]:
    """Missing, unreadable and wrongly sized image files; returns the ids whose EXIF orientation is applied."""
    for im in img_by_id.values():
        if not (image_dir / im["file_name"]).is_file():
            p.bad("missing image files", image_dir / im["file_name"])
    present = [im for im in sized if (image_dir / im["file_name"]).is_file()]
    files = check_image_files(present, image_dir, deep=deep)
    for kind, example in files.fatal:
        p.bad(kind, example)
    p.fixed.update(files.notes)
    return files.apply_exif


def _clean_annotations(
    anns: list, img_by_id: dict[int, dict], known_cats: set[int], p: Problems
) -> tuple[list[dict], dict[int, list[dict]]]:
    """(the cleaned annotations, image id -> its cleaned annotations)."""
    seen_ann: Counter[Any] = Counter()
    anns_by_image: dict[int, list[dict]] = {i: [] for i in img_by_id}
    clean_anns = []
    for a in anns:
        if not isinstance(a, dict) or "id" not in a:
            p.bad("malformed annotations (need an id)", a)
            continue
        seen_ann[a["id"]] += 1
        if a.get("image_id") not in img_by_id:
            p.bad("annotations of unknown image ids", f"annotation {a['id']} -> image_id {a.get('image_id')}")
            continue
        if a.get("category_id") not in known_cats:
            p.bad("annotations of unknown category ids", f"annotation {a['id']} -> category_id {a.get('category_id')}")
            continue
        box = a.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box)):
            p.bad("malformed or non-finite bbox (need [x, y, w, h])", f"annotation {a['id']}: {box}")
            continue
        x, y, w, h = (float(v) for v in box)
        if w < 0 or h < 0:
            p.bad("boxes with a negative width or height", f"annotation {a['id']}: {box}")
            continue
        im = img_by_id[a["image_id"]]
        W, H = float(im.get("width") or 0), float(im.get("height") or 0)
        if W > 0 and H > 0 and (x >= W or y >= H or x + w <= 0 or y + h <= 0) and w > 0 and h > 0:
            p.bad("boxes entirely outside their image", f"annotation {a['id']}: {box} in {W:g}x{H:g}")
            continue
        if W > 0 and H > 0:
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                p.fixed["boxes sticking out of their image, clipped"] += 1
                x, y, w, h = x0, y0, x1 - x0, y1 - y0
        if w < 1 or h < 1:
            p.fixed["degenerate boxes (under 1 px wide or high), dropped"] += 1
            continue
        b = dict(a)
        b["bbox"] = [x, y, w, h]
        b.setdefault("area", w * h)
        b.setdefault("iscrowd", 0)
        clean_anns.append(b)
        anns_by_image[a["image_id"]].append(b)
    for aid, n in seen_ann.items():
        if n > 1:
            p.bad("duplicate annotation ids", f"id {aid} used {n} times")
    return clean_anns, anns_by_image


def load_coco(
    ann_path: str | Path, image_dir: str | Path, *, check_files: bool = True, deep: bool = False
) -> CocoData:
    """Read and validate a COCO detection annotation file (see the module docstring for the rules).

    Raises KdctlError listing every fatal problem, one line per kind with a count. Fixable problems are fixed
    and described in ``CocoData.warnings``. ``check_files=False`` skips the image files; ``deep`` decodes each.
    """
    ann_path = Path(ann_path)
    return validate_coco(read_annotations(ann_path), ann_path, image_dir, check_files=check_files, deep=deep)


def validate_coco(
    raw: dict[str, Any], source: str | Path, image_dir: str | Path, *, check_files: bool = True, deep: bool = False,
    problems: Problems | None = None, what: str = "COCO", label: str | None = None,
) -> CocoData:
    """Validate a COCO detection dict whose ``file_name``s are relative to ``image_dir`` (the module's rules).

    ``source`` names the dataset in messages (``CocoData.ann_path``); ``problems`` holds what a format reader
    found already (its fatal problems are reported with these, its fixed ones become warnings); ``what`` names
    the format in the fatal message and ``label`` (default: the name of ``source``) starts each warning.
    """
    source, image_dir = Path(source), Path(image_dir)
    p = problems if problems is not None else Problems()
    cats = raw["categories"]
    cat_ids = _check_categories(cats, p)
    img_by_id, sized = _check_images(raw["images"], p)
    apply_exif = _check_files(img_by_id, sized, image_dir, deep, p) if check_files else set()
    clean_anns, anns_by_image = _clean_annotations(raw["annotations"], img_by_id, set(cat_ids), p)
    p.raise_fatal(source, what)

    sorted_cats = sorted(cats, key=lambda c: c["id"])
    coco = dict(raw)
    coco["annotations"] = clean_anns
    coco.setdefault("info", {})
    coco.setdefault("licenses", [])
    return CocoData(
        ann_path=source,
        image_dir=image_dir,
        coco=coco,
        names=[c["name"] for c in sorted_cats],
        cat_ids=[c["id"] for c in sorted_cats],
        images=sorted(img_by_id.values(), key=lambda im: im["id"]),
        anns_by_image=anns_by_image,
        warnings=[f"{label or source.name}: {kind}: {n}" for kind, n in p.fixed.items()],
        apply_exif=apply_exif,
    )
