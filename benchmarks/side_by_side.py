"""kdctl next to the bare libraries, step for step (issue #22).

For a DETR pair (KD-DETR) and a Faster R-CNN pair (DRKD), on the same fixed batches of a dataset, interleaved
rounds of five loops, one optimiser step each:

  a  bare     the library's own loop (transformers / torchvision model, ``model(...) -> loss -> backward ->
              clip -> step``) training exactly the parameters kdctl trains, with the same optimiser and groups
  b  train    kdctl train's step: a Trainer built through the engine's builders (kdctl/engine/build.py), its
              ``_micro_step`` + ``_optimizer_step``
  c  floor    the bare floor: (a) + the teacher's forward (the library model, under inference_mode: DETR its whole
              forward, Faster R-CNN its transform + backbone/FPN, what DRKD consumes)
  d  method   the method's own floor, written against the libraries with kdctl's modelling choices: KD-DETR decodes
              the teacher's 100 queries + 300 N(0, 1) general points with both decoders (one decoder hook each),
              softmax-KL (T = 10) + 5 L1 + 2 GIoU on the final layer; DRKD: the bare student with one hook on its
              FPN, the teacher's FPN features, kdctl's DRKD loss modules
  e  distill  kdctl distill's step (Trainer, as b)

The teacher of (c) and (d) runs as kdctl runs it: frozen BatchNorms folded into its convolutions and its forward
under the distill run's teacher autocast dtype (``--teacher-amp``), so (d) and (e) do the same work.
Writes b/a (kdctl's train overhead), e/d (kdctl's KD overhead) and e/c (the method's cost over the bare
floor) to ``benchmarks/results/side_by_side.{json,md}``. ``--fixes`` adds the issue's before/after variants of
kdctl's step (zero_grad after the step, KD taps in train, stride-32 padding, unfolded teacher).
Small CPU-sized presets; teachers are random-weight presets saved with the data's classes (timing only).

    python benchmarks/side_by_side.py --data /work/shared/data/bccd --imgsz 320 --rounds 10 --fixes
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _results import cpu_model, write_results  # benchmarks/_results.py (run as python benchmarks/X.py)

PAIRS = {
    "detr": {"teacher": "detr-r18", "teacher_over": {}, "student": "detr-mobilenet-v2-small", "method": "kd-detr"},
    "fasterrcnn": {"teacher": "fasterrcnn-mobilenet-v2-fpn", "teacher_over": {"norm": "frozen_bn"},
                   "student": "fasterrcnn-mobilenet-v2-0.5", "method": "drkd"},
}


def trainer(task: str, pair: dict[str, Any], teacher_dir: str, args: argparse.Namespace, work: Path, **kw: Any):
    from kdctl.engine.config import RunConfig
    from kdctl.engine.trainer import Trainer

    cfg = RunConfig(task=task, model=pair["student"], teacher=teacher_dir if task == "distill" else None,
                    data=args.data, max_steps=10_000, batch_size=args.batch, imgsz=args.imgsz, device=args.device,
                    workers=0, output=str(work), quiet=True, seed=0, pretrained_backbone=False, **kw)
    t = Trainer(cfg)
    t.setup()
    t.lock.release()
    return t


def kdctl_step(t, b) -> None:
    t._micro_step(b)
    t._optimizer_step({})


def old_zero_grad_step(t, b) -> None:  # before #22: gradients freed right after the optimiser step
    kdctl_step(t, b)
    t.optimizer.zero_grad(set_to_none=True)


def taps_step(t, b) -> None:  # before #22: KD taps recorded in plain training
    real = type(t.student).forward_train
    t.student.forward_train = lambda batch, taps=True: real(t.student, batch, True)
    try:
        kdctl_step(t, b)
    finally:
        del t.student.forward_train


def same_optimizer(opt: torch.optim.Optimizer, names: dict[int, str], params: dict[str, torch.Tensor]):
    """``opt``'s class and groups over other modules' parameters (matched by name)."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    return type(opt)(groups, lr=groups[0]["lr"])


