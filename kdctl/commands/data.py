"""``kdctl data synth``, ``kdctl data check`` and ``kdctl data convert``."""

from __future__ import annotations

from pathlib import Path

from kdctl.commands.output import console, warn
from kdctl.errors import KdctlError


def dataset_splits(data: Path | str, split: str | None, format: str) -> tuple[Path, str, list[str]]:
    """A dataset folder's root, format and splits (``split`` alone when given); a missing folder is one line."""
    from kdctl.data.coco import present_splits

    root = Path(data).expanduser()
    if not root.is_dir():
        raise KdctlError(f"dataset folder {root} does not exist or is not a folder")
    fmt, present = present_splits(root, format)
    return root, fmt, [split] if split else present


def open_split(data: Path | str | None, split: str, *, ann: Path | None = None, images: Path | None = None,
               command: str = "train", deep: bool = False, format: str = "auto"):
    """:func:`kdctl.data.coco.open_split`, with its warnings printed."""
    from kdctl.data.coco import open_split as read_split

    cd = read_split(data, split, ann=ann, images=images, command=command, deep=deep, format=format)
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


def check_data(data: Path, *, split: str | None = None, deep: bool = False, plot: Path | None = None,
               format: str = "auto") -> None:
    """``kdctl data check``: validate every split present (or ``split``), opening every image file; print the
    summary, the boxes per class and per COCO size bucket, and the classes missing from a split; ``plot``: a PNG."""
    from rich.table import Table

    from kdctl.data.coco import LAYOUT, SPLITS
    from kdctl.data.stats import plot_labels, split_stats

    root, fmt, splits = dataset_splits(data, split, format)
    if not splits:
        raise KdctlError(f"{root}: no annotation file found; expected {LAYOUT.format(split='SPLIT')} "
                         f"(SPLIT: {', '.join(SPLITS)}), or a YOLO, Pascal VOC or Hugging Face datasets folder")
    t = Table(title=f"{data}" + (" (every image decoded)" if deep else ""))
    for col in ("split", "images", "boxes", "classes", "warnings"):
        t.add_column(col)
    stats = []
    for s in splits:
        cd = open_split(data, s, command="data check", deep=deep, format=fmt)
        t.add_row(s, str(len(cd.images)), str(len(cd.coco["annotations"])), str(cd.num_classes), str(len(cd.warnings)))
        stats.append(split_stats(cd, s))
    console().print(t)
    print_label_stats(stats)
    if plot is not None:
        console().print(f"wrote {plot_labels(stats, plot)}")


def print_label_stats(stats) -> None:
    """The boxes per class (class x split) and per COCO size bucket, then one warning per class with boxes in
    some splits and none in others."""
    from rich.table import Table

    from kdctl.data.stats import BUCKETS, all_names, class_gaps

    out = console()
    t = Table(title="boxes per class")
    t.add_column("class")
    for s in stats:
        t.add_column(s.split, justify="right")
    for name in all_names(stats):
        t.add_row(name, *[str(s.count(name)) if name in s.names else "-" for s in stats])
    out.print(t)
    t = Table(title="boxes per COCO size (annotation area: small < 32² ≤ medium < 96² ≤ large)")
    for col in ("split", *BUCKETS, "crowd", "images without boxes"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for s in stats:
        t.add_row(s.split, *[str(s.sizes[b]) for b in BUCKETS], str(s.crowd), str(s.images_without_boxes))
    out.print(t)
    for g in class_gaps(stats):
        if g.present:
            warn(f"class '{g.name}' has boxes in {', '.join(g.present)} but none in {', '.join(g.absent)}")
        else:
            warn(f"class '{g.name}' has no boxes in {', '.join(g.absent)}")


def convert_data(src: Path, dst: Path, *, to: str, format: str = "auto", split: str | None = None) -> None:
    """``kdctl data convert``: validate every split of ``src`` (or ``split``), then write them to the new folder
    ``dst`` as COCO or YOLO; a fatal problem writes nothing."""
    from kdctl.data.coco import check_same_classes
    from kdctl.data.formats.write import TARGETS, convert

    if to not in TARGETS:
        raise KdctlError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    root, fmt, names = dataset_splits(src, split, format)
    if not names:
        raise KdctlError(f"{root}: no split found to convert")
    splits = {s: open_split(root, s, command="data check", format=fmt) for s in names}
    first = next(iter(splits.values()))
    for cd in splits.values():
        check_same_classes(first, cd)
    for w in convert(splits, dst, to):
        warn(w)
    n_img = sum(len(cd.images) for cd in splits.values())
    n_box = sum(1 for cd in splits.values() for a in cd.coco["annotations"] if to == "coco" or not a.get("iscrowd"))
    console().print(f"wrote {n_img} images and {n_box} boxes ({', '.join(splits)}) of {root} ({fmt}) to {dst} as {to}")
