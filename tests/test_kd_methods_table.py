"""benchmarks/kd_gain.py --methods (issue #15 item 6), without training: the option's checks, the methods a pair
cannot take, and the table's paired gains and confidence intervals from given per-seed APs."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kd_gain  # noqa: E402


def test_methods_option_is_checked_against_the_registry():
    args = kd_gain.parse_args(["--methods", "none, drkd,cwd,pkd,mgd,drkd"])
    assert args.methods == ["none", "drkd", "cwd", "pkd", "mgd"]  # order kept, duplicates dropped
    assert kd_gain.parse_args([]).methods == []
    for bad in (["--methods", "none,cwdd"], ["--methods", "drkd+nope"], ["--methods", "cwd", "--kd-set", "old"]):
        with pytest.raises(SystemExit):
            kd_gain.parse_args(bad)


def test_methods_a_pair_cannot_take_are_skipped_with_kdctls_reason():
    assert kd_gain.not_applicable("cwd", "fcos-mobilenet-v2", "retinanet-mobilenet-v2-0.5") is None
    assert kd_gain.not_applicable("none", "dab-detr-mobilenet-v2", "fcos-mobilenet-v2-0.5") is None
    why = kd_gain.not_applicable("mgd", "dab-detr-mobilenet-v2", "fcos-mobilenet-v2-0.5")
    assert why and "needs a cnn teacher and a cnn student" in why


def test_table_has_paired_gains_and_intervals(tmp_path):
    plan = kd_gain.SMALL["fcos-synth"]
    args = argparse.Namespace(mode="small", max_steps=2, resolved_device="cpu", eval_on="val")
    students = [{"AP": a, "method": "none", "seconds": 10} for a in (30.0, 32.0, 31.0)]
    runs = {"cwd": [{"AP": a, "method": "cwd", "seconds": 12} for a in (33.0, 33.0, 35.0)],
            "pkd": [{"AP": 29.0, "method": "pkd", "seconds": 12}]}  # one seed so far: no interval yet
    rec = kd_gain.methods_record(plan, tmp_path, args, {"AP": 40.0, "run_dir": "T"}, students, runs, [0, 1, 2],
                                 {"kd-detr": "needs a detr teacher"}, 70.0, False)
    cwd = rec["methods"]["cwd"]
    assert cwd["gain_per_seed"] == [3.0, 1.0, 4.0] and cwd["gain"] == pytest.approx(8 / 3, abs=0.01)
    # paired t interval, 2 dof: mean +- t(0.975, 2) * sd / sqrt(3), t = 4.3027, sd of (3, 1, 4) = 1.5275
    half = 4.3027 * 1.5275 / math.sqrt(3)
    assert cwd["gain_ci95"] == pytest.approx([8 / 3 - half, 8 / 3 + half], abs=0.01)
    assert rec["methods"]["pkd"]["gain_per_seed"] == [-1.0] and rec["methods"]["pkd"]["gain_ci95"] is None
    assert rec["methods"]["none"]["mean"] == 31.0 and rec["status"] == "partial"
    kd_gain.write_methods(tmp_path, rec)
    doc = json.loads((tmp_path / "kd_methods.json").read_text())
    assert list(doc["pairs"]) == ["fcos-synth-small"]
    md = (tmp_path / "kd_methods.md").read_text()
    assert "| cwd | 40.0 | 33.0 / 33.0 / 35.0 | 33.7 | +3.0 / +1.0 / +4.0 | +2.7 | [-1.1, +6.5] | 3 |" in md
    assert "skipped kd-detr: needs a detr teacher" in md
