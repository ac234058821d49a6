"""Evaluation throughput: ``kdctl eval`` (``evaluate_detector``) against a bare model loop (issue #7).

On the BCCD validation split (``../shared/data/bccd``, 87 images) with small detectors built from their presets
(random weights, BCCD class names), per model and image size, interleaved ``--repeat`` times (medians):

* ``bare``: ``model(inputs)`` of the wrapped ``nn.Module`` under ``no_grad`` over pre-loaded, pre-collated batches
  (torchvision: the list of unpadded images, with the score threshold / detection cap that evaluation uses;
  DETR: pre-computed ``pixel_values`` / ``pixel_mask``) -- the model's own forward and post-processing only;
* ``predict``: ``Detector.predict(batch)`` over the same batches (+ kdctl's adapter: label mapping, rescaling to
  original pixels, sorting);
* ``eval``: :func:`kdctl.engine.evaluate.evaluate_detector` end to end, timed from outside: data loading (decode,
  resize, collate), predict, conversion to COCO results and pycocotools' COCOeval.

and the parts of ``eval`` measured alone: the loader without a model, ``detections_to_coco`` and ``coco_eval``.
Target: eval images/s >= 0.9 x bare images/s.

    python benchmarks/eval_speed.py             # fasterrcnn-r18-fpn, fcos-mobilenet-v2, tiny DETR; 320 and 640 px
    python benchmarks/eval_speed.py --small     # 16 images at 128 px
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _results import cpu_model, machine_line, write_results  # benchmarks/_results.py (run as python benchmarks/X.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bccd"
TARGET = 0.9
MODELS = {  # name -> (preset, overrides)
    "fasterrcnn-r18-fpn": ("fasterrcnn-r18-fpn", {}),
    "fcos-mobilenet-v2": ("fcos-mobilenet-v2", {}),
    "detr-r18-tiny": ("detr-r18", {"encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 512,
                                   "decoder_ffn_dim": 512}),
}
SCORE_THRESHOLD, MAX_DETECTIONS = 0.001, 100  # what Detector.predict uses in evaluation


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import torch

    cpu = cpu_model()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads, "device": device, "load_average": list(os.getloadavg())}
    for mod in ("torchvision", "transformers", "pycocotools"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            info[mod] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def clock(fn: Callable[[], Any], device: str) -> tuple[tuple[float, float], Any]:
    """((wall seconds, process CPU seconds), fn()) synchronised on both sides."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0), out


# =========================================================================== data and model
def open_val(max_images: int | None):
    """The validated BCCD val split, optionally cut to its first ``max_images`` images."""
    from kdctl.data.coco import load_coco

    cd = load_coco(DATA / "val.json", DATA / "images")
    if max_images:
        keep = {im["id"] for im in cd.images[:max_images]}
        cd.images = cd.images[:max_images]
        cd.anns_by_image = {k: v for k, v in cd.anns_by_image.items() if k in keep}
        cd.coco = {**cd.coco, "images": [im for im in cd.coco["images"] if im["id"] in keep],  # the ground truth
                   "annotations": [a for a in cd.coco["annotations"] if a["image_id"] in keep]}
    return cd


def build_model(name: str, names: list[str], device: str):
    import torch

    from kdctl.specs import load_detector

    preset, over = MODELS[name]
    torch.manual_seed(0)
    det = load_detector(preset, label_names=names, pretrained_backbone=False, overrides=over)
    det.set_classes(names)
    return det.to(device).eval()


def preload(cd, imgsz: int, batch_size: int, device: str) -> tuple[tuple[float, float], list]:
    """((wall, CPU) seconds to load every batch with the library's loader, the batches on ``device``)."""
    from kdctl.data.dataset import CocoDetection, make_loader

    loader = make_loader(CocoDetection(cd, imgsz, train=False), batch_size, shuffle=False, workers=0)
    secs, batches = clock(lambda: list(loader), "cpu")
    return secs, [b.to(device) for b in batches]


def bare_inputs(det, batches: list) -> list[Callable[[], Any]]:
    """Per batch a closure calling the wrapped nn.Module on pre-computed inputs."""
    from kdctl.models.detr import DetrDetector

    calls = []
    for b in batches:
        if isinstance(det, DetrDetector):
            pv, pm = det.pixel_inputs(b)
            calls.append(lambda pv=pv, pm=pm: det.model(pixel_values=pv, pixel_mask=pm))
        else:
            images = [b.images[i, :, :h, :w] for i, (h, w) in enumerate(b.sizes)]
            calls.append(lambda images=images: det.model(images))
    return calls


