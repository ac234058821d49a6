"""Shared fixtures: offline mode, tiny COCO folders written in code, tiny models saved to temp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription, which made small
# convolutions hundreds of times slower when several processes competed for the cores.
torch.set_num_threads(int(os.environ.get("KDCTL_TEST_THREADS", "1")))  # KDCTL_TEST_THREADS=2: the 2-thread run

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict],
               splits=("train", "val"), draw: bool = True) -> Path:
    """Write ``root/{split}.json`` (same content per split) and, when ``draw``, the images as PNG files."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True, exist_ok=True)
    if draw:
        for im in images:
            w, h = int(im["width"]), int(im["height"])
            pic = Image.new("RGB", (w, h), (40, 40, 40))
            d = ImageDraw.Draw(pic)
            for a in annotations:
                if a.get("image_id") == im["id"] and isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4:
                    x, y, bw, bh = a["bbox"]
                    if bw >= 1 and bh >= 1:
                        d.rectangle([x, y, x + bw - 1, y + bh - 1], fill=(200, 60 + 40 * a["category_id"], 60))
            pic.save(root / "images" / im["file_name"])
    coco = {"images": images, "annotations": annotations, "categories": categories}
    for s in splits:
        (root / f"{s}.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    """A valid 4-image, 2-class dataset (images 96x64 and 64x80) with 1-3 boxes per image and one empty image."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 96, "height": 64},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 80},
        {"id": 3, "file_name": "c.png", "width": 96, "height": 64},
        {"id": 4, "file_name": "d.png", "width": 96, "height": 64},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 6, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 10, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 50], "area": 1000, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [0, 0, 96, 64], "area": 6144, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 6, "image_id": 3, "category_id": 2, "bbox": [60, 30, 12, 14], "area": 168, "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return write_coco(tmp_path / "tiny", images, anns, cats)


TINY_CNN = {"fpn_channels": 16, "trainable_layers": 5, "topk_candidates": 50, "detections_per_img": 20}
"""Preset overrides that make a CNN detector small enough for CPU tests."""


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A 10-image synthetic COCO folder (7 train images)."""
    from kdctl.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, 10, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_retinanet(tmp_path_factory, synth) -> str:
    """A small RetinaNet (ResNet-18, 16-channel FPN, GroupNorm, imgsz 64) saved as a kdctl directory."""
    from kdctl.specs import load_detector

    names = [c["name"] for c in json.loads((synth / "train.json").read_text())["categories"]]
    det = load_detector("retinanet-r18-fpn", label_names=names, pretrained_backbone=False, overrides=TINY_CNN)
    det.imgsz = 64
    return str(det.save(tmp_path_factory.mktemp("m") / "tiny"))
