"""What the format readers share: split names, image sizes from file headers, file listings."""

from __future__ import annotations

import os
from pathlib import Path

from kdctl.data.images import TRANSPOSING, read_header, reason
from kdctl.errors import KdctlError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
"""kdctl's split name -> the names datasets give it (Roboflow: valid, Hugging Face: validation)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".mpo")
UNREADABLE = "unreadable or truncated image files"


def canonical_split(name: str) -> str | None:
    """kdctl's name (train, val, test) of a split a dataset calls ``name``; None for other names."""
    low = name.lower()
    return next((s for s, aliases in SPLIT_ALIASES.items() if low in aliases), None)


def image_size(path: Path, *, oriented: bool) -> tuple[int, int]:
    """(width, height) of an image file from its header: with its EXIF orientation applied when ``oriented`` (the
    frame YOLO tools label in), else as stored. Raises ValueError with one line when the file cannot be read."""
    try:
        if path.stat().st_size == 0:
            raise OSError("empty file")
        h = read_header(path)
    except Exception as e:  # PIL raises many types for a file it cannot identify
        raise ValueError(f"{path}: {reason(e)}") from e
    if oriented and h.orientation in TRANSPOSING:
        return h.height, h.width
    return h.width, h.height


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted, hidden folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return out


def no_split(root: Path, fmt: str, split: str, have: list[str]) -> KdctlError:
    """The error for a split the dataset does not have."""
    return KdctlError(f"{root}: the {fmt} dataset has no {split!r} split (it has: {', '.join(have) or 'none'})")