def set_eval_thresholds(det) -> None:
    """Give a torchvision model the score threshold and detection cap that ``predict`` uses in evaluation."""
    owner = getattr(det.model, "roi_heads", det.model)
    if hasattr(owner, "score_thresh"):
        owner.score_thresh = SCORE_THRESHOLD
    if hasattr(owner, "detections_per_img"):
        owner.detections_per_img = MAX_DETECTIONS


# =========================================================================== measurements
def run_bare(calls: list, device: str) -> tuple[float, float]:
    import torch

    def loop() -> None:
        with torch.no_grad():
            for c in calls:
                c()

    return clock(loop, device)[0]


def run_predict(det, batches: list, device: str) -> tuple[tuple[float, float], list]:
    def loop() -> list:
        return [det.predict(b) for b in batches]

    return clock(loop, device)


def run_eval(det, cd, imgsz: int, batch_size: int, device: str, workers: int):
    """evaluate_detector end to end -> (EvalResult, COCO results)."""
    from kdctl.engine.evaluate import evaluate_detector

    results: list = []
    res = evaluate_detector(det, cd, imgsz=imgsz, batch_size=batch_size, device=device, workers=workers,
                            results_out=results)
    return res, results


def parts(cd, batches: list, dets: list, results: list, now: Callable[[], float]) -> dict[str, float]:
    """Seconds of ``detections_to_coco`` over every batch and of ``coco_eval`` on the results."""
    from kdctl.engine.evaluate import coco_eval, detections_to_coco

    t0 = now()
    for b, d in zip(batches, dets, strict=True):
        detections_to_coco(d, b.image_ids, cd.cat_ids)
    to_coco = now() - t0
    t0 = now()
    coco_eval(cd.pycocotools(), results, cd.names, cd.cat_ids)
    return {"to_coco_s": to_coco, "cocoeval_s": now() - t0}


