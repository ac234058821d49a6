"""Default KD term magnitudes before and after issue #14, against the reference code's scale.

Usage::

    python benchmarks/term_magnitudes.py            # writes benchmarks/results/term_magnitudes.{json,md}

DRKD: the three terms of a Faster R-CNN R18-FPN pair (256-channel FPN, random weights, the official Faster R-CNN
weights 1e-3 / 4e-3 / 2.4e-3) on random images with 7 GT boxes each (the COCO mean is 7.3). Reference: the official
loss (summed, unsquared L2) on 2 images of 800x1333. Each setting is the same 2 images resized (and repeated to a
batch of 8), so a term at "the reference magnitude per image" has ratio 1 to the reference. Modes: ``before`` (the
raw official sums, kdctl's old ``normalize = false``), ``after`` (``normalize = true``, the new default) and
``2/N`` (the official sums times 2 / images per device, the alternative the issue names).

KD-DETR: the class term of a sigmoid model on focal-like logits (teacher N(-4, 2), student = teacher + N(0, 1),
T = 10, 300 points per image) at C = 3 and 80 classes and batches of 2 and 8: the term per image and the mean
gradient magnitude per logit, as a ratio to the reference code's softmax term. ``before``: kdctl's old default
(per-class Bernoulli KL, unscaled); ``after``: the new default (the reference's softmax KL); ``binary``: the
Bernoulli option with its Fisher-norm scale.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DRKD_SETTINGS = (("reference", 2, (800, 1333)), ("batch 2", 2, (640, 640)), ("batch 8", 8, (640, 640)),
                 ("batch 2, 800x1333", 2, (800, 1333)), ("batch 8, 800x1333", 8, (800, 1333)))
TERMS = ("kd_pixel", "kd_relation", "kd_instance")
BOXES_PER_IMAGE = 7
T = 10.0


# =========================================================================== DRKD
def drkd_images(size: tuple[int, int], n: int, seed: int = 0) -> Any:
    """The same 2 base images (random pixels, 7 boxes each) resized to ``size`` and repeated to ``n`` images."""
    import torch
    import torch.nn.functional as F

    from kdctl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, 3, 800, 1333, generator=g)
    rel = torch.rand(2, BOXES_PER_IMAGE, 4, generator=g)
    x0, y0 = rel[..., 0] * 0.7, rel[..., 1] * 0.7
    boxes01 = torch.stack([x0, y0, x0 + 0.05 + rel[..., 2] * 0.25, y0 + 0.05 + rel[..., 3] * 0.25], -1)
    h, w = size
    images = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    targets = [{"boxes": boxes01[i] * scale, "labels": torch.zeros(BOXES_PER_IMAGE, dtype=torch.long)} for i in range(2)]
    reps = n // 2
    return Batch(images=images.repeat(reps, 1, 1, 1), sizes=[size] * n, orig_sizes=[size] * n, targets=targets * reps,
                 image_ids=list(range(n)))


def drkd_terms() -> dict[str, Any]:
    """Per setting and mode: the weighted terms and their ratio to the reference."""
    import torch

    from kdctl.distill.drkd import DRKD
    from kdctl.models.base import TrainOutput
    from kdctl.specs import load_detector

    torch.manual_seed(0)
    names = ["a", "b"]
    over = {"fpn_channels": 256}
    teacher = load_detector("fasterrcnn-r18-fpn", label_names=names, pretrained_backbone=False, overrides=over).eval()
    student = load_detector("fasterrcnn-r18-fpn", label_names=names, pretrained_backbone=False, overrides=over).eval()
    torch.manual_seed(1)
    after = DRKD(teacher, student)  # the new defaults
    before = DRKD(teacher, student, normalize=False)
    before.load_state_dict(after.state_dict())
    rows: dict[str, Any] = {}
    for label, n, size in DRKD_SETTINGS:
        batch = drkd_images(size, n)
        with torch.no_grad():
            s_taps, t_taps = student.forward_taps(batch), teacher.forward_taps(batch)
            out = TrainOutput(losses={}, taps=s_taps)
            raw = {k: float(v) for k, v in before(out, t_taps, batch).items()}
            norm = {k: float(v) for k, v in after(out, t_taps, batch).items()}
        rows[label] = {"images": n, "size": list(size), "before": raw, "after": norm,
                       "2/N": {k: v * 2 / n for k, v in raw.items()}}
    ref = rows["reference"]["before"]
    for row in rows.values():
        row["ratio"] = {mode: {k: row[mode][k] / ref[k] for k in TERMS} for mode in ("before", "after", "2/N")}
    return rows


# =========================================================================== KD-DETR
def kd_detr_terms() -> dict[str, Any]:
    """Per C and batch: the class term per image and the mean gradient magnitude, relative to the reference."""
    import torch
    import torch.nn.functional as F

    from kdctl.distill.kd_detr import class_divergence

    def reference(s: Any, t: Any) -> Any:  # KD-DETR kd_loss.py loss_kl_div, weighted sum over points
        w = t.sigmoid().max(-1).values
        return (F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").mean(-1) * T * T * w).sum()

    def old_binary(s: Any, t: Any) -> Any:  # kdctl before issue #14: Bernoulli KL per class, unscaled
        w = t.sigmoid().max(-1).values
        st, tt = s / T, t / T
        kl = (tt.sigmoid() * (F.logsigmoid(tt) - F.logsigmoid(st))
              + (1 - tt.sigmoid()) * (F.logsigmoid(-tt) - F.logsigmoid(-st))).mean(-1)
        return (kl * T * T * w).sum()

    def kdctl(kind: str):
        def term(s: Any, t: Any) -> Any:
            w = t.sigmoid().max(-1).values
            return (class_divergence(s[None], t, "sigmoid", T, kind)[0] * w).sum()
        return term

    forms = {"reference": reference, "before": old_binary, "after": kdctl("softmax"), "binary": kdctl("binary")}
    rows: dict[str, Any] = {}
    for c in (3, 80):
        for n in (2, 8):
            g = torch.Generator().manual_seed(c)
            t = torch.randn(2, 300, c, generator=g).repeat(n // 2, 1, 1) * 2 - 4
            s0 = t + torch.randn(2, 300, c, generator=g).repeat(n // 2, 1, 1)
            row: dict[str, Any] = {}
            for name, fn in forms.items():
                s = s0.clone().requires_grad_()
                loss = fn(s, t)
                loss.backward()
                row[name] = {"per_image": float(loss) / n, "grad": float(s.grad.abs().mean())}
            for name in forms:
                row[name]["grad_ratio"] = row[name]["grad"] / row["reference"]["grad"]
            rows[f"C={c}, batch {n}"] = row
    return rows


# =========================================================================== report
def machine_info() -> dict[str, Any]:
    import platform

    import torch
    from _results import cpu_model

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# Default KD term magnitudes (issue #14)", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']}, {m['torch_threads']} thread(s). "
             "Command: `python benchmarks/term_magnitudes.py`.", "",
             "## DRKD (Faster R-CNN R18-FPN pair, 256 channels, official weights, 7 boxes per image)", "",
             "Weighted terms; in brackets the ratio to the reference (official loss, 2 images of 800x1333). "
             "`before`: raw official sums (old default); `after`: `normalize = true` (new default); "
             "`2/N`: official sums x 2 / images.", "",
             "| setting | mode | kd_pixel | kd_relation | kd_instance |", "|---|---|---|---|---|"]
    for label, row in r["drkd"].items():
        modes = ("before",) if label == "reference" else ("before", "after", "2/N")
        for mode in modes:
            cells = [f"{row[mode][k]:.4g} ({row['ratio'][mode][k]:.2f}x)" for k in TERMS]
            lines.append(f"| {label} ({row['images']} x {row['size'][0]}x{row['size'][1]}) | {mode} | "
                         + " | ".join(cells) + " |")
    lines += ["", "## KD-DETR class term, sigmoid model (focal-like logits, T = 10, 300 points per image)", "",
              "Class term per image (cls = 1) and, in brackets, the mean gradient magnitude per logit relative to the "
              "reference code. `before`: unscaled Bernoulli KL (old default); `after`: softmax KL (new default); "
              "`binary`: the Bernoulli option with its Fisher-norm scale.", "",
              "| C, batch | reference | before | after | binary |", "|---|---|---|---|---|"]
    for label, row in r["kd_detr"].items():
        cells = [f"{row[m]['per_image']:.4g} ({row[m]['grad_ratio']:.2f}x)"
                 for m in ("reference", "before", "after", "binary")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Run time {r['seconds']:.0f} s."]
    return "\n".join(lines)


def main() -> int:
    import torch
    from _results import write_results

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    report = {"machine": machine_info(), "drkd": drkd_terms(), "kd_detr": kd_detr_terms()}
    report["seconds"] = time.perf_counter() - start
    assert all(math.isfinite(v) for row in report["drkd"].values() for v in row["after"].values())
    write_results(ROOT / "benchmarks" / "results", "term_magnitudes", report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
