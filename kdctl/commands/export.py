"""``kdctl export`` and ``kdctl push-to-hub``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kdctl.commands.output import console
from kdctl.errors import KdctlError

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.export import ExportResult
    from kdctl.hub import PushResult


def export_command(model: str, fmt: str, output: Path, *, half: bool = False, opset: int = 17,
                   imgsz: int | None = None, force: bool = False, simplify: bool = False,
                   trust_remote_code: bool = False) -> ExportResult:
    """``kdctl export``: export, then print the files, the ONNX parity and what the graph takes and gives."""
    from kdctl.export import export_model

    res = export_model(model, fmt, output, half=half, opset=opset, imgsz=imgsz, force=force, simplify=simplify,
                       trust_remote_code=trust_remote_code)
    c = console()
    c.print(f"exported {res.architecture} ({res.family}) as {res.format} to {res.output}: {', '.join(res.files)}",
            soft_wrap=True)
    for note in res.notes:
        c.print(f"  {note}", soft_wrap=True)
    return res


def push_command(model: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                 commit_message: str | None = None, token: str | None = None,
                 dry_run: Path | None = None, force: bool = False) -> PushResult:
    """``kdctl push-to-hub``: push (or dry-run) and print what went where (never the token)."""
    from kdctl.hub import push_to_hub

    if force and dry_run is None:
        raise KdctlError("--force only applies to --dry-run DIR (an upload never overwrites local files)")
    res = push_to_hub(model, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, dry_run=dry_run, force=force)
    c = console()
    if res.dry_run is not None:
        c.print(f"dry run: wrote {', '.join(res.files)} to {res.dry_run} (nothing uploaded)", soft_wrap=True)
    else:
        c.print(f"pushed {', '.join(res.files)} to {repo_id}" + (f"@{revision}" if revision else "")
                + f": {res.url}", soft_wrap=True)
    return res
