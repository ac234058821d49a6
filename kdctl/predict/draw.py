"""Drawing and writing detections: boxes on the picture, YOLO label lines, COCO results entries.

Detections are ``{"boxes": float [D, 4] xyxy in the picture's pixels, "scores": [D], "labels": [D]}`` with labels
indexing ``names``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# Ultralytics' 20-colour palette: one colour per class index (modulo 20)
PALETTE = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
           "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")


def class_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of class ``index``."""
    h = PALETTE[int(index) % len(PALETTE)]
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (ITU-R BT.601 luma), so label text stays readable."""
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


@cache
def label_font() -> str | None:
    """A TrueType font for labels (DejaVu Sans from matplotlib, when installed; else PIL's default bitmap font)."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # matplotlib missing or without fonts: the default font
        return None


def draw(image: Any, det: dict[str, Any], names: list[str]) -> Any:
    """uint8 [3, H, W] -> uint8 [3, H, W] with each box outlined in its class colour and labelled ``name score``
    on a filled tag (``torchvision.utils.draw_bounding_boxes``); line width and font size follow the picture."""
    from torchvision.utils import draw_bounding_boxes

    if not len(det["boxes"]):
        return image
    h, w = image.shape[-2:]
    labels = det["labels"].tolist()
    colours = [class_colour(c) for c in labels]
    text = [f"{names[c] if 0 <= c < len(names) else c} {s:.2f}" for c, s in zip(labels, det["scores"].tolist(),
                                                                            strict=True)]
    font = label_font()
    width = max(2, round((h + w) / 2 * 0.003))  # Ultralytics' line width
    return draw_bounding_boxes(
        image, det["boxes"].float().cpu(), labels=text, colors=colours, width=width,
        font=font, font_size=max(11, round((h + w) / 2 * 0.03)) if font else None,
        fill_labels=True, label_colors=[text_colour(c) for c in colours],
    )


def yolo_lines(det: dict[str, Any], width: int, height: int, conf: bool = False) -> list[str]:
    """``class cx cy w h`` per detection, coordinates normalised to the picture (the YOLO label format, which
    ``kdctl data`` reads back); ``conf``: the score appended as a sixth column (Ultralytics' ``--save-conf``)."""
    out = []
    for (x0, y0, x1, y1), s, c in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                      strict=True):
        cx, cy, bw, bh = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
        out.append(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}" + (f" {s:.5f}" if conf else ""))
    return out


def coco_results(det: dict[str, Any], image_id: int) -> list[dict[str, Any]]:
    """COCO results entries: ``bbox`` [x, y, w, h] pixels, ``category_id`` = class index + 1 (the ids of
    ``categories`` in ``images.json``), ``score``."""
    return [{"image_id": image_id, "category_id": int(c) + 1,
             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(s, 5)}
            for (x0, y0, x1, y1), s, c in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                              strict=True)]


__all__ = ["PALETTE", "class_colour", "coco_results", "draw", "label_font", "text_colour", "yolo_lines"]
