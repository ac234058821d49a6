"""Publish a student to the Hugging Face Hub: export, model card (:mod:`kdctl.card`), create_repo + upload_folder.

What is uploaded: the exported model directory (:func:`kdctl.export.export_hf`: a transformers directory for the
DETR family, a kdctl directory for CNN detectors) plus ``README.md``, the model card, and the run's TensorBoard
event files (``RUN/tensorboard/`` as ``runs/NAME/``, a ``--baseline`` run's as ``runs/NAME-baseline/``), which the
Hub shows as the model's training metrics.

The token comes from ``--token``, ``HF_TOKEN`` or the huggingface_hub login, in that order. It is passed to
huggingface_hub only: never printed, never written to the run directory, the staging folder or the card, and
removed from any error message.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdctl.card import build_card, read_run
from kdctl.errors import KdctlError
from kdctl.specs import REPO_ID


@dataclass
class PushResult:
    repo_id: str
    files: list[str]
    url: str | None = None
    dry_run: Path | None = None


# --------------------------------------------------------------------------- push
def stage(model: str | Path, repo_id: str, directory: Path) -> list[str]:
    """Write what would be uploaded into ``directory``: the exported model, ``README.md`` and the TensorBoard
    logs (:func:`tensorboard_logs`); returns the files, relative to ``directory``."""
    import shutil

    from kdctl.export import export_hf, load_for_export

    info = read_run(model)
    det = load_for_export(str(info.model_dir))
    export_hf(det, directory)
    card = build_card(info, repo_id, det.family, det.architecture, det.label_names)
    (directory / "README.md").write_text(str(card))
    for dest, src in tensorboard_logs(info.run_dir).items():
        shutil.copytree(src, directory / dest)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def tensorboard_logs(run_dir: Path | None) -> dict[str, Path]:
    """``{"runs/NAME": RUN/tensorboard, "runs/NAME-baseline": RUN/baseline/tensorboard}``, those that hold event
    files ({} for a bare model directory)."""
    if run_dir is None:
        return {}
    found = {f"runs/{run_dir.name}": run_dir / "tensorboard",
             f"runs/{run_dir.name}-baseline": run_dir / "baseline" / "tensorboard"}
    return {k: v for k, v in found.items() if v.is_dir() and any(v.glob("events.out.tfevents*"))}


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
    force: bool = False,
) -> PushResult:
    """Export the run's student and upload it with a model card (or write it all to ``dry_run``, which must be
    empty or new unless ``force``; a failed write leaves nothing behind and is one KdctlError line)."""
    if not REPO_ID.match(repo_id):
        raise KdctlError(f"--repo-id {repo_id!r} must look like USER/NAME")
    if dry_run is not None:
        from kdctl.export import check_output_dir, writing_into

        out = Path(dry_run)
        check_output_dir(out, force=force, option="--dry-run")
        with writing_into(out):
            files = stage(model, repo_id, out)
        return PushResult(repo_id, files, dry_run=out)
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


__all__ = ["PushResult", "push_to_hub", "resolve_token", "stage"]
