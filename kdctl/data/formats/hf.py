"""Hugging Face ``datasets`` object-detection datasets (``pip install "kdctl[datasets]"``).

A folder written by ``save_to_disk`` (``dataset_dict.json`` with one folder per split, or ``state.json`` for one
``Dataset``, read as the train split) or holding ``*.parquet`` files (the Hub layout ``data/train-*.parquet``, or
``train/*.parquet``, ``default/train/*.parquet``, ``train.parquet``: two folders deep at most). Split names
``validation`` and ``valid`` are kdctl's ``val``. The schema is cppe-5's: an ``image`` column (an ``Image``
feature, or a file path), an ``objects`` column with ``bbox`` (COCO ``[x, y, w, h]`` in pixels) and
``category`` (a ``ClassLabel``, whose names are the class names) per box; ``width`` and ``height`` columns, when
present, give the frame the boxes are in (else the stored image size).

Images. kdctl's loader reads image files by path, so that teacher and student decode the same file the same way:
an image stored as a path to an existing file is used in place; one stored as bytes (what ``save_to_disk`` and
parquet hold) is written once, byte for byte (no re-encoding), to the cache folder
``$KDCTL_CACHE/hf-images/KEY/SPLIT/`` (``$KDCTL_CACHE`` defaults to ``$XDG_CACHE_HOME/kdctl``, that is
``~/.cache/kdctl``); KEY hashes the dataset's path and its data files' sizes and times, so a changed dataset gets
a fresh folder, and a second read writes nothing.

Fatal, with a count and an example: no ``objects`` column (or one without ``bbox`` and ``category``, or whose
``category`` is not a ``ClassLabel``), rows whose ``bbox`` and ``category`` lists differ in length, images without
bytes whose file does not exist; then the usual COCO rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdctl.data.formats.common import SPLITS, UNREADABLE, canonical_split, image_size, no_split
from kdctl.data.validate import CocoData, Problems, validate_coco
from kdctl.errors import KdctlError
from kdctl.io import write_bytes

INSTALL = 'reading a Hugging Face datasets folder needs the datasets package: pip install "kdctl[datasets]"'
SCHEMA = "the cppe-5 schema: image, objects with bbox [x, y, w, h] and category (a ClassLabel)"
MAGIC = {b"\x89PNG": ".png", b"\xff\xd8": ".jpg", b"GIF8": ".gif", b"BM": ".bmp", b"RIFF": ".webp"}


def looks_like(root: Path) -> bool:
    return bool(split_sources(root))


def splits(root: Path) -> list[str]:
    return [s for s in SPLITS if s in split_sources(root)]


def split_sources(root: Path) -> dict[str, list[Path]]:
    """kdctl split -> what holds it: ``[folder]`` of a ``save_to_disk`` split, or its parquet files."""
    out: dict[str, list[Path]] = {}
    if (root / "dataset_dict.json").is_file():
        try:
            names = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            names = []
        for name in names:
            s = canonical_split(str(name))
            if s and s not in out and (root / str(name)).is_dir():
                out[s] = [root / str(name)]
        return out
    if (root / "state.json").is_file() and (root / "dataset_info.json").is_file():
        return {"train": [root]}
    found = {f for pattern in ("*.parquet", "*/*.parquet", "*/*/*.parquet") for f in root.glob(pattern)}
    for f in sorted(found):  # the Hub's data/train-*.parquet, train/*.parquet and default/train/*.parquet
        rel = f.relative_to(root).parts
        s = next((canonical_split(p) for p in rel[:-1] if canonical_split(p)), None)
        s = s or canonical_split(Path(rel[-1]).stem.split("-")[0])
        if s:
            out.setdefault(s, []).append(f)
    return out


def cache_root() -> Path:
    if os.environ.get("KDCTL_CACHE"):
        return Path(os.environ["KDCTL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kdctl"


def load_split(sources: list[Path]) -> tuple[Any, Iterator[dict[str, Any]]]:
    """(the split's ``datasets.Features``, its rows as plain values: images as ``{"bytes", "path"}``)."""
    try:
        import datasets
    except ImportError as e:
        raise KdctlError(INSTALL) from e
    if sources[0].suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table([str(s) for s in sources]) if len(sources) > 1 else pq.read_table(str(sources[0]))
        except Exception as e:  # pyarrow's errors for a bad file
            raise KdctlError(f"{sources[0]}: cannot read the parquet file ({' '.join(str(e).split())[:200]})") from e
        features = datasets.Features.from_arrow_schema(table.schema)
        batches = (b.to_pylist() for b in table.to_batches(max_chunksize=64))
    else:
        try:
            ds = datasets.load_from_disk(str(sources[0]))
        except Exception as e:  # FileNotFoundError, json and arrow errors of a damaged folder
            raise KdctlError(f"{sources[0]}: not a readable datasets folder ({' '.join(str(e).split())[:200]})") from e
        features = ds.features
        batches = (b.to_pylist() for b in ds.with_format("arrow").iter(batch_size=64))
    return features, (row for batch in batches for row in batch)


def class_names(features: Any, p: Problems) -> list[str] | None:
    """The ClassLabel names of ``objects.category``; None (the problem in ``p``) when the schema is not cppe-5's."""
    from datasets import ClassLabel

    cols = list(features)
    if "objects" not in features:
        p.bad(f"no 'objects' column (expected {SCHEMA})", f"columns: {', '.join(cols)}")
        return None
    f = features["objects"]
    fields = f if isinstance(f, dict) else getattr(f, "feature", None)  # dict of lists, or a list of dicts
    if not isinstance(fields, dict) or "bbox" not in fields or "category" not in fields:
        p.bad(f"an 'objects' column without bbox and category (expected {SCHEMA})", f"objects: {f}")
        return None
    cat = fields["category"]
    while not isinstance(cat, ClassLabel) and hasattr(cat, "feature"):
        cat = cat.feature
    if not isinstance(cat, ClassLabel):
        p.bad("objects.category is not a ClassLabel (the class names are unknown)", f"category: {cat}")
        return None
    return list(cat.names)


def boxes_of(objects: Any) -> list[tuple[Any, Any]] | None:
    """(bbox, category) pairs of one row's ``objects`` (a dict of lists or a list of dicts); None when the lists
    differ in length."""
    if not objects:
        return []
    if isinstance(objects, dict):
        bb, cc = objects.get("bbox") or [], objects.get("category") or []
        return list(zip(bb, cc, strict=True)) if len(bb) == len(cc) else None
    return [(o.get("bbox"), o.get("category")) for o in objects if isinstance(o, dict)]


class ImageFiles:
    """Where each row's image file is: in place, or written once into the cache folder ``cache``."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root, self.cache, self.names = root, cache, set()

    def place(self, row: int, value: Any) -> Path | None:
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
        if not data:
            if not path:
                return None
            p = Path(str(path)).expanduser()
            found = [q for q in ((p,) if p.is_absolute() else (self.root / p, p)) if q.is_file()]
            return found[0].absolute() if found else None
        name = Path(str(path)).name if path else f"{row:06d}"
        if not Path(name).suffix:
            name += next((ext for m, ext in MAGIC.items() if data.startswith(m)), ".img")
        if name in self.names:
            name = f"{row:06d}-{name}"
        self.names.add(name)
        target = self.cache / name
        if not (target.is_file() and target.stat().st_size == len(data)):
            try:
                write_bytes(target, data)
            except KdctlError as e:
                raise KdctlError(f"{e} (the dataset's image cache; set KDCTL_CACHE to a writable folder)") from e
        return target


def cache_key(root: Path, split: str, sources: list[Path]) -> str:
    files = [f for s in sources for f in (sorted(s.glob("*")) if s.is_dir() else [s])]
    stamp = [str(root.absolute()), split] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]


def read(root: Path, split: str, *, deep: bool = False) -> CocoData:
    sources = split_sources(root)
    if split not in sources:
        raise no_split(root, "Hugging Face datasets", split, [s for s in SPLITS if s in sources])
    features, rows = load_split(sources[split])
    source = sources[split][0] if sources[split][0].is_dir() else root / split
    p = Problems()
    names = class_names(features, p)
    p.raise_fatal(source, "Hugging Face")
    image_col = next((c for c, f in features.items() if type(f).__name__ == "Image"), "image")
    files = ImageFiles(sources[split][0] if sources[split][0].is_dir() else root,
                       cache_root() / "hf-images" / cache_key(root, split, sources[split]) / split)
    images, anns = [], []
    for i, row in enumerate(rows):
        path = files.place(i, row.get(image_col))
        if path is None:
            p.bad("images without bytes whose file does not exist", f"row {i}: {str(row.get(image_col))[:120]}")
            continue
        pairs = boxes_of(row.get("objects"))
        if pairs is None:
            p.bad("rows whose objects.bbox and objects.category differ in length", f"row {i}")
            continue
        try:
            w, h = image_size(path, oriented=False)
        except ValueError as e:
            p.bad(UNREADABLE, f"row {i}: {e}")
            continue
        if row.get("width") and row.get("height"):
            w, h = row["width"], row["height"]
        images.append({"id": i + 1, "file_name": str(path), "width": w, "height": h})
        for bbox, cat in pairs:
            a = {"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1 if isinstance(cat, int) else cat,
                 "bbox": bbox, "iscrowd": 0}
            if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
                a["area"] = bbox[2] * bbox[3]
            anns.append(a)
    image_dir = Path(os.path.commonpath([str(Path(im["file_name"]).parent) for im in images])) if images else root
    for im in images:
        im["file_name"] = Path(im["file_name"]).relative_to(image_dir).as_posix()
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(names or [])]
    return validate_coco({"images": images, "annotations": anns, "categories": cats}, source, image_dir,
                         deep=deep, problems=p, what="Hugging Face")
