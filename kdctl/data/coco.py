"""Datasets as commands open them: the format of a dataset folder, its splits, one validated split.

A dataset folder is read in one of these formats (:mod:`kdctl.data.formats`), detected in this order
(``--format`` forces one):

* ``coco``: ``DIR/{train,val,test}.json`` + ``DIR/images/``, the official
  ``DIR/annotations/instances_{train,val}2017.json`` + ``DIR/{train,val}2017/``, or a Roboflow export
  ``DIR/{train,valid,test}/_annotations.coco.json`` (``--train-ann``, ``--val-ann`` and ``--images`` override
  the layout, and imply COCO);
* ``yolo``: ``DIR/data.yaml`` (or ``data.yml``);
* ``voc``: ``DIR/Annotations/`` and ``DIR/ImageSets/Main/``;
* ``hf``: a Hugging Face ``datasets`` folder (``dataset_dict.json``, ``state.json`` or ``*.parquet`` files).

A folder that is none of them is taken as COCO (whose error names what it looked for). Whatever the format, a
split is a validated :class:`CocoData` (the rules are in :mod:`kdctl.data.validate`): a COCO dict in memory that
pycocotools evaluates and :class:`kdctl.data.dataset.CocoDetection` serves, so teacher and student see the same
pixels whatever the format.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from kdctl.data.formats.coco import LAYOUT, annotation_candidates, find_split
from kdctl.data.formats.common import SPLITS
from kdctl.data.validate import CocoData, load_coco, read_annotations, validate_coco
from kdctl.errors import KdctlError
from kdctl.io import read_json

__all__ = ["FORMATS", "LAYOUT", "SPLITS", "CocoData", "annotation_candidates", "check_same_classes",
           "detect_format", "find_split", "load_coco", "load_label_map", "open_split", "present_splits",
           "read_annotations", "split_options", "validate_coco"]

FORMATS = ("auto", "coco", "yolo", "voc", "hf")
FORMAT_NAMES = {"coco": "COCO", "yolo": "YOLO", "voc": "Pascal VOC", "hf": "Hugging Face datasets"}
EXPECTED = {"yolo": "data.yaml (or data.yml) with images/ and labels/",
            "voc": "Annotations/*.xml, JPEGImages/ and ImageSets/Main/{train,val,test}.txt",
            "hf": "a save_to_disk folder (dataset_dict.json, or state.json) or *.parquet files"}


def reader(fmt: str) -> ModuleType:
    """The module of :mod:`kdctl.data.formats` that reads ``fmt``."""
    if fmt == "coco":
        from kdctl.data.formats import coco as mod
    elif fmt == "yolo":
        from kdctl.data.formats import yolo as mod
    elif fmt == "voc":
        from kdctl.data.formats import voc as mod
    elif fmt == "hf":
        from kdctl.data.formats import hf as mod
    else:
        raise KdctlError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return mod


def detect_format(root: str | Path) -> str:
    """The format of dataset folder ``root`` (coco, yolo, voc or hf; coco when none matches)."""
    root = Path(root).expanduser()
    return next((f for f in ("coco", "yolo", "voc", "hf") if reader(f).looks_like(root)), "coco")


def resolve_format(root: Path | str | None, fmt: str = "auto", *, overrides: bool = False) -> str:
    """``fmt`` checked, or the detected format of ``root`` for ``auto``; ``overrides`` (annotation or image files
    given) means COCO."""
    if fmt != "auto":
        reader(fmt)  # an unknown name is an error
    if overrides:
        if fmt not in ("auto", "coco"):
            raise KdctlError(f"--format {fmt}: annotation and image file options (--train-ann, --val-ann, --images) "
                             f"give COCO files; leave them out for a {FORMAT_NAMES[fmt]} folder")
        return "coco"
    if fmt != "auto":
        return fmt
    if root is None or not Path(root).expanduser().is_dir():
        return "coco"  # find_split says what is missing
    return detect_format(root)


def folder_reader(root: Path, fmt: str) -> ModuleType:
    """The reader of ``fmt`` for folder ``root``; a folder that is not of that format is a KdctlError."""
    mod = reader(fmt)
    if fmt != "coco" and not mod.looks_like(root):
        raise KdctlError(f"{root}: not a {FORMAT_NAMES[fmt]} folder (--format {fmt}: expected {EXPECTED[fmt]})")
    return mod


def present_splits(root: str | Path, fmt: str = "auto") -> tuple[str, list[str]]:
    """(format, the splits present among train, val and test) of dataset folder ``root``."""
    fmt = resolve_format(root, fmt)
    root = Path(root).expanduser()
    return fmt, folder_reader(root, fmt).splits(root)


def load_label_map(path: str | Path | None) -> dict[str, str] | None:
    """Read a ``--label-map`` JSON file: {"dataset class name": "model label name"}."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise KdctlError(f"label map {p} does not exist")
    m = read_json(p, "label map", expect=None)
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


# --------------------------------------------------------------------------- one split, as a command asks
def split_options(command: str, split: str) -> dict[str, str]:
    """The options of ``command`` that give the files of ``split`` (the hints of data errors name them)."""
    if command == "data check":  # a dataset folder only
        return {}
    ann = "--val-ann" if command == "eval" else {"train": "--train-ann", "val": "--val-ann"}.get(split)
    return {"data": "--data", "images": "--images"} | ({"ann": ann} if ann else {})


def open_split(data: Path | str | None, split: str, *, ann: Path | None = None, images: Path | None = None,
               command: str = "train", deep: bool = False, format: str = "auto") -> CocoData:
    """Locate, read and validate one split; fixable problems are in ``warnings``, fatal ones raise KdctlError.

    ``format`` is auto (detected) or one of :data:`FORMATS`; ``ann`` and ``images`` (COCO files) override the
    layout. ``command`` (train, distill, eval or data check) is the one whose options the hints name; ``deep``
    decodes every image (the default reads each file's header and end).
    """
    fmt = resolve_format(data, format, overrides=ann is not None or images is not None)
    if fmt == "coco":
        from kdctl.data.formats.coco import load

        ann_p, img_p = find_split(data, split, ann=ann, images=images, options=split_options(command, split))
        return load(ann_p, img_p, deep=deep)
    if data is None:
        raise KdctlError(f"no dataset folder given for --format {fmt}")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise KdctlError(f"dataset folder {root} does not exist or is not a folder")
    return folder_reader(root, fmt).read(root, split, deep=deep)
