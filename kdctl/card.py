"""The model card of a student: what its run directory says (:func:`read_run`) as huggingface_hub's ``ModelCard``
(:func:`build_card`): YAML metadata (library_name, pipeline_tag, datasets, base_model, tags, model-index with the
COCO metrics of ``RUN/eval/best.json``) and a body (teacher, method, recipe from ``RUN/config.toml``, the steps
and epochs actually run, an AP table, a usage snippet). Local paths never appear on a card.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl._compat import tomllib
from kdctl.errors import KdctlError
from kdctl.specs import HUB_ID, REPO_ID

HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
METRICS = (  # (eval/best.json key, model-index metric type, display name)
    ("AP", "map", "AP"), ("AP50", "map_50", "AP50"), ("AP75", "map_75", "AP75"),
    ("APs", "map_small", "APs"), ("APm", "map_medium", "APm"), ("APl", "map_large", "APl"),
    ("AR100", "mar_100", "AR100"),
)


@dataclass
class RunInfo:
    """What the card says about a run (everything optional: a bare model directory has none of it)."""

    model_dir: Path
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    baseline_metrics: dict[str, float] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)  # RUN/comparison.json (kdctl distill --baseline)
    progress: dict[str, float] = field(default_factory=dict)  # what the run did: {"steps": N, "epochs": E}

    @property
    def task(self) -> str:
        return str(self.config.get("task", "train"))

    @property
    def teacher(self) -> str | None:
        """The teacher spec as the run got it (a local path stays local: see :attr:`teacher_name`)."""
        t = self.config.get("teacher")
        return str(t) if t else None

    @property
    def teacher_hub_id(self) -> str | None:
        """The teacher's Hub id: the spec itself, or the repo of a huggingface_hub cache snapshot it points to."""
        t = self.teacher
        if not t:
            return None
        if _is_hub_id(t):
            return t
        m = HUB_CACHE_SNAPSHOT.search(Path(t).expanduser().as_posix())
        return f"{m['org']}/{m['name']}" if m else None

    @property
    def teacher_name(self) -> str | None:
        """What the card calls the teacher: its Hub id, a preset / torchvision name, never a local path."""
        t = self.teacher
        if not t:
            return None
        if self.teacher_hub_id:
            return self.teacher_hub_id
        if not _is_local_path(t):
            return t  # a preset (detr-r50) or torchvision:NAME
        arch = self.config.get("resolved", {}).get("teacher")
        return f"a local {arch} checkpoint" if arch else "a local checkpoint"

    @property
    def method(self) -> str | None:
        m = self.config.get("resolved", {}).get("method") or self.config.get("method")
        return None if m in (None, "", "auto", "none") or self.task != "distill" else str(m)

    @property
    def dataset(self) -> str | None:
        """The dataset's Hub id (``datasets`` metadata, card text) when the run's data is one; a local folder is
        never named."""
        data = self.config.get("data")
        return str(data) if data and _is_hub_id(str(data), REPO_ID) else None


