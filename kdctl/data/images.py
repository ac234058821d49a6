"""The image files of a COCO split: readable, of the size their annotation gives, and which way up.

kdctl decodes every image with torchvision's ``decode_image`` (:func:`decode`): training, evaluation and the
teacher see the same pixels. :func:`check_image_files` runs before any work starts (``kdctl data check``, train,
distill, eval): it opens every file (the header only: format, size, EXIF orientation; PNG and JPEG files whose
end marker is missing are decoded in full, which finds truncated files) and decides per image whether its EXIF
orientation is applied. ``deep=True`` decodes every file.

EXIF orientation rule. Annotation tools (CVAT, Label Studio, browsers, OpenCV) show a photo the way its EXIF
orientation says and write the size they show, so the annotation's width x height says which frame its boxes
are in:

* equal to the EXIF-oriented size only: the orientation is applied (a photo stored sideways, labelled upright);
* equal to the stored size only: the stored pixels are used (the annotation describes them), with a warning;
* equal to both (a flip or a 180-degree turn, or a square image): the orientation is applied, as viewers do,
  with a warning, since the size cannot tell;
* equal to neither: a fatal problem; the boxes would be rescaled to the wrong place.

Only JPEG and PNG orientations count (torchvision applies no other); other formats are used as stored.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError

EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height
ORIENTED_FORMATS = ("JPEG", "MPO", "PNG")  # PIL's names of the formats decode_image orients
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}

UNREADABLE = "unreadable or truncated image files"
SIZE_MISMATCH = "images whose pixel size differs from the annotation's width/height"
KEPT_RAW = "images stored sideways whose annotation gives the stored size, used as stored (EXIF orientation ignored)"
AMBIGUOUS = "images with an EXIF flip or 180-degree turn (the size cannot tell), used as viewers show them"


@dataclass
class Header:
    """What the first bytes (and the last few) of an image file say, without decoding the pixels."""

    width: int
    height: int
    orientation: int  # EXIF orientation 1-8 (1 for none, and for formats decode_image does not orient)
    format: str
    complete: bool  # the file ends with its format's end marker (True for formats without one)


@dataclass
class ImageFiles:
    """What :func:`check_image_files` found: ``fatal`` (kind, example) pairs, ``notes`` (warning kind -> count)
    and ``apply_exif``, the ids of the images whose EXIF orientation is applied."""

    fatal: list[tuple[str, str]] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    apply_exif: set[int] = field(default_factory=set)


def read_header(path: Path) -> Header:
    """Format, size and EXIF orientation of an image file, and whether it ends as its format requires.

    Raises what PIL raises for a file it cannot identify (OSError, SyntaxError, ValueError...).
    """
    from PIL import Image

    with open(path, "rb") as f:
        with Image.open(f) as im:
            (w, h), fmt = im.size, im.format or ""
            exif = im.info.get("exif") if fmt in ORIENTED_FORMATS else None
        orientation = 1
        if exif:
            tags = Image.Exif()
            tags.load(exif)
            value = tags.get(EXIF_ORIENTATION, 1)
            orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
        complete = True
        if fmt in END_MARKERS:
            end = f.seek(0, 2)
            f.seek(max(0, end - 64))
            complete = f.read().rstrip(b"\0\r\n ").endswith(END_MARKERS[fmt])
    return Header(w, h, orientation, fmt, complete)


def choose_frame(header: Header, width: Any, height: Any) -> tuple[bool | None, str | None]:
    """(apply the EXIF orientation?, warning kind or None) for an annotation of ``width`` x ``height``;
    ``(None, None)`` when neither the stored nor the oriented size is the annotation's (see the module rule)."""
    ann = (round(float(width)), round(float(height)))
    raw = (header.width, header.height)
    if header.orientation == 1:
        return (False, None) if ann == raw else (None, None)
    oriented = raw[::-1] if header.orientation in TRANSPOSING else raw
    if ann == oriented:
        return True, (AMBIGUOUS if ann == raw else None)
    if ann == raw:
        return False, KEPT_RAW
    return None, None


def decode(path: Path, apply_exif: bool = False):
    """uint8 [3, H, W] RGB pixels of an image file (torchvision); an unreadable file is a one-line KdctlError."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=apply_exif)
    except Exception as e:  # RuntimeError from torchvision's decoders, OSError from reading
        raise KdctlError(f"{path}: cannot read image ({reason(e)})") from e


def reason(e: BaseException) -> str:
    """One line about a reader's exception, without the C++ source location torchvision puts first."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file of a format PIL knows"
    text = " ".join(str(e).split())
    text = re.sub(r"^[\w()]+, \S+\.(?:cpp|h):\d+, ", "", text)
    if type(e) in (OSError, RuntimeError) and text:  # the decoders' plain errors: the text says it all
        return text
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def check_image_files(images: list[dict[str, Any]], image_dir: Path, *, deep: bool = False) -> ImageFiles:
    """Open every image file of ``images`` (COCO image entries with a positive width and height whose file
    exists): unreadable files and sizes the annotation does not give are fatal; ``deep`` decodes every file."""
    out = ImageFiles()
    for im in images:
        path = image_dir / im["file_name"]
        try:
            if path.stat().st_size == 0:
                raise OSError("empty file")
            header = read_header(path)
        except Exception as e:  # PIL: UnidentifiedImageError (an OSError), SyntaxError, ValueError, bomb errors...
            out.fatal.append((UNREADABLE, f"{path}: {reason(e)}"))
            continue
        apply, note = choose_frame(header, im["width"], im["height"])
        if apply is None:
            out.fatal.append((SIZE_MISMATCH, f"{path} is {header.width}x{header.height}, the annotation says "
                                             f"{im['width']:g}x{im['height']:g}"))
            continue
        if deep or not header.complete:
            try:
                h, w = decode(path, apply).shape[-2:]
            except KdctlError as e:
                out.fatal.append((UNREADABLE, f"{path}: {reason(e.__cause__ or e)}"))
                continue
            if (w, h) != (round(float(im["width"])), round(float(im["height"]))):  # the decoder disagrees with PIL
                out.fatal.append((SIZE_MISMATCH, f"{path} decodes to {w}x{h}, the annotation says "
                                                 f"{im['width']:g}x{im['height']:g}"))
                continue
        if note:
            out.notes[note] += 1
        if apply:
            out.apply_exif.add(im["id"])
    return out
