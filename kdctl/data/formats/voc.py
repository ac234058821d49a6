"""Pascal VOC datasets: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val,test}.txt``.

Each XML file gives the image's ``filename`` (in ``JPEGImages/``; ``ID.jpg`` without one), its ``size``
(``width``, ``height``) and ``object``s: ``name``, ``difficult`` and ``bndbox`` (``xmin ymin xmax ymax``). VOC
boxes are 1-based pixel indices, inclusive, so a box is ``[xmin - 1, ymin - 1, xmax, ymax]`` in COCO's continuous
coordinates (as Detectron2 reads them). The class names are the object names of every split's files, sorted (the
VOC file format lists none), so that all splits share them. ``difficult`` boxes are marked ``iscrowd``: kept out
of training and ignored in evaluation, as the VOC protocol does.

Fatal, with a count and an example (file): a split file naming a missing XML file, an XML file that does not
parse, one without ``size``, an object without a name or a numeric ``bndbox``; then the usual COCO rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdctl.data.formats.common import SPLITS, no_split
from kdctl.data.validate import CocoData, Problems, validate_coco

NO_SIZE = "XML files without <size> (width and height)"
BAD_OBJECT = "objects without a name or a numeric <bndbox> (xmin ymin xmax ymax)"


def looks_like(root: Path) -> bool:
    return (root / "Annotations").is_dir() and (root / "ImageSets" / "Main").is_dir()


def split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def splits(root: Path) -> list[str]:
    return [s for s in SPLITS if split_file(root, s).is_file()]


def split_ids(root: Path, split: str) -> list[str]:
    lines = split_file(root, split).read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def parse_xml(path: Path, p: Problems) -> dict[str, Any] | None:
    """The file name, size and objects of one annotation file; None (with the problem in ``p``) when unusable."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        p.bad("missing annotation files", path)
        return None
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        p.bad("XML files that do not parse", f"{path}: {e}")
        return None

    def number(node: Any, tag: str) -> float | None:
        try:
            return float(node.findtext(tag))
        except (TypeError, ValueError):
            return None

    size = root.find("size")
    width, height = (number(size, "width"), number(size, "height")) if size is not None else (None, None)
    if width is None or height is None:
        p.bad(NO_SIZE, path)
        return None
    objects = []
    for i, obj in enumerate(root.iter("object"), 1):
        name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        coords = [number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")] if box is not None else [None]
        if not name or any(c is None for c in coords):
            p.bad(BAD_OBJECT, f"{path}: object {i}")
            continue
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "", "false")
        objects.append((name, coords, difficult))
    filename = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    return {"file_name": filename, "width": width, "height": height, "objects": objects}


def read(root: Path, split: str, *, deep: bool = False) -> CocoData:
    have = splits(root)
    if split not in have:
        raise no_split(root, "Pascal VOC", split, have)
    p = Problems()
    records = {}
    for s in have:  # every split: the class names are those of all of them
        q = p if s == split else Problems()
        records[s] = [parse_xml(root / "Annotations" / f"{i}.xml", q) for i in split_ids(root, s)]
    names = sorted({o[0] for recs in records.values() for r in recs if r for o in r["objects"]})
    cat = {n: k + 1 for k, n in enumerate(names)}
    images, anns = [], []
    for r in records[split]:
        if r is None:
            continue
        iid = len(images) + 1
        images.append({"id": iid, "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
        for name, (x0, y0, x1, y1), difficult in r["objects"]:
            box = [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat[name], "bbox": box,
                         "area": box[2] * box[3], "iscrowd": int(difficult)})
    categories = [{"id": k, "name": n} for n, k in cat.items()]
    return validate_coco({"images": images, "annotations": anns, "categories": categories}, split_file(root, split),
                         root / "JPEGImages", deep=deep, problems=p, what="Pascal VOC")
