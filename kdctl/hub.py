"""Publish a student to the Hugging Face Hub: export, model card, create_repo + upload_folder.

What is uploaded: the exported model directory (:func:`kdctl.export.export_hf`: a transformers directory for the
DETR family, a kdctl directory for CNN detectors) plus ``README.md``, a model card built with huggingface_hub's
``ModelCard`` / ``ModelCardData``: YAML metadata (library_name, pipeline_tag, datasets, base_model, tags,
model-index with the COCO metrics of ``RUN/eval/best.json``) and a body (teacher, method, recipe from
``RUN/config.toml``, an AP table, a usage snippet).

The token comes from ``--token``, ``HF_TOKEN`` or the huggingface_hub login, in that order. It is passed to
huggingface_hub only: never printed, never written to the run directory, the staging folder or the card, and
removed from any error message.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl._compat import tomllib
from kdctl.errors import KdctlError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[\w./-]+)?$")
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

    @property
    def task(self) -> str:
        return str(self.config.get("task", "train"))

    @property
    def teacher(self) -> str | None:
        t = self.config.get("teacher")
        return str(t) if t else None

    @property
    def method(self) -> str | None:
        m = self.config.get("resolved", {}).get("method") or self.config.get("method")
        return None if m in (None, "", "auto", "none") or self.task != "distill" else str(m)

    @property
    def dataset(self) -> str | None:
        data = self.config.get("data")
        return Path(str(data)).expanduser().resolve().name or None if data else None


@dataclass
class PushResult:
    repo_id: str
    files: list[str]
    url: str | None = None
    dry_run: Path | None = None


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
    if info.teacher and (Path(info.teacher).expanduser() / "eval" / "best.json").is_file():
        info.teacher_metrics = _read_metrics(Path(info.teacher).expanduser() / "eval" / "best.json")
    info.baseline_metrics = _quickstart_baseline(run_dir)
    return info


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


def _quickstart_baseline(run_dir: Path) -> dict[str, float]:
    """The student trained without KD, when ``kdctl quickstart`` wrote this run (``OUT/quickstart.json``)."""
    summary = run_dir.parent.parent / "quickstart.json"
    if not summary.is_file():
        return {}
    try:
        rows = json.loads(summary.read_text()).get("rows", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    for row in rows:
        if row.get("model") == "student":
            return {k: float(row[k]) for k in ("AP", "AP50", "AP75") if k in row}
    return {}


# --------------------------------------------------------------------------- model card
def build_card(info: RunInfo, repo_id: str, family: str, architecture: str, label_names: list[str]):
    """A huggingface_hub ``ModelCard`` (YAML metadata + markdown body) for the run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = info.dataset
    name = repo_id.split("/")[-1]
    tags = ["object-detection", "knowledge-distillation", "kdctl", architecture]
    if info.method:
        tags.append(info.method)
    base = info.teacher if info.teacher and _is_hub_id(info.teacher) else None
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


def _is_hub_id(spec: str) -> bool:
    return bool(HUB_MODEL_ID.match(spec)) and not Path(spec).expanduser().exists() and not spec.startswith(".")


def _card_body(info: RunInfo, repo_id: str, family: str, architecture: str, label_names: list[str]) -> str:
    parts = [f"# {repo_id.split('/')[-1]}", ""]
    what = "distilled" if info.method else "trained"
    parts.append(f"A {architecture} object detector {what} with [kdctl](https://github.com/kdctl/kdctl)"
                 + (f" from the teacher `{info.teacher}` with {info.method.upper()}." if info.method else "."))
    parts += ["", f"- classes ({len(label_names)}): {', '.join(label_names[:40])}"
              + (" ..." if len(label_names) > 40 else "")]
    if info.teacher:
        parts.append(f"- teacher: `{info.teacher}`")
    if info.method:
        parts.append(f"- KD method: {info.method}")
    if info.dataset:
        parts.append(f"- dataset: {info.dataset}")
    parts += ["", *_recipe(info), *_ap_table(info), *_usage(repo_id, family)]
    return "\n".join(parts) + "\n"


