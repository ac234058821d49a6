"""Check that ``kd_gain.py --kd-set old`` reproduces the DRKD of kdctl 4e5e3a9 (the last commit before issue #14 changed the defaults).

The same inputs (FCOS-pair shaped FPN features, P3-P7 at 320 px, batch 4, with GT boxes) go through
(a) 4e5e3a9's ``DRKD`` built from its ``retinanet`` recipe ``[kd.drkd]`` table (the recipe of the fcos and retinanet
pairs), that kdctl extracted with ``git archive`` into a temporary folder and run in a subprocess, and (b) the
working tree's ``DRKD`` built from the working tree's recipe table updated with ``kd_gain.OLD_KD["drkd"]`` (what
the ``old`` runs get), its parameters loaded from (a)'s ``state_dict`` (strict). The three weighted terms and the
gradients with respect to the student features must agree. (c) the working tree's defaults (``new``) on the same
inputs, for the magnitudes (other parameters: the new relation blocks are wider).

    python benchmarks/verify_old_kd.py            # prints a table; writes results/verify_old_kd.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
STRIDES = [8, 16, 32, 64, 128]
OLD_REF = "4e5e3a9"  # the last commit before issue #14 changed the method defaults


def inputs(path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    n, size = 4, 320
    s_feats = {s: torch.randn(n, 64, -(-size // s), -(-size // s), generator=g) for s in STRIDES}
    t_feats = {s: torch.randn(n, 256, -(-size // s), -(-size // s), generator=g) * 2 for s in STRIDES}
    boxes = []
    for k in (14, 9, 1, 20):  # BCCD-like counts per image
        xy = torch.rand(k, 2, generator=g) * 260
        wh = 12 + torch.rand(k, 2, generator=g) * 60
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], 1))
    torch.save({"s": s_feats, "t": t_feats, "boxes": boxes}, path)


def terms(which: str, data: Path, state: Path, overrides: str) -> None:
    """Run in a subprocess: ``which`` = head (save the state dict) or tree (load it)."""
    import torch

    from kdctl.distill.drkd import DRKD
    from kdctl.engine.config import load_recipe
    from kdctl.models.base import TrainOutput

    d = torch.load(data)
    kd = dict(load_recipe("retinanet")["kd"]["drkd"])
    kd.update(json.loads(overrides))
    teacher = SimpleNamespace(fpn_strides=STRIDES, fpn_channels=256, architecture="fcos")
    student = SimpleNamespace(fpn_strides=STRIDES, fpn_channels=64, architecture="fcos")
    torch.manual_seed(0)
    dist = DRKD(teacher, student, **kd)
    if which == "tree-old":
        dist.load_state_dict(torch.load(state), strict=True)
    elif which == "head":
        torch.save(dist.state_dict(), state)
    dist.train()
    s_feats = {k: v.clone().requires_grad_(True) for k, v in d["s"].items()}
    boxes = [b.clone() for b in d["boxes"]]
    batch = SimpleNamespace(targets=[{"boxes": b} for b in boxes], device=torch.device("cpu"),
                            images=torch.zeros(4, 3, 320, 320), image_sizes=[(320, 320)] * 4)
    out = dist(TrainOutput(losses={}, taps={"features": s_feats, "boxes": boxes}), {"features": d["t"]}, batch)
    total = sum(out.values())
    total.backward()
    grads = {str(k): v.grad.norm().item() for k, v in s_feats.items()}
    res = {"kd": kd, "terms": {k: v.item() for k, v in out.items()}, "grad_norm": grads,
           "params": sum(p.numel() for p in dist.parameters()), "kdctl": str(Path(sys.modules["kdctl"].__file__))}
    torch.save({"grads": {k: v.grad for k, v in s_feats.items()}}, state.with_suffix(f".{which}.grads.pt"))
    print(json.dumps(res))


def main() -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kd_gain
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        head = tmp / "head"
        head.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_REF, "kdctl", "presets", "pyproject.toml"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
        data, state = tmp / "inputs.pt", tmp / "state.pt"
        inputs(data)
        env = dict(os.environ, OMP_NUM_THREADS="1")

        def run(which: str, pythonpath: Path, overrides: dict) -> dict:
            cmd = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(pythonpath)!r}); "
                   f"sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); import verify_old_kd as v; "
                   f"v.terms({which!r}, __import__('pathlib').Path({str(data)!r}), "
                   f"__import__('pathlib').Path({str(state)!r}), {json.dumps(overrides)!r})"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp))
            if r.returncode:
                raise SystemExit(f"{which} failed:\n{r.stderr[-3000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        head_r = run("head", head, {})
        old_r = run("tree-old", ROOT, kd_gain.OLD_KD["drkd"])
        new_r = run("tree-new", ROOT, {})
        g_head = torch.load(state.with_suffix(".head.grads.pt"))["grads"]
        g_old = torch.load(state.with_suffix(".tree-old.grads.pt"))["grads"]
        grad_diff = max(((g_head[k] - g_old[k]).abs().max() / g_head[k].abs().max().clamp_min(1e-30)).item()
                        for k in g_head)
    term_diff = max(abs(head_r["terms"][k] - old_r["terms"][k]) / max(abs(head_r["terms"][k]), 1e-30)
                    for k in head_r["terms"])
    ok = term_diff < 1e-5 and grad_diff < 1e-4
    report = {"check": "kd_gain.py --kd-set old reproduces the DRKD of kdctl 4e5e3a9", "old_ref": OLD_REF, "ok": ok,
              "max_rel_term_diff": term_diff, "max_rel_grad_diff": grad_diff,
              "ref_4e5e3a9": head_r, "tree_old": old_r, "tree_new": new_r,
              "inputs": "random FPN features, student 64 ch / teacher 256 ch, strides 8-128 at 320 px, batch 4, "
                        "14 / 9 / 1 / 20 GT boxes"}
    out = ROOT / "benchmarks" / "results" / "verify_old_kd.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':10} {'kd_pixel':>12} {'kd_relation':>12} {'kd_instance':>12} {'params':>10}")
    for name, r in ((OLD_REF, head_r), ("old", old_r), ("new", new_r)):
        t = r["terms"]
        print(f"{name:10} {t['kd_pixel']:12.6g} {t['kd_relation']:12.6g} {t['kd_instance']:12.6g} {r['params']:10d}")
    print(f"max relative difference {OLD_REF} vs old: terms {term_diff:.2e}, student-feature gradients {grad_diff:.2e}: "
          f"{'OK' if ok else 'MISMATCH'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
