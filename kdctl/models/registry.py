"""Registries: architecture -> adapter family, and (teacher family, student family) -> KD method.

Kept free of torch imports so the CLI can use it for help texts. Adding a family is one adapter file plus one
line in ``FAMILIES``; adding a method is one file in ``kdctl/distill`` plus one line in ``METHODS``.
"""

from __future__ import annotations

from kdctl.models.cnn.architectures import ARCHITECTURES as CNN_ARCHITECTURES

# family -> "module:function" that builds a Detector from a resolved spec (imported lazily)
FAMILIES: dict[str, str] = {
    "cnn": "kdctl.models.cnn:load",
    "detr": "kdctl.models.detr:load",
}

# transformers model_type -> family (HF config.json "model_type")
HF_MODEL_TYPES: dict[str, str] = {
    "detr": "detr",
    "conditional_detr": "detr",
    "dab-detr": "detr",
    "deformable_detr": "detr",
    "table-transformer": "detr",
    "rt_detr": "detr",
    "rt_detr_v2": "detr",
    "lw_detr": "detr",
    "rf_detr": "detr",
    "d_fine": "detr",
    "deimv2": "detr",
}

# transformers model_types kdctl refuses, and why (one line each)
REFUSED_MODEL_TYPES: dict[str, str] = {
    "yolos": "YOLOS cannot take part in KD-DETR (as teacher or student): its ViT encoder has no attention mask, so "
             "the extra distillation-point tokens would change the image features; prediction distillation "
             "(--method pred-kd, which needs only the teacher's detections) would apply once kdctl adapts YOLOS, "
             "which it does not yet",
}

# torchvision architectures kdctl adapts (builder names in torchvision.models.detection, and kdctl's own builders)
TORCHVISION_PREFIXES: tuple[str, ...] = tuple(CNN_ARCHITECTURES)

# method name -> (teacher family, student family, "module:Class"); ANY_FAMILY ("*") fits every family
METHODS: dict[str, tuple[str, str, str]] = {
    "drkd": ("cnn", "cnn", "kdctl.distill.drkd:DRKD"),
    "kd-detr": ("detr", "detr", "kdctl.distill.kd_detr:KDDETR"),
    "cwd": ("cnn", "cnn", "kdctl.distill.cwd:CWD"),
    "pkd": ("cnn", "cnn", "kdctl.distill.pkd:PKD"),
    "mgd": ("cnn", "cnn", "kdctl.distill.mgd:MGD"),
    "pred-kd": ("*", "*", "kdctl.distill.pred_kd:PredKD"),
}
ANY_FAMILY = "*"
COMBINATION = "kdctl.distill.combined:combined_class"  # builds the Distiller of "a+b" (--method drkd+pred-kd)


def fits(method: str, teacher_family: str, student_family: str) -> bool:
    """Whether ``method`` distils a ``teacher_family`` teacher into a ``student_family`` student."""
    t, s, _ = METHODS[method]
    return t in (ANY_FAMILY, teacher_family) and s in (ANY_FAMILY, student_family)


def methods_for_family(family: str) -> list[str]:
    """KD methods a model of ``family`` can take part in (as teacher or student)."""
    return [m for m, (t, s, _) in METHODS.items() if family in (t, s) or ANY_FAMILY in (t, s)]


def method_for_pair(teacher_family: str, student_family: str) -> str | None:
    """The method ``--method auto`` picks for a teacher/student pair, or None when unsupported: the method made
    for exactly that pair (DRKD, KD-DETR) before one for any pair (pred-kd, e.g. across families)."""
    exact = [m for m, (t, s, _) in METHODS.items() if (t, s) == (teacher_family, student_family)]
    return next(iter(exact), None) or next((m for m in METHODS if fits(m, teacher_family, student_family)), None)


def supported_pairs() -> str:
    """``"cnn -> cnn: drkd, cwd, pkd, mgd; detr -> detr: kd-detr; any -> any: pred-kd"`` (per pair, the one
    ``auto`` picks first)."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for m, (t, s, _) in METHODS.items():
        pairs.setdefault((t, s), []).append(m)

    def fam(f: str) -> str:
        return "any" if f == ANY_FAMILY else f

    return "; ".join(f"{fam(t)} -> {fam(s)}: {', '.join(ms)}" for (t, s), ms in pairs.items())


def import_string(path: str):
    import importlib

    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
