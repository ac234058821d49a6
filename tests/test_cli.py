"""The CLI shell: instant help that never imports torch/transformers, `python -m kdctl`, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdctl.cli import main

COMMANDS = [[], ["inspect"], ["eval"], ["data"], ["data", "synth"], ["data", "check"], ["export"], ["push-to-hub"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_does_not_import_torch_or_transformers(cmd):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "kdctl", *cmd, "--help"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr[-500:]
    assert "Usage" in p.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "transformers", "torchvision", "numpy"}, sorted(imported & {"torch"})


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code in (0, None) and "kdctl" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "./definitely/not/here"])
    out = capsys.readouterr()
    assert e.value.code == 2
    assert out.err.strip().count("\n") == 0 and out.err.startswith("error:") and "Traceback" not in out.err


def test_unknown_spec_names_the_kinds(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "nonsense"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "preset" in err and "torchvision:NAME" in err


def test_predictions_needs_annotations(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--predictions", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "go together" in capsys.readouterr().err
