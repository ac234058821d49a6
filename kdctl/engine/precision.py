"""Precision, memory layout and device facts of a run: autocast dtypes (student and teacher), channels-last,
float32 casts of the teacher's taps, peak memory."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError


def amp_dtype(amp: str, device: str) -> torch.dtype | None:
    """--amp auto|bf16|fp16|off -> autocast dtype (None = full precision). auto: bf16 on CUDA if supported."""
    amp = amp.lower()
    if amp == "off" or (amp == "auto" and not device.startswith("cuda")):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if not device.startswith("cuda"):
            raise KdctlError("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
        return torch.float16
    raise KdctlError(f"--amp {amp!r}: use auto, bf16, fp16 or off")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16 (Ampere or newer), or a CPU with AMX or
    AVX512-BF16 (oneDNN then runs bf16 convolutions and matmuls 2-3x faster than float32)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def teacher_amp_dtype(setting: str, device: str, student_amp: torch.dtype | None) -> torch.dtype | None:
    """--teacher-amp auto|bf16|fp16|off -> the autocast dtype of the teacher's forward (None = float32).

    auto: the student's --amp dtype when it has one; otherwise bfloat16 where the device computes it natively
    (:func:`native_bf16`), else float32. The teacher only runs inference, so its precision costs the student
    nothing in optimisation; its taps come back as float32 when the student's step is float32.
    """
    setting = setting.lower()
    if setting == "auto":
        if student_amp is not None:
            return student_amp
        return torch.bfloat16 if native_bf16(device) else None
    try:
        return amp_dtype(setting, device)
    except KdctlError as e:
        raise KdctlError(str(e).replace("--amp", "--teacher-amp")) from None


def use_channels_last(setting: bool | None) -> bool:
    """--channels-last / --no-channels-last; auto (None): on.

    Channels-last (NHWC) is the layout in which oneDNN's AMX kernels (CPU) and cuDNN's tensor cores (CUDA) run
    bf16 / fp16 convolutions. On a 2-core Xeon with AMX (1 thread, 2 x 320 px), a ResNet-50 FPN forward under bf16
    autocast takes 442 ms in NCHW and 201 ms in NHWC (480 ms in float32); in float32 the layout is about neutral
    (within 5 % per training step, ``benchmarks/overhead.py``). Only 4-d parameters, buffers and activations change layout; values and checkpoints do not.
    """
    return True if setting is None else bool(setting)


def to_channels_last(*modules: nn.Module | None) -> None:
    """Move the 4-d parameters and buffers of ``modules`` to channels-last, in place (teacher, student,
    distiller). Convolutions then produce channels-last activations from any input layout."""
    for m in modules:
        if m is not None:
            m.to(memory_format=torch.channels_last)


def prepare_device(device: str) -> None:
    """Per run, on CUDA: start the peak-memory count afresh (a process that runs several runs reports each run's
    own peak) and let cuDNN pick its fastest kernels per input shape (``cudnn.benchmark``; batches are padded to
    a few sizes, multiples of 32 up to ``imgsz``), unless the caller asked for deterministic cuDNN."""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    elif not device.startswith("cuda"):
        reset_peak_rss()


def reset_peak_rss() -> bool:
    """Linux: restart the process's peak resident set size (``VmHWM``) from its current size, so that a process
    running several runs (``distill --baseline``) reports each run's own peak (what an earlier run left behind is
    collected and handed back to the system first). False where that is not possible."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: str) -> float:
    """Peak memory of the run: CUDA's allocator peak, else the peak RSS since :func:`reset_peak_rss` (``VmHWM``;
    ``ru_maxrss``, the whole process's peak, where /proc is missing)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def to_float32(tree: Any) -> Any:
    """Every floating-point tensor of a nested dict / list / tuple as float32 (other leaves unchanged)."""
    if isinstance(tree, Tensor):
        return tree.float() if tree.is_floating_point() and tree.dtype != torch.float32 else tree
    if isinstance(tree, dict):
        return {k: to_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_float32(v) for v in tree)
    return tree


def dtype_name(dtype: torch.dtype | None, none: str = "float32") -> str:
    """``torch.bfloat16`` -> "bfloat16"; None (full precision) -> ``none``."""
    return str(dtype).removeprefix("torch.") if dtype is not None else none
