"""The per-architecture declarations of the CNN family (kdctl.models.cnn.architectures) and who reads them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdctl.models.cnn import ARCHITECTURES, architecture_of, recipe_for


def test_declarations_are_torch_free():
    code = "import sys, kdctl.models.cnn, kdctl.models.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("arch", "available", "recipe"), [
    ("fasterrcnn", ["cnn", "retinanet", "detr"], None),  # the caller falls back to the family's recipe
    ("fasterrcnn_resnet50_fpn", ["cnn", "fasterrcnn"], "fasterrcnn"),
    ("retinanet_resnet50_fpn_v2", ["cnn", "retinanet"], "retinanet"),
    ("fcos", ["cnn", "retinanet"], "retinanet"),
    ("fcos_resnet50_fpn", ["cnn", "retinanet", "fcos"], "fcos"),
    ("DetrForObjectDetection", ["cnn", "retinanet", "detr"], None),
])
def test_recipe_for(arch, available, recipe):
    assert recipe_for(arch, available) == recipe


def test_drkd_defaults_and_onnx_come_from_the_declaration():
    from kdctl.distill.drkd import resolve_weights as resolve
    from kdctl.export import ONNX_SUPPORT

    class Student:
        architecture = "retinanet_resnet50_fpn"

    assert architecture_of("RetinaNet_x") is ARCHITECTURES["retinanet"]
    assert tuple(resolve(Student(), None, None, None).values()) == ARCHITECTURES["retinanet"].drkd_weights
    Student.architecture = "unknown"
    assert tuple(resolve(Student(), None, None, None).values()) == ARCHITECTURES["fasterrcnn"].drkd_weights
    assert all(ONNX_SUPPORT[name] == a.onnx for name, a in ARCHITECTURES.items())
