"""YOLO (Ultralytics) datasets: ``data.yaml`` + ``images/`` + ``labels/``.

``data.yaml`` gives ``path`` (the dataset root; relative to the yaml's folder, which it defaults to), ``train``,
``val`` and ``test`` (an image folder, a ``.txt`` list of image paths, or a list of those, relative to ``path``;
as in Ultralytics, ``../x`` that does not exist is read as ``x``, which Roboflow's YOLO exports need) and
``names`` (a list, or a dict of class index -> name). The labels of ``.../images/.../x.jpg`` are in
``.../labels/.../x.txt`` (beside the image when its path has no ``images`` folder): one ``class cx cy w h`` line
per box, normalised to [0, 1] by the image size, which is read from the file's header (with its EXIF orientation
applied, the frame YOLO tools label in). An image without a label file has no boxes.

Fatal, with a count and an example (file and line): a class index outside ``names``, a line without 5 columns, a
value that is not a number, a coordinate outside [0, 1]; then the usual COCO rules.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdctl.data.formats.common import SPLIT_ALIASES, SPLITS, UNREADABLE, image_size, list_images, no_split
from kdctl.data.validate import CocoData, Problems, validate_coco
from kdctl.errors import KdctlError

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
COLUMNS = "label lines without 5 columns (class cx cy w h)"
NOT_NUMBER = "label values that are not numbers"
OUTSIDE = "label coordinates outside [0, 1]"
UNREADABLE_LABELS = "unreadable label files"


@dataclass
class YoloConfig:
    """What ``data.yaml`` says: its file, the dataset root, class index -> name, split -> entries."""

    yaml: Path
    base: Path
    names: dict[int, str]
    entries: dict[str, list[Any]]


def yaml_file(root: Path) -> Path | None:
    return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)


def looks_like(root: Path) -> bool:
    return yaml_file(root) is not None


def splits(root: Path) -> list[str]:
    return list(read_config(root).entries)


def parse_names(names: Any, where: Path) -> dict[int, str]:
    """``names`` of data.yaml (a list, or a dict of index -> name) as index -> name."""
    if isinstance(names, (list, tuple)):
        out = dict(enumerate(names))
    elif isinstance(names, dict):
        try:
            out = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise KdctlError(f"{where}: names: the keys of a names mapping must be class indices ({e})") from e
    else:
        raise KdctlError(f"{where}: no class names (expected `names:` as a list, or a mapping index: name)")
    if not out or any(k < 0 for k in out) or not all(isinstance(v, (str, int, float)) for v in out.values()):
        raise KdctlError(f"{where}: names must be a non-empty list of names, or a mapping index (>= 0): name")
    return {k: str(v) for k, v in sorted(out.items())}


def read_config(root: Path) -> YoloConfig:
    import yaml

    path = yaml_file(root)
    if path is None:
        raise KdctlError(f"{root}: no {' or '.join(YAML_NAMES)} (not a YOLO dataset folder)")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KdctlError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from e
    if not isinstance(cfg, dict):
        raise KdctlError(f"{path}: not a YOLO data.yaml (expected a mapping with path, train, val, names)")
    names = parse_names(cfg.get("names"), path)
    if isinstance(cfg.get("nc"), int) and cfg["nc"] != len(names):
        raise KdctlError(f"{path}: nc is {cfg['nc']} but names has {len(names)} classes")
    base = Path(os.path.expanduser(str(cfg.get("path") or ".")))
    base = base if base.is_absolute() else path.parent / base
    entries = {}
    for split in SPLITS:
        key = next((k for k in SPLIT_ALIASES[split] if cfg.get(k)), None)
        if key is not None:
            value = cfg[key]
            entries[split] = list(value) if isinstance(value, (list, tuple)) else [value]
    return YoloConfig(path, base, names, entries)


def resolve_entry(cfg: YoloConfig, entry: Any) -> Path:
    """An image folder or list file named in data.yaml, relative to the dataset root."""
    text = os.path.expanduser(str(entry))
    p = Path(text) if Path(text).is_absolute() else cfg.base / text
    if not p.exists() and text.startswith("../"):
        p = cfg.base / text[3:]
    if not p.exists():
        raise KdctlError(f"{cfg.yaml}: {entry} (from {cfg.base}) does not exist")
    return p


def split_images(cfg: YoloConfig, split: str) -> tuple[list[Path], Path]:
    """(the image files of ``split``, the folder their file names are relative to)."""
    files: list[Path] = []
    folders = []
    for entry in cfg.entries[split]:
        p = resolve_entry(cfg, entry)
        if p.is_dir():
            files += list_images(p)
            folders.append(p)
            continue
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                q = Path(os.path.expanduser(line))
                files.append(q if q.is_absolute() else (p.parent if line.startswith("./") else cfg.base) / q)
    if len(folders) == len(cfg.entries[split]) == 1:
        return files, folders[0]
    root = Path(os.path.commonpath([str(f.parent.absolute()) for f in files])) if files else cfg.base
    return [f.absolute() for f in files], root


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        i = len(parts) - 2 - parts[-2::-1].index("images")
        parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def snap(v: float, side: float) -> float:
    """A pixel coordinate rounded to 1e-6 px, and put on the image's edge when the rounding of the normalised
    values (1e-6 relative in files written with 6 decimals) is all that takes it past it."""
    v = round(v, 6)
    tol = 1e-5 * side
    return 0.0 if -tol < v < 0 else side if side < v < side + tol else v


def parse_label(text: str, where: str, size: tuple[int, int], names: dict[int, str], p: Problems) -> list[tuple]:
    """(class index, [x, y, w, h] in pixels) of each valid line of a label file; bad lines go to ``p``."""
    W, H = size
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        cols = line.split()
        if not cols:
            continue
        at = f"{where}:{n}: {line.strip()[:60]!r}"
        if len(cols) != 5:
            p.bad(COLUMNS, at)
            continue
        try:
            c, cx, cy, w, h = (float(v) for v in cols)
        except ValueError:
            p.bad(NOT_NUMBER, at)
            continue
        if not (c.is_integer() and int(c) in names):
            p.bad(f"class indices outside names (0-{max(names)})", f"{where}:{n}: class {cols[0]}")
            continue
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            p.bad(OUTSIDE, at)
            continue
        x0, x1 = (snap((cx + d * w / 2) * W, W) for d in (-1, 1))
        y0, y1 = (snap((cy + d * h / 2) * H, H) for d in (-1, 1))
        out.append((int(c), [x0, y0, x1 - x0, y1 - y0]))
    return out


def read(root: Path, split: str, *, deep: bool = False) -> CocoData:
    cfg = read_config(root)
    if split not in cfg.entries:
        raise no_split(root, "YOLO", split, list(cfg.entries))
    files, image_dir = split_images(cfg, split)
    p = Problems()
    images: list[dict] = []
    anns: list[dict] = []
    for path in files:
        try:
            w, h = image_size(path, oriented=True)
        except ValueError as e:
            p.bad(UNREADABLE, e)
            continue
        iid = len(images) + 1
        images.append({"id": iid, "file_name": path.relative_to(image_dir).as_posix(), "width": w, "height": h})
        lp = label_path(path)
        if not lp.is_file():
            continue
        try:
            text = lp.read_text()
        except (OSError, UnicodeDecodeError) as e:
            p.bad(UNREADABLE_LABELS, f"{lp}: {e}")
            continue
        where = os.path.relpath(lp.absolute(), cfg.base.absolute())
        for c, box in parse_label(text, where, (w, h), cfg.names, p):
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": c + 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": k + 1, "name": v} for k, v in cfg.names.items()]
    source = label_path(image_dir / "x").parent  # the split's label folder
    return validate_coco({"images": images, "annotations": anns, "categories": cats}, source, image_dir,
                         deep=deep, problems=p, what="YOLO")
