"""COCO bbox evaluation with pycocotools: a model on a dataset split, or an existing results file."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdctl.errors import KdctlError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""Names of the 12 numbers of ``COCOeval.stats``, in order."""


@dataclass
class EvalResult:
    """Metrics (``METRIC_NAMES``, fractions in [0, 1], -1 where undefined), per-class AP and throughput."""

    metrics: dict[str, float]
    per_class: dict[str, float]
    num_images: int
    num_detections: int
    seconds: float = 0.0
    images_per_second: float = 0.0
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics_percent"] = {k: (round(100 * v, 2) if v >= 0 else v) for k, v in self.metrics.items()}
        return d


def coco_eval(gt, results: list[dict[str, Any]], names: list[str] | None = None, cat_ids: list[int] | None = None):
    """Run COCOeval (bbox) of ``results`` (COCO results dicts) against a pycocotools COCO ``gt``.

    Returns ``(metrics, per_class, summary_text)``. Empty ``results`` give zeros (pycocotools refuses them).
    """
    from pycocotools.cocoeval import COCOeval

    cat_ids = cat_ids if cat_ids is not None else sorted(gt.getCatIds())
    names = names if names is not None else [gt.cats[c]["name"] for c in cat_ids]
    if not gt.dataset.get("annotations"):  # no ground truth: every metric is undefined (printed as n/a)
        return {k: -1.0 for k in METRIC_NAMES}, dict.fromkeys(names, -1.0), "no ground truth"
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}, dict.fromkeys(names, 0.0), "no detections"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats, strict=True)}
    # precision: [T IoU thresholds, R recall points, K categories, A area ranges, M max dets]
    prec = ev.eval["precision"]
    per_class = {}
    for cid, name in zip(cat_ids, names, strict=True):
        if cid not in ev.params.catIds:
            continue
        kk = list(ev.params.catIds).index(cid)
        p = prec[:, :, kk, 0, -1]
        p = p[p > -1]
        per_class[name] = float(np.mean(p)) if p.size else -1.0
    summary = "\n".join(line for line in buf.getvalue().splitlines() if line.startswith(" Average"))
    return metrics, per_class, summary


def evaluate_results_file(predictions: str | Path, annotations: str | Path) -> EvalResult:
    """Score an existing COCO results JSON against a COCO annotation file (exactly pycocotools' numbers)."""
    from pycocotools.coco import COCO

    ann_p, pred_p = Path(annotations), Path(predictions)
    for p, what in ((ann_p, "annotation"), (pred_p, "predictions")):
        if not p.is_file():
            raise KdctlError(f"{what} file {p} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann_p))
    except Exception as e:
        raise KdctlError(f"{ann_p}: not a readable COCO annotation file ({e.__class__.__name__}: {e})") from e
    try:
        results = json.loads(pred_p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdctlError(f"{pred_p}: not valid JSON ({e})") from e
    if not isinstance(results, list) or not all(
        isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"} <= r.keys() for r in results
    ):
        raise KdctlError(f"{pred_p}: not a COCO results list (need image_id, category_id, bbox, score per entry)")
    unknown_img = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown_img:
        raise KdctlError(f"{pred_p}: {len(unknown_img)} image ids are not in {ann_p.name} (e.g. {min(unknown_img)})")
    unknown_cat = {r["category_id"] for r in results} - set(gt.getCatIds())
    if unknown_cat:
        raise KdctlError(f"{pred_p}: {len(unknown_cat)} category ids are not in {ann_p.name} (e.g. {min(unknown_cat)})")
    t0 = time.perf_counter()
    metrics, per_class, summary = coco_eval(gt, results)
    return EvalResult(
        metrics=metrics, per_class=per_class, num_images=len(gt.getImgIds()), num_detections=len(results),
        seconds=time.perf_counter() - t0, summary=summary,
    )


def detections_to_coco(dets: list[dict], image_ids: list[int], cat_ids: list[int]) -> list[dict[str, Any]]:
    """Detector.predict outputs (xyxy, original pixels, dataset labels) -> COCO results dicts (xywh)."""
    out = []
    for det, iid in zip(dets, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        for b, s, lab in zip(xywh.tolist(), det["scores"].float().cpu().tolist(), det["labels"].cpu().tolist(),
                             strict=True):
            out.append({"image_id": int(iid), "category_id": int(cat_ids[lab]), "bbox": [round(v, 3) for v in b],
                        "score": round(float(s), 5)})
    return out


def evaluate_detector(
    detector,
    data,
    *,
    imgsz: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    workers: int = 0,
    amp_dtype=None,
    batches: Iterable | None = None,
    progress: Callable[[int, int], None] | None = None,
    results_out: list | None = None,
) -> EvalResult:
    """Run ``detector.predict`` over a validated split (:class:`kdctl.data.coco.CocoData`) and score it.

    The detector must already be on ``device`` with :meth:`Detector.set_classes` called for ``data.names``.
    ``batches`` replaces the loader (e.g. a DistributedSampler's); ``results_out`` receives the COCO results.
    ``progress(done, total)`` is called after each batch.
    """
    from kdctl.data.dataset import CocoDetection, make_loader

    ds = CocoDetection(data, imgsz or detector.imgsz, train=False)
    loader = batches if batches is not None else make_loader(ds, batch_size, shuffle=False, workers=workers,
                                                              pin_memory=str(device).startswith("cuda"))
    t0 = time.perf_counter()
    results, n_images = predict_coco(detector, loader, data.cat_ids, device, amp_dtype=amp_dtype,
                                     progress=(lambda done: progress(done, len(ds))) if progress else None)
    seconds = time.perf_counter() - t0
    if results_out is not None:
        results_out.extend(results)
    metrics, per_class, summary = coco_eval(data.pycocotools(), results, data.names, data.cat_ids)
    return EvalResult(
        metrics=metrics, per_class=per_class, num_images=n_images, num_detections=len(results), seconds=seconds,
        images_per_second=n_images / seconds if seconds > 0 else 0.0, summary=summary,
    )


def predict_coco(detector, batches: Iterable, cat_ids: list[int], device: str, *, amp_dtype=None,
                 progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], int]:
    """``detector.predict`` over ``batches`` (under autocast ``amp_dtype`` when given): COCO results dicts and the
    number of images seen. ``progress(images done)`` is called after each batch. The one prediction loop of
    ``kdctl eval`` and of the evaluation during training."""
    import torch

    dev = torch.device(device)
    results: list[dict[str, Any]] = []
    n_images = 0
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                dets = detector.predict(batch)
            results += detections_to_coco(dets, batch.image_ids, cat_ids)
            n_images += len(batch)
            if progress is not None:
                progress(n_images)
    return results, n_images