def _recipe(info: RunInfo) -> list[str]:
    cfg = info.config
    if not cfg:
        return []
    keys = ("task", "model", "teacher", "method", "epochs", "max_steps", "batch_size", "imgsz", "lr", "amp", "seed")
    flat = {k: cfg[k] for k in keys if cfg.get(k) not in (None, "")}
    resolved = cfg.get("resolved", {})
    for k in ("method", "lr", "total_steps", "world_size"):
        if k in resolved:
            flat[f"resolved {k}"] = resolved[k]
    for section in ("optim", "kd"):
        for k, v in (cfg.get(section) or {}).items():
            flat[f"{section}.{k}"] = v
    lines = ["## Training recipe", "", "From the run's `config.toml`:", "", "| option | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in flat.items()]
    return [*lines, ""]


def _ap_table(info: RunInfo) -> list[str]:
    rows = []
    if info.teacher_metrics:
        rows.append((f"teacher (`{info.teacher}`)", info.teacher_metrics))
    if info.baseline_metrics:
        rows.append(("student without KD", info.baseline_metrics))
    if info.metrics:
        rows.append(("student + KD (this model)" if info.method else "this model", info.metrics))
    if not rows:
        return []
    cols = [label for key, _, label in METRICS if any(key in m for _, m in rows)]
    keys = [key for key, _, label in METRICS if label in cols]
    lines = ["## Evaluation", "", f"COCO bbox metrics (pycocotools, %) on the {info.dataset or 'validation'} "
             "validation split:", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
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


# --------------------------------------------------------------------------- push
def stage(model: str | Path, repo_id: str, directory: Path) -> list[str]:
    """Write what would be uploaded into ``directory``: the exported model and ``README.md``."""
    from kdctl.export import export_hf, load_for_export

    info = read_run(model)
    det = load_for_export(str(info.model_dir))
    export_hf(det, directory)
    card = build_card(info, repo_id, det.family, det.architecture, det.label_names)
    (directory / "README.md").write_text(str(card))
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the huggingface_hub login; one clear line when there is none."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise KdctlError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login` "
                         "(or use --dry-run DIR to write the files without uploading)")
    return found


def push_to_hub(
    model: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: Path | None = None,
) -> PushResult:
    """Export the run's student and upload it with a model card (or write it all to ``dry_run``)."""
    if not REPO_ID.match(repo_id):
        raise KdctlError(f"--repo-id {repo_id!r} must look like USER/NAME")
    if dry_run is not None:
        from kdctl.export import check_output_dir

        check_output_dir(Path(dry_run), force=False)
        Path(dry_run).mkdir(parents=True, exist_ok=True)
        return PushResult(repo_id, stage(model, repo_id, Path(dry_run)), dry_run=Path(dry_run))
    secret = resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="kdctl-push-") as tmp:
        files = stage(model, repo_id, Path(tmp))
        url = _upload(Path(tmp), repo_id, secret, private=private, revision=revision,
                      message=commit_message or f"Upload {repo_id.split('/')[-1]} (kdctl)")
    return PushResult(repo_id, files, url=url)


def _upload(folder: Path, repo_id: str, token: str, *, private: bool, revision: str | None, message: str) -> str:
    """create_repo(exist_ok) [+ create_branch] + upload_folder; any failure is one line without the token."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=message, repo_type="model")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200].replace(token, "***")
        raise KdctlError(f"upload to {repo_id} failed ({e.__class__.__name__}: {first}); nothing was changed "
                         "locally, run the command again to retry") from None
    return str(getattr(info, "commit_url", "") or f"{api.endpoint}/{repo_id}")


def push_command(model: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, token: str | None = None,
                 dry_run: Path | None = None) -> PushResult:
    """``kdctl push-to-hub``: push (or dry-run) and print what went where (never the token)."""
    from kdctl.commands import console

    res = push_to_hub(model, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, dry_run=dry_run)
    c = console()
    if res.dry_run is not None:
        c.print(f"dry run: wrote {', '.join(res.files)} to {res.dry_run} (nothing uploaded)", soft_wrap=True)
    else:
        c.print(f"pushed {', '.join(res.files)} to {repo_id}" + (f"@{revision}" if revision else "")
                + f": {res.url}", soft_wrap=True)
    return res


__all__ = ["PushResult", "RunInfo", "build_card", "push_command", "push_to_hub", "read_run", "stage"]
