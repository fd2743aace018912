"""Devices and precision, for every stage: which device, and whether it computes bf16 natively.

The one precision vocabulary is :data:`PRECISIONS` (``fp32``, ``bf16``, ``fp16``, each a torch dtype);
stage 1 takes those names, stage 2 those and ``auto``, and stage 3 Lightning's names for the same
choices (``32-true``, ``bf16-mixed``, ``16-mixed``, ...), mapped by :data:`LIGHTNING_PRECISION`. Every
``auto`` is :func:`auto_precision`: bf16 where the device computes it natively, else fp32.
"""

from __future__ import annotations

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # autocast of the same dtype


def resolve_device(device: str) -> torch.device:
    """``--device`` as given (``cpu``, ``cuda``, ``cuda:1``); CUDA asked for but absent is an error."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device={device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device}: no CUDA GPU is visible; use --device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device={device}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def bf16_native(device_type: str) -> bool:
    """Whether the device computes bf16 natively (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX).

    On other CPUs bf16 is emulated and slower than fp32, so ``auto`` precisions pick fp32 there.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:  # oneDNN's own test
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device_type: str) -> str:
    """``auto``: ``bf16`` where the device computes it natively (:func:`bf16_native`), else ``fp32``."""
    return "bf16" if bf16_native(device_type) else "fp32"