# --------------------------------------------------------------------------- run information
def read_run(model: str | Path) -> RunInfo:
    """The model directory to publish and what the run around it knows (config, metrics, teacher's metrics)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise KdctlError(f"--model {model}: not a directory (pass a run directory or a model directory)")
    run_dir = path if (path / "config.toml").is_file() else None
    if run_dir is None and (path.parent / "config.toml").is_file() and path.name in ("best", "last"):
        run_dir = path.parent
    info = RunInfo(model_dir=path, run_dir=run_dir)
    if run_dir is None:
        return info
    info.config = _read_toml(run_dir / "config.toml")
    info.metrics = _read_metrics(run_dir / "eval" / "best.json") or _read_metrics(run_dir / "eval" / "last.json")
    info.progress = read_progress(run_dir, info.config)
    if info.teacher and (Path(info.teacher).expanduser() / "eval" / "best.json").is_file():
        info.teacher_metrics = _read_metrics(Path(info.teacher).expanduser() / "eval" / "best.json")
    info.comparison = read_comparison(run_dir)
    return info


def read_progress(run_dir: Path, config: dict[str, Any]) -> dict[str, float]:
    """Steps and epochs the run actually trained (not the configured ones): the last step in ``metrics.jsonl``,
    else in ``eval/last.json``, else in ``last/trainer.pt``; epochs = steps / steps per epoch when the run
    recorded that, else the epoch counter of the same row. {} when the run recorded neither."""
    rows: list[dict[str, Any]] = []
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    if not rows:
        rows = [r for r in (_read_json_row(run_dir / "eval" / "last.json"), _trainer_position(run_dir))
                if isinstance(r.get("step"), int)][:1]
    if not rows:
        return {}
    last = max(rows, key=lambda r: r["step"])
    steps = int(last["step"])
    per_epoch = config.get("resolved", {}).get("steps_per_epoch")
    if isinstance(per_epoch, int) and per_epoch > 0:
        epochs = round(steps / per_epoch, 2)
    else:
        epochs = float(max(int(r.get("epoch") or 0) for r in rows))
    return {"steps": steps, "epochs": epochs}


def _read_json_row(path: Path) -> dict[str, Any]:
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return row if isinstance(row, dict) else {}


def _trainer_position(run_dir: Path) -> dict[str, Any]:
    """``step`` / ``epoch`` of ``last/trainer.pt`` (plain values, read with ``weights_only``); {} when absent."""
    path = run_dir / "last" / "trainer.pt"
    if not path.is_file():
        return {}
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable trainer state only loses this line of the card
        return {}
    return {k: state[k] for k in ("step", "epoch") if isinstance(state, dict) and k in state}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KdctlError(f"{path}: unreadable run config ({e.__class__.__name__})") from e


def _read_metrics(path: Path) -> dict[str, float]:
    """COCO metrics (fractions) of an ``eval/*.json`` row; {} when absent."""
    if not path.is_file():
        return {}
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KdctlError(f"{path}: corrupt evaluation file ({e.__class__.__name__})") from e
    row = row.get("metrics", row) if isinstance(row, dict) else {}
    return {k: float(row[k]) for k, _, _ in METRICS if isinstance(row.get(k), (int, float))}


def read_comparison(run_dir: Path) -> dict[str, Any]:
    """``RUN/comparison.json`` (``kdctl distill --baseline``, ``kdctl quickstart``); {} when absent or unreadable."""
    path = run_dir / "comparison.json"
    try:
        comp = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return comp if isinstance(comp, dict) and comp.get("runs") else {}


# --------------------------------------------------------------------------- model card
def build_card(info: RunInfo, repo_id: str, family: str, architecture: str, label_names: list[str]):
    """A huggingface_hub ``ModelCard`` (YAML metadata + markdown body) for the run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = info.dataset
    name = repo_id.split("/")[-1]
    tags = ["object-detection", "knowledge-distillation", "kdctl", architecture]
    if info.method:
        tags.append(info.method)
    base = info.teacher_hub_id
    evals = [
        EvalResult(task_type="object-detection", task_name="Object Detection", dataset_type=dataset or "custom",
                   dataset_name=dataset or "custom", dataset_split="val", metric_type=mtype, metric_name=label,
                   metric_value=round(100 * info.metrics[key], 2))
        for key, mtype, label in METRICS if key in info.metrics and info.metrics[key] >= 0
    ]
    data = ModelCardData(
        library_name="transformers" if family == "detr" else "kdctl", pipeline_tag="object-detection",
        datasets=[dataset] if dataset else None, base_model=base.split("@")[0] if base else None, tags=tags,
        model_name=name if evals else None, eval_results=evals or None, metrics=["map"] if evals else None,
    )
    body = _card_body(info, repo_id, family, architecture, label_names)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _is_local_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~", "\\")) or Path(spec).expanduser().exists() or ":\\" in spec[:3]


def _is_hub_id(spec: str, pattern: re.Pattern[str] = HUB_ID) -> bool:
    return bool(pattern.match(spec)) and not _is_local_path(spec)


def _card_body(info: RunInfo, repo_id: str, family: str, architecture: str, label_names: list[str]) -> str:
    parts = [f"# {repo_id.split('/')[-1]}", ""]
    what = "distilled" if info.method else "trained"
    teacher = _teacher_md(info)
    parts.append(f"A {architecture} object detector {what} with [kdctl](https://github.com/kdctl/kdctl)"
                 + (f" from the teacher {teacher} with {info.method.upper()}." if info.method and teacher else "."))
    parts += ["", f"- classes ({len(label_names)}): {', '.join(label_names[:40])}"
              + (" ..." if len(label_names) > 40 else "")]
    if teacher:
        parts.append(f"- teacher: {teacher}")
    if info.method:
        parts.append(f"- KD method: {info.method}")
    if info.dataset:
        parts.append(f"- dataset: [{info.dataset}](https://huggingface.co/datasets/{info.dataset})")
    if info.progress:
        steps, epochs = int(info.progress["steps"]), info.progress["epochs"]
        parts.append(f"- trained for {steps} optimiser step{'s' * (steps != 1)} ({epochs:g} epoch{'s' * (epochs != 1)})")
    parts += ["", *_recipe(info), *_ap_table(info), *_usage(repo_id, family)]
    return "\n".join(parts) + "\n"


def _teacher_md(info: RunInfo) -> str | None:
    """The teacher for the card text: a Hub id or preset in backticks, or the words for a local checkpoint."""
    name = info.teacher_name
    if not name:
        return None
    return f"`{name}`" if info.teacher_hub_id or not _is_local_path(info.teacher or "") else name


def _recipe(info: RunInfo) -> list[str]:
    cfg = info.config
    if not cfg:
        return []
    keys = ("task", "model", "method", "batch_size", "imgsz", "lr", "amp", "seed")
    flat: dict[str, Any] = {k: cfg[k] for k in keys if cfg.get(k) not in (None, "")}
    if info.teacher_name:
        flat["teacher"] = info.teacher_name
    if info.progress:
        flat["steps run"] = info.progress["steps"]
        flat["epochs run"] = info.progress["epochs"]
    for k in ("epochs", "max_steps"):  # the plan; a run may stop earlier (--max-steps, early interrupt)
        if cfg.get(k) not in (None, ""):
            flat[f"configured {k}"] = cfg[k]
    resolved = cfg.get("resolved", {})
    for k in ("method", "lr", "total_steps", "world_size"):
        if k in resolved:
            flat[f"resolved {k}"] = resolved[k]
    for section in ("optim", "kd"):
        for k, v in (cfg.get(section) or {}).items():
            flat[f"{section}.{k}"] = v
    source = "From the run's `config.toml`" + (" (steps and epochs run: from its metrics)" if info.progress else "")
    lines = ["## Training recipe", "", f"{source}:", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in flat.items()]
    return [*lines, ""]


def _ap_table(info: RunInfo) -> list[str]:
    if info.comparison:
        return _gain_table(info)
    rows = []
    if info.teacher_metrics:
        rows.append((f"teacher ({_teacher_md(info)})", info.teacher_metrics))
    if info.baseline_metrics:
        rows.append(("student without KD", info.baseline_metrics))
    if info.metrics:
        rows.append(("student + KD (this model)" if info.method else "this model", info.metrics))
    if not rows:
        return []
    cols = [label for key, _, label in METRICS if any(key in m for _, m in rows)]
    keys = [key for key, _, label in METRICS if label in cols]
    where = f"the {info.dataset} validation split" if info.dataset else "the validation split of the run's data"
    lines = ["## Evaluation", "", f"COCO bbox metrics (pycocotools, %) on {where}:", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, m in rows:
        cells = [f"{100 * m[k]:.1f}" if k in m and m[k] >= 0 else "-" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _usage(repo_id: str, family: str) -> list[str]:
    lines = ["## Usage", ""]
    if family == "detr":
        lines += ["```python", "from transformers import pipeline", "",
                  f'detector = pipeline("object-detection", model="{repo_id}")',
                  'detector("image.jpg")', "```", "", "or with kdctl:", ""]
    lines += ["```python", "import kdctl", "", f'det = kdctl.load("{repo_id}")',
              'det.predict_images(["image.jpg"])  # boxes (xyxy pixels), scores, labels, names', "```"]
    return lines


def _pts(v: float | None, signed: bool = False) -> str:
    if v is None or (not signed and v < 0):
        return "-"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _gain_table(info: RunInfo) -> list[str]:
    """The table of ``kdctl distill --baseline``: teacher, the same student without KD, the distilled student,
    the gain (with several seeds: means, the paired 95 % confidence interval and per-seed gains) and the cost."""
    c = info.comparison
    keys = [k for k, _, _ in METRICS if k in c.get("gain", {})]
    n = len(c["runs"])
    mean = f" (mean of {n} seeds)" if n > 1 else ""
    where = f"the {info.dataset} validation split" if info.dataset else "the validation split of the run's data"
    lines = ["## Evaluation: the gain of distillation", "",
             f"COCO bbox metrics (pycocotools, %) on {where} ({c.get('images', '?')} images, {c.get('steps', '?')} "
             f"training steps per student). The baseline is the same student trained without KD: same init, data "
             "order, recipe and steps.", "",
             "| model | " + " | ".join(keys) + " | train time | peak memory |", "|---|" + "---|" * (len(keys) + 2)]
    if c.get("teacher"):
        lines.append(f"| teacher ({_teacher_md(info)}) | " + " | ".join(_pts(c["teacher"]["metrics"].get(k))
                                                                        for k in keys) + " | - | - |")
    for side, label in (("baseline", "student without KD"), ("distilled", f"student + {info.method or 'KD'}")):
        cost = c.get(f"{side}_cost", {})
        lines.append(f"| {label}{mean} | " + " | ".join(_pts(c[side].get(k)) for k in keys)
                     + f" | {cost.get('seconds', 0):.0f} s | {cost.get('peak_memory_mb', 0):.0f} MB |")
    ratio = c.get("cost", {}).get("time_ratio")
    lines.append("| **gain** | " + " | ".join(f"**{_pts(c['gain'].get(k), True)}**" for k in keys)
                 + f" | x{ratio or 0:.2f} | {c.get('cost', {}).get('extra_memory_mb', 0):+.0f} MB |")
    if n > 1:
        ci = c.get("ci95", {})
        lines.append("| gain, 95 % CI (paired t) | " + " | ".join(
            f"[{_pts(ci[k][0], True)}, {_pts(ci[k][1], True)}]" if ci.get(k) else "-" for k in keys) + " | | |")
        for r in c["runs"]:
            lines.append(f"| gain, seed {r['seed']} | " + " | ".join(_pts(r["gain"].get(k), True) for k in keys)
                         + " | | |")
    return [*lines, ""]
