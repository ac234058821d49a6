"""Label statistics of validated COCO splits (``kdctl data check``) and their PNG plot.

:func:`split_stats` summarises one :class:`~kdctl.data.coco.CocoData`: boxes per class, images without boxes, crowd
annotations, COCO size buckets and each box's width, height and centre relative to its image. :func:`class_gaps`
compares splits: a class with boxes in one split and none in another (or none anywhere). :func:`plot_labels`
draws the class counts, the size buckets and the box centre and width/height distributions (as Ultralytics'
``labels.jpg``).

Size buckets follow the COCO evaluation (pycocotools): they use each annotation's ``area`` field, which is the
segmentation mask's area in the official COCO files and the box area ``w * h`` where the field is missing (kdctl
fills it in when it reads the file; a non-numeric ``area`` also counts as ``w * h``). small: area < 32^2, medium:
32^2 <= area < 96^2, large: area >= 96^2. pycocotools' ranges are closed at both ends, so a box of area exactly
32^2 or 96^2 counts in two of its ranges; here each box counts in one bucket, the larger. Every annotation is
counted, crowd ones (``iscrowd`` 1, which COCO evaluation ignores) included; ``crowd`` says how many there are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdctl.io import write_error

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.data.coco import CocoData

SMALL, LARGE = 32**2, 96**2
"""The COCO area thresholds: small < SMALL <= medium < LARGE <= large."""
BUCKETS = ("small", "medium", "large")


def size_bucket(area: float) -> str:
    """The COCO size bucket of an annotation area: small < 32^2 <= medium < 96^2 <= large."""
    return "small" if area < SMALL else "medium" if area < LARGE else "large"


@dataclass
class SplitStats:
    """One split's label statistics. ``per_class[k]`` counts the boxes of ``names[k]`` (dataset class k);
    ``rel_w``/``rel_h`` are each box's width/height over its image's, ``rel_cx``/``rel_cy`` its centre likewise."""

    split: str
    names: list[str]
    images: int
    per_class: list[int]
    images_without_boxes: int = 0
    crowd: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0))
    rel_w: list[float] = field(default_factory=list)
    rel_h: list[float] = field(default_factory=list)
    rel_cx: list[float] = field(default_factory=list)
    rel_cy: list[float] = field(default_factory=list)

    @property
    def boxes(self) -> int:
        return sum(self.per_class)

    def count(self, name: str) -> int:
        """Boxes of the class called ``name`` (0 for a class this split does not list)."""
        return sum(n for c, n in zip(self.names, self.per_class, strict=True) if c == name)


def _area(a: dict[str, Any], w: float, h: float) -> float:
    v = a.get("area")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else w * h


def split_stats(cd: CocoData, split: str) -> SplitStats:
    """The label statistics of one validated split."""
    index = cd.class_index()
    st = SplitStats(split=split, names=list(cd.names), images=len(cd.images), per_class=[0] * cd.num_classes)
    size = {im["id"]: (float(im["width"]), float(im["height"])) for im in cd.images}
    for a in cd.coco["annotations"]:
        x, y, w, h = (float(v) for v in a["bbox"])
        st.per_class[index[a["category_id"]]] += 1
        st.sizes[size_bucket(_area(a, w, h))] += 1
        st.crowd += bool(a.get("iscrowd"))
        W, H = size[a["image_id"]]
        st.rel_w.append(w / W)
        st.rel_h.append(h / H)
        st.rel_cx.append((x + w / 2) / W)
        st.rel_cy.append((y + h / 2) / H)
    st.images_without_boxes = sum(1 for im in cd.images if not cd.anns_by_image.get(im["id"]))
    return st


@dataclass(frozen=True)
class ClassGap:
    """A class with boxes in the splits ``present`` and none in the splits ``absent`` (``present`` empty: no box
    in any split)."""

    name: str
    present: tuple[str, ...]
    absent: tuple[str, ...]


def all_names(stats: list[SplitStats]) -> list[str]:
    """The class names of every split, in the order they first appear."""
    return list(dict.fromkeys(n for s in stats for n in s.names))


def class_gaps(stats: list[SplitStats]) -> list[ClassGap]:
    """Classes (by name) with boxes in some of the splits but not all, or in none, in class order."""
    gaps = []
    for name in all_names(stats):
        present = tuple(s.split for s in stats if s.count(name))
        if len(present) < len(stats):
            gaps.append(ClassGap(name, present, tuple(s.split for s in stats if s.split not in present)))
    return gaps


def _bars(ax, groups: list[str], stats: list[SplitStats], values, title: str) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per split, ``values(split_stats, group)``."""
    width = 0.8 / max(len(stats), 1)
    for j, s in enumerate(stats):
        xs = [i + (j - (len(stats) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [values(s, g) for g in groups], width, label=s.split)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=90 if len(groups) > 8 else 0, fontsize=7 if len(groups) > 20 else 9)
    ax.set_ylabel("boxes")
    ax.set_title(title)
    ax.legend(fontsize=7)


def _hist2d(ax, xs: list[float], ys: list[float], xlabel: str, ylabel: str, title: str) -> None:
    if xs:
        ax.hist2d(xs, ys, bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    else:
        ax.text(0.5, 0.5, "no boxes", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_labels(stats: list[SplitStats], out: str | Path) -> Path:
    """A PNG of the labels: boxes per class and per size bucket (one bar per split), and 2-D histograms of the box
    centres and of the widths against heights (relative to the image, every split together). Written atomically;
    an OS error is one KdctlError line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = {k: [v for s in stats for v in getattr(s, k)] for k in ("rel_w", "rel_h", "rel_cx", "rel_cy")}
    n = len(pool["rel_w"])
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 9))
    _bars(a, all_names(stats), stats, SplitStats.count, "boxes per class")
    _bars(b, list(BUCKETS), stats, lambda s, g: s.sizes[g], "COCO sizes (area: small < 32² ≤ medium < 96² ≤ large)")
    _hist2d(c, pool["rel_cx"], pool["rel_cy"], "x (centre / image width)", "y (centre / image height)",
            f"box centres ({n} boxes)")
    c.invert_yaxis()  # image coordinates: y down
    _hist2d(d, pool["rel_w"], pool["rel_h"], "width / image width", "height / image height",
            f"box width and height ({n} boxes)")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, out)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise write_error(out, e) from e
    finally:
        plt.close(fig)
    return out