class Bare:
    """The library models of a pair, their optimiser and inputs precomputed from kdctl's batches."""

    def __init__(self, tt, td, teacher_dir: str, family: str) -> None:
        from kdctl.specs import load_detector

        self.family, self.clip = family, float(tt.cfg.optim.get("clip_grad") or 0)
        self.device = torch.device(tt.device)
        self.amp = tt.amp  # the student's autocast dtype as kdctl trains (bf16 on CUDA by default, none on CPU)
        self.model = copy.deepcopy(tt.student.model).train()
        names = {id(p): n for n, p in tt.student.model.named_parameters()}
        self.opt = same_optimizer(tt.optimizer, names, dict(self.model.named_parameters()))
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        tdet = load_detector(teacher_dir).eval().requires_grad_(False)
        tdet.set_classes(tt.val_data.names)
        tdet.to(self.device)
        # the teacher as kdctl runs it (#22: like for like): its frozen BatchNorms folded into its convolutions when
        # the distill run folds them, and its forward under the distill run's teacher autocast dtype
        if td.cfg.fold_teacher_norms:
            from kdctl.engine.fold import fold_teacher

            fold_teacher(tdet, self.device.type)
        self.teacher_amp = td.teacher_amp
        self.teacher_det, self.teacher = tdet, tdet.model
        self.adapter, self.student_det = tt.student, tt.student
        # the method floor's student (+ kdctl's distiller modules for its loss), with the distill run's optimiser
        self.m_model = copy.deepcopy(tt.student.model).train()
        self.m_dist = copy.deepcopy(td.distiller)
        mnames = {id(p): "s." + n for n, p in td.student.model.named_parameters()}
        mnames.update({id(p): "d." + n for n, p in td.distiller.named_parameters()})
        mparams = {"s." + n: p for n, p in self.m_model.named_parameters()}
        mparams.update({"d." + n: p for n, p in self.m_dist.named_parameters()})
        self.m_opt = same_optimizer(td.optimizer, mnames, mparams)
        self.m_params = [p for g in self.m_opt.param_groups for p in g["params"]]
        self.kw: dict[str, Any] = {}
        hooked = (self.m_model.model.decoder if family == "detr" else self.m_model.backbone)
        hooked.register_forward_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs, output) -> None:
        self.kw = {"kwargs": dict(kwargs), "output": output}

    def inputs(self, b) -> dict[str, Any]:
        if self.family == "detr":
            pv, pm = self.adapter.pixel_inputs(b)
            tpv, _ = self.teacher_det.pixel_inputs(b)
            return {"pixel_values": pv, "pixel_mask": pm, "labels": self.adapter.hf_labels(b), "teacher": tpv}
        images = [b.images[i, :, :h, :w] for i, (h, w) in enumerate(b.sizes)]
        targets = [{"boxes": t["boxes"], "labels": self.adapter.model_labels(t["labels"]) + 1} for t in b.targets]
        return {"images": images, "targets": targets, "batch": b}

    def student_context(self):
        """The student's autocast as kdctl's step runs it (forward and KD loss; none on CPU by default)."""
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _loss(self, model, x) -> torch.Tensor:
        with self.student_context():
            if self.family == "detr":
                return model(pixel_values=x["pixel_values"], pixel_mask=x["pixel_mask"], labels=x["labels"]).loss
            return sum(model(x["images"], x["targets"]).values())

    def _finish(self, opt, params, loss) -> None:
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        opt.step()

    def step(self, x) -> None:  # (a)
        self.opt.zero_grad(set_to_none=True)
        self._finish(self.opt, self.params, self._loss(self.model, x))

    def teacher_context(self):
        """The teacher's autocast (kdctl's ``--teacher-amp``; float32 when the distill run has none)."""
        return torch.autocast(self.device.type, dtype=self.teacher_amp or torch.float32,
                              enabled=self.teacher_amp is not None)

    def teacher_forward(self, x, inference: bool = True):
        with torch.inference_mode() if inference else torch.no_grad(), self.teacher_context():
            if self.family == "detr":  # no_grad: its tensors enter a KD loss
                return self.teacher(pixel_values=x["teacher"], pixel_mask=x["pixel_mask"])
            il, _ = self.teacher.transform(x["images"])
            return {k: v.float() for k, v in self.teacher.backbone(il.tensors).items()}

    def floor(self, x) -> None:  # (c)
        self.teacher_forward(x)
        self.step(x)

    def method(self, x, late_zero_grad: bool = False) -> None:  # (d)
        """The method floor; ``late_zero_grad``: free the gradients just before the backward as kdctl does (#22)
        instead of at the start of the step (the variant that says how much of e/d < 1 that placement is)."""
        if not late_zero_grad:
            self.m_opt.zero_grad(set_to_none=True)
        loss = self._loss(self.m_model, x)
        with self.student_context():
            loss = loss + (self._kd_detr(x) if self.family == "detr" else self._drkd(x))
        if late_zero_grad:
            self.m_opt.zero_grad(set_to_none=True)
        self._finish(self.m_opt, self.m_params, loss)

    def _kd_detr(self, x) -> torch.Tensor:
        from torchvision.ops import generalized_box_iou_loss

        skw, t = self.kw["kwargs"], self.teacher
        tkw: dict[str, Any] = {}
        h = t.model.decoder.register_forward_hook(lambda m, a, k, o: tkw.update(k), with_kwargs=True)
        with torch.no_grad(), self.teacher_context():
            tout = t(pixel_values=x["teacher"], pixel_mask=x["pixel_mask"])
            h.remove()
            n = x["pixel_values"].shape[0]
            general = torch.randn(300, t.config.d_model, device=self.device)
            tq = torch.cat([t.model.query_position_embeddings.weight, general])
            th = t.model.decoder(**{**tkw, "inputs_embeds": torch.zeros(n, len(general), t.config.d_model,
                                                                         device=self.device),
                                    "object_queries_position_embeddings": general.expand(n, -1, -1)})[0]
            t_logits = torch.cat([tout.logits, t.class_labels_classifier(th)], 1).float()
            t_boxes = torch.cat([tout.pred_boxes, t.bbox_predictor(th).sigmoid()], 1).float()
        s = self.m_model
        q = self.m_dist.projection(tq) if self.m_dist.projection is not None else tq
        sh = s.model.decoder(**{**skw, "inputs_embeds": torch.zeros(n, len(q), s.config.d_model, device=self.device),
                                "object_queries_position_embeddings": q.expand(n, -1, -1)})[0]
        s_logits, s_boxes = s.class_labels_classifier(sh).float(), s.bbox_predictor(sh).sigmoid().float()
        temp = 10.0
        kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.softmax(t_logits / temp, -1), reduction="sum") * temp**2
        xyxy = lambda b: torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)  # noqa: E731
        giou = generalized_box_iou_loss(xyxy(s_boxes).reshape(-1, 4), xyxy(t_boxes).reshape(-1, 4), reduction="mean")
        return kl / n + 5.0 * F.l1_loss(s_boxes, t_boxes) + 2.0 * giou

    def _drkd(self, x) -> torch.Tensor:
        from kdctl.models.base import TrainOutput

        b = x["batch"]
        t_feats = self.teacher_forward(x, inference=False)
        feats = self.kw["output"]
        strides = self.student_det.fpn_strides
        tstrides = self.teacher_det.fpn_strides
        taps = lambda fs, st: {"features": dict(zip(st, fs.values(), strict=False)),  # noqa: E731
                               "image_sizes": list(b.sizes), "boxes": [t["boxes"] for t in b.targets],
                               "labels": [t["labels"] for t in b.targets]}
        terms = self.m_dist(TrainOutput(losses={}, taps=taps(feats, strides)), taps(t_feats, tstrides), b)
        return sum(terms.values())


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: process CPU time (1 thread: robust to
# other processes waiting for the cores, as benchmarks/overhead.py measures)


def timed(fn, clock=time.perf_counter, device: str = "cpu") -> float:
    """Milliseconds of ``fn()`` (CUDA: synchronised before and after, so queued kernels count)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (clock() - t0) * 1e3


def run_pair(name: str, pair: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from kdctl.data.batch import collate
    from kdctl.specs import load_detector

    torch.manual_seed(0)
    from kdctl.engine.build import open_data

    names = open_data(_cfg(args), print).names
    tdir = str(work / f"{name}-teacher")
    load_detector(pair["teacher"], label_names=names, pretrained_backbone=False,
                  overrides=pair["teacher_over"]).save(tdir)
    tt = trainer("train", pair, tdir, args, work)
    td = trainer("distill", pair, tdir, args, work)
    bare = Bare(tt, td, tdir, "detr" if tt.student.family == "detr" else "cnn")
    batches = [b.to(args.device) for b, _ in zip(tt.loader, range(4), strict=False)]
    xs = [bare.inputs(b) for b in batches]
    loops: dict[str, Any] = {
        "a_bare": lambda i: bare.step(xs[i]), "b_train": lambda i: kdctl_step(tt, batches[i]),
        "c_floor": lambda i: bare.floor(xs[i]), "d_method": lambda i: bare.method(xs[i]),
        "e_distill": lambda i: kdctl_step(td, batches[i]),
    }
    if args.fixes:
        old = trainer("distill", pair, tdir, args, work, fold_teacher_norms=False)
        loops["b_old_zero_grad"] = lambda i: old_zero_grad_step(tt, batches[i])
        loops["b_old_taps"] = lambda i: taps_step(tt, batches[i])
        loops["e_old_zero_grad"] = lambda i: old_zero_grad_step(td, batches[i])
        loops["e_old_unfolded_teacher"] = lambda i: kdctl_step(old, batches[i])
        loops["d_method_late_zero_grad"] = lambda i: bare.method(xs[i], late_zero_grad=True)
        if tt.student.family == "detr":  # the same samples collated to a multiple of 32 (as before #22)
            ds = tt.loader.dataset
            idx = [list(range(j * args.batch, (j + 1) * args.batch)) for j in range(4)]
            pad = [collate([ds[k] for k in ks], stride=32).to(args.device) for ks in idx]
            nopad = [collate([ds[k] for k in ks], stride=1).to(args.device) for ks in idx]
            loops["b_pad1"] = lambda i: kdctl_step(tt, nopad[i])
            loops["b_old_pad32"] = lambda i: kdctl_step(tt, pad[i])
    times: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(args.warmup + args.rounds):
        for k, fn in loops.items():
            ms = timed(functools.partial(fn, r % len(batches)), CLOCKS[args.timer], args.device)
            if r >= args.warmup:
                times[k].append(ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"teacher": pair["teacher"], "student": pair["student"], "method": pair["method"],
           "amp": str(tt.amp), "teacher_amp": str(td.teacher_amp), "trainable": tt.trainable,
           "step_ms": {k: {"median": round(med[k], 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                       for k, v in times.items()},
           "ratios": {"b/a": round(med["b_train"] / med["a_bare"], 3),
                      "e/d": round(med["e_distill"] / med["d_method"], 3),
                      "e/c": round(med["e_distill"] / med["c_floor"], 3)}}
    print(name, out["ratios"], {k: v["median"] for k, v in out["step_ms"].items()}, flush=True)
    return out


def _cfg(args: argparse.Namespace):
    from kdctl.engine.config import RunConfig

    return RunConfig(data=args.data)


def markdown(rep: dict[str, Any]) -> str:
    lines = ["# kdctl side by side with the bare libraries (issue #22)", "",
             f"{rep['machine']}; batch {rep['batch']}, {rep['imgsz']} px, {rep['rounds']} interleaved rounds "
             f"(+{rep['warmup']} warm-up), median step in ms [min-max]. {rep['note']}", ""]
    for name, p in rep["pairs"].items():
        lines += [f"## {name}: {p['teacher']} -> {p['student']} ({p['method']})", "",
                  "| loop | step (ms) |", "|---|---|"]
        lines += [f"| {k} | {v['median']} [{v['min']}-{v['max']}] |" for k, v in p["step_ms"].items()]
        r = p["ratios"]
        lines += ["", f"b/a (train overhead) **{r['b/a']}**, e/d (KD overhead over the method floor) "
                  f"**{r['e/d']}**, e/c (the method's cost over the bare floor) **{r['e/c']}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default="/work/shared/data/bccd")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the engine's default precision there: bf16)")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--fixes", action="store_true", help="add the before/after variants of the #22 fixes (and "
                    "the method floor with kdctl's zero_grad placement, d_method_late_zero_grad)")
    ap.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default), or process CPU time (cpu: with --threads 1, on a shared machine)")
    ap.add_argument("--note", default="", help="a line for the report (e.g. that the machine was shared)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.device.startswith("cuda") and args.timer == "cpu":
        ap.error("--timer cpu measures the host, not the GPU: use wall time on CUDA")
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU {cpu_model()}, {args.threads} thread(s)")
    rep: dict[str, Any] = {"machine": f"{where}, torch {torch.__version__}, "
                                      f"{'process CPU' if args.timer == 'cpu' else 'wall'} time",
                           "batch": args.batch, "imgsz": args.imgsz, "rounds": args.rounds, "warmup": args.warmup,
                           "note": args.note, "loops": {"a_bare": "bare library loop", "b_train": "kdctl train",
                                                        "c_floor": "bare floor (a + teacher forward)",
                                                        "d_method": "method floor (minimal KD step on the libraries)",
                                                        "e_distill": "kdctl distill"}, "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs:
            rep["pairs"][name] = run_pair(name, PAIRS[name], args, Path(tmp))
    write_results(Path(args.out), "side_by_side", rep, markdown)


if __name__ == "__main__":
    sys.exit(main())
