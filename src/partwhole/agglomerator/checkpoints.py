"""Reading checkpoints safely, and telling ours from the reference's.

Checkpoints are opened with ``torch.load(weights_only=True)``: tensors and plain
containers only, no code. Ours (Lightning) carry ``hyper_parameters``; the
reference's published ones keep weights under ``state_dict`` with no prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from partwhole.common.errors import InputError, SettingError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SettingError("checkpoint", str(path), "checkpoint file not found (give a .ckpt file, e.g. "
                           "runs/<exp>/<run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip archives, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a loadable checkpoint with weights_only=True ({first})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: not a checkpoint (expected a dict with a state_dict)")
    return checkpoint


def is_own_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """True for checkpoints written by our Lightning module (they carry its hyper-parameters)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    return isinstance(hparams, dict) and "model" in hparams and "objective" in hparams
