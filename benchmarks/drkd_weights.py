"""Diagnostic for the DRKD weights: one distillation run of a ``kd_gain.py --small`` pair with the recipe's DRKD
weights scaled (and optionally the normalised mode), reusing the pair's trained teacher.

Usage::

    python benchmarks/drkd_weights.py fasterrcnn 0.25 --seed 0
    python benchmarks/drkd_weights.py fcos 0.25 --seed 1 --normalize

Prints one JSON line with the final val AP; compare it with the pair's ``student-s{seed}`` in
``benchmarks/results/kd_gain.json`` (same student, recipe, epochs and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pair", choices=("fcos", "fasterrcnn", "retinanet"))
    p.add_argument("scale", type=float, help="factor on the recipe's pixel / relation / instance weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import kd_gain
    import torch

    from kdctl.engine.config import RunConfig, apply_recipe, default_recipe_name, load_recipe
    from kdctl.engine.trainer import train
    from kdctl.specs import resolve

    torch.set_num_threads(1)
    plan = kd_gain.SMALL[args.pair]
    ns = argparse.Namespace(work=args.work.resolve(), mode="small")
    teacher = kd_gain.latest_teacher(ns, plan.teacher_pair or plan.pair)
    if teacher is None:
        raise SystemExit(f"no trained teacher for {args.pair}: run `python benchmarks/kd_gain.py --small --pair "
                         f"{plan.teacher_pair or plan.pair}` first")
    r = resolve(plan.student)
    recipe = apply_recipe(RunConfig(task="distill"), load_recipe(default_recipe_name(r.architecture, r.family)))
    weights = {k: v * args.scale for k, v in recipe.kd["drkd"].items() if k in ("pixel", "relation", "instance")}
    cfg = RunConfig(task="distill", model=plan.student, teacher=teacher, data=str(kd_gain.BCCD),
                    epochs=plan.student_epochs, batch_size=plan.batch_size, imgsz=plan.imgsz, lr=plan.student_lr,
                    device="cpu", seed=args.seed, workers=1, eval_every=10**6, log_every=20,
                    name=f"{args.pair}-x{args.scale}{'-norm' if args.normalize else ''}-s{args.seed}",
                    output=str(ns.work / "runs" / "diag"), pretrained_backbone=False, quiet=True,
                    optim=dict(plan.optim), kd={"drkd": {**weights, "normalize": args.normalize}})
    res = train(cfg)
    print(json.dumps({"pair": args.pair, "scale": args.scale, "normalize": args.normalize, "seed": args.seed,
                      "weights": weights, "AP": round(100 * res.metrics["AP"], 2),
                      "AP50": round(100 * res.metrics["AP50"], 2), "run_dir": str(res.run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