def bench(name: str, imgsz: int, cd, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    det = build_model(name, list(cd.names), args.device)
    set_eval_thresholds(det)
    load_s, batches = preload(cd, imgsz, args.batch_size, args.device)
    calls = bare_inputs(det, batches)
    n = sum(len(b) for b in batches)
    run_bare(calls[:1], args.device)  # warm-up
    run_predict(det, batches[:1], args.device)
    # process CPU time is the basis with one torch thread and in-process loading on CPU (immune to other processes
    # taking the cores); wall time otherwise
    use_cpu = args.device == "cpu" and args.workers == 0 and torch.get_num_threads() == 1
    pick = 1 if use_cpu else 0
    rows: dict[str, list[tuple[float, float]]] = {"bare": [], "predict": [], "eval": [], "load": [load_s]}
    dets, results, res = None, None, None
    for r in range(args.repeat):
        rows["bare"].append(run_bare(calls, args.device))
        secs, dets = run_predict(det, batches, args.device)
        rows["predict"].append(secs)
        secs, (res, results) = clock(lambda: run_eval(det, cd, imgsz, args.batch_size, args.device, args.workers),
                                     args.device)
        rows["eval"].append(secs)
        if r + 1 < args.repeat:
            rows["load"].append(preload(cd, imgsz, args.batch_size, "cpu")[0])
        print(f"  [{name} @ {imgsz}] round {r + 1} (wall/cpu s): "
              + "  ".join(f"{k} {v[-1][0]:.2f}/{v[-1][1]:.2f}" for k, v in rows.items() if k != "load"), flush=True)
    med = {k: statistics.median(x[pick] for x in v) for k, v in rows.items()}
    wall = {k: statistics.median(x[0] for x in v) for k, v in rows.items()}
    extra = parts(cd, batches, dets, results, time.process_time if use_cpu else time.perf_counter)
    ips = {k: n / med[k] for k in ("bare", "predict", "eval")}
    out = {
        "model": name, "preset": MODELS[name][0], "overrides": MODELS[name][1], "imgsz": imgsz,
        "batch_size": args.batch_size, "images": n, "detections": res.num_detections, "workers": args.workers,
        "params_m": det.num_parameters() / 1e6, "time_basis": "process CPU time" if use_cpu else "wall",
        "seconds": {**{k: round(v, 4) for k, v in med.items()}, **{k: round(v, 4) for k, v in extra.items()}},
        "wall_seconds": {k: round(v, 4) for k, v in wall.items()},
        "samples_wall_cpu_s": {k: [[round(a, 4), round(b, 4)] for a, b in v] for k, v in rows.items()},
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "ratio_eval_over_bare": ips["eval"] / ips["bare"],
        "ratio_eval_over_bare_wall": wall["bare"] / wall["eval"],
        "ratio_predict_over_bare": ips["predict"] / ips["bare"],
        "evaluate_detector_images_per_s": round(res.images_per_second, 2),
    }
    out["target_met"] = out["ratio_eval_over_bare"] >= TARGET
    out["breakdown_s"] = breakdown(med, extra)
    if not out["target_met"] and not args.no_profile:
        out["profile"] = profile_eval(det, cd, imgsz, args)
    return out


def breakdown(med: dict[str, float], extra: dict[str, float]) -> dict[str, float]:
    """Where eval's extra time over the bare loop goes (seconds; ``other`` = the unexplained rest)."""
    parts_ = {
        "model (bare loop)": med["bare"],
        "kdctl predict adapter": max(0.0, med["predict"] - med["bare"]),
        "data loading": med["load"],
        "detections_to_coco": extra["to_coco_s"],
        "pycocotools COCOeval": extra["cocoeval_s"],
    }
    parts_["other"] = med["eval"] - sum(parts_.values())
    return {k: round(v, 3) for k, v in parts_.items()}


def profile_eval(det, cd, imgsz: int, args: argparse.Namespace, top: int = 15) -> list[dict[str, Any]]:
    """cProfile of one evaluate_detector call: the top functions by own time (Python-level view)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_eval(det, cd, imgsz, args.batch_size, args.device, args.workers)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": ncalls, "own_s": round(tottime, 3),
                     "cumulative_s": round(cumtime, 3)})
    return sorted(rows, key=lambda r: r["own_s"], reverse=True)[:top]


# =========================================================================== report
def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Evaluation throughput", "",
        f"Command: `{report['command']}`  ",
        machine_line(m, device=True),
        f"Data: BCCD val ({report['results'][0]['images'] if report['results'] else '?'} images), random-weight "
        f"models, score threshold {SCORE_THRESHOLD}, {MAX_DETECTIONS} detections/image, loader workers "
        f"{report['workers']}; medians of {report['repeat']} interleaved rounds of "
        f"{report['results'][0]['time_basis'] if report['results'] else '?'} (process CPU time with 1 thread and "
        "workers 0 on CPU: what the work costs even when other processes compete for the cores).", "",
        "| model | imgsz | bare img/s | predict img/s | eval img/s | eval / bare | (wall) | target >= 0.9 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ips = r["images_per_s"]
        lines.append(f"| {r['model']} | {r['imgsz']} | {ips['bare']:.1f} | {ips['predict']:.1f} | {ips['eval']:.1f} "
                     f"| {r['ratio_eval_over_bare']:.2f} | {r['ratio_eval_over_bare_wall']:.2f} | "
                     f"{'✓' if r['target_met'] else '✗'} |")
    lines += ["", "Where the evaluation time goes (seconds for the whole split; `other` = eval total minus the "
                  "parts measured alone):", "",
              "| model | imgsz | eval total | model (bare) | adapter | data loading | to COCO | COCOeval | other |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        b = r["breakdown_s"]
        lines.append(f"| {r['model']} | {r['imgsz']} | {r['seconds']['eval']:.2f} | {b['model (bare loop)']:.2f} | "
                     f"{b['kdctl predict adapter']:.2f} | {b['data loading']:.2f} | {b['detections_to_coco']:.2f} | "
                     f"{b['pycocotools COCOeval']:.2f} | {b['other']:.2f} |")
    for r in report["results"]:
        if "profile" in r:
            lines += ["", f"cProfile of `evaluate_detector`, {r['model']} @ {r['imgsz']} (top by own time):", "",
                      "| function | calls | own s | cumulative s |", "|---|---|---|---|"]
            lines += [f"| `{p['function']}` | {p['calls']} | {p['own_s']} | {p['cumulative_s']} |"
                      for p in r["profile"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--imgsz", type=int, nargs="+", default=None, help="default: 320 640 (128 with --small)")
    p.add_argument("--batch-size", type=int, default=8, help="kdctl eval's default: 8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared machines)")
    p.add_argument("--workers", type=int, default=0, help="evaluate_detector loader workers (library default 0)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 3; 1 with --small)")
    p.add_argument("--max-images", type=int, default=None, help="first N val images (default all; 16 with --small)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.repeat = args.repeat or (1 if args.small else 3)
    sizes = args.imgsz or ([128] if args.small else [320, 640])
    models = args.models or (["fcos-mobilenet-v2", "detr-r18-tiny"] if args.small else list(MODELS))
    cd = open_val(args.max_images or (16 if args.small else None))
    machine = machine_info(args.device, args.threads)
    results = []
    for imgsz in sizes:
        for name in models:
            print(f"[{name} @ {imgsz}]", flush=True)
            results.append(bench(name, imgsz, cd, args))
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine,
              "repeat": args.repeat, "workers": args.workers, "target": TARGET, "results": results}
    write_results(args.out, "eval_speed-small" if args.small else "eval_speed", report, markdown)


if __name__ == "__main__":
    main()
