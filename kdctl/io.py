"""Small file and message helpers used across kdctl: one copy each.

* :func:`read_json`: a JSON file, every failure as one :class:`KdctlError` line;
* :func:`write_json` / :func:`write_text`: atomic writes (temp file + rename), a failure as one line;
* :func:`first_line`: one line about an exception, for error messages.

No torch import: the CLI layer may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError


def first_line(e: BaseException, limit: int = 200) -> str:
    """``ExcType: first line of the message`` (cut at ``limit`` characters), for one-line error messages."""
    text = str(e).strip().splitlines()[0][:limit] if str(e).strip() else ""
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def read_json(path: str | Path, what: str = "JSON", expect: type | None = dict) -> Any:
    """Read ``path`` as JSON; a missing, unreadable or malformed file (or a top level that is not ``expect``)
    raises one KdctlError line naming the file and ``what`` it should be."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise KdctlError(f"{path}: not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdctlError(f"{path}: not valid JSON, so not a {what} ({e})") from e
    except OSError as e:
        raise KdctlError(f"{path}: cannot read it ({e.strerror or first_line(e)})") from e
    if expect is not None and not isinstance(data, expect):
        raise KdctlError(f"{path}: not a {what} (expected a JSON {'object' if expect is dict else expect.__name__})")
    return data


def write_error(path: Path, e: OSError) -> KdctlError:
    """One line for an OS error while writing ``path`` (read-only folder, disk full, a file where a folder
    should be)."""
    cause = e.strerror or str(e) or e.__class__.__name__
    return KdctlError(f"cannot write {e.filename or path}: {cause}")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename): a kill never leaves half a file; an OS error is
    one KdctlError line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_bytes` of ``text`` (UTF-8)."""
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    """:func:`write_text` of ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")
