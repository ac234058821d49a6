"""``kdctl data synth`` and ``kdctl data check``."""

from __future__ import annotations

from pathlib import Path

from kdctl.commands.output import console, warn
from kdctl.errors import KdctlError


def open_split(data: Path | str | None, split: str, *, ann: Path | None = None, images: Path | None = None,
               command: str = "train", deep: bool = False):
    """:func:`kdctl.data.coco.open_split`, with its warnings printed."""
    from kdctl.data.coco import open_split as read_split

    cd = read_split(data, split, ann=ann, images=images, command=command, deep=deep)
    for w in cd.warnings:
        warn(w)
    return cd


def synth_data(out: Path, *, images: int, seed: int) -> dict[str, int]:
    from kdctl.data.synth import synthesize

    try:
        counts = synthesize(out, images, seed=seed)
    except OSError as e:  # read-only folder, a file in the way, disk full
        raise KdctlError(f"cannot write {e.filename or out}: {e.strerror or e.__class__.__name__}") from e
    console().print(f"wrote {sum(counts.values())} images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return counts


def check_data(data: Path, *, split: str | None = None, deep: bool = False) -> None:
    """``kdctl data check``: validate every split present (or ``split``), opening every image file."""
    from rich.table import Table

    from kdctl.data.coco import LAYOUT, SPLITS, annotation_candidates

    root = Path(data).expanduser()
    if not root.is_dir():
        raise KdctlError(f"dataset folder {root} does not exist or is not a folder")
    splits = [split] if split else [s for s in SPLITS if any(c.is_file() for c in annotation_candidates(root, s))]
    if not splits:
        raise KdctlError(f"{root}: no annotation file found; expected {LAYOUT.format(split='SPLIT')} "
                         f"(SPLIT: {', '.join(SPLITS)})")
    t = Table(title=f"{data}" + (" (every image decoded)" if deep else ""))
    for col in ("split", "images", "boxes", "classes", "warnings"):
        t.add_column(col)
    for s in splits:
        cd = open_split(data, s, command="data check", deep=deep)
        t.add_row(s, str(len(cd.images)), str(len(cd.coco["annotations"])), str(cd.num_classes), str(len(cd.warnings)))
    console().print(t)
