"""Checkpoint writing that never leaves a truncated file under a real name (a Lightning ``CheckpointIO`` plugin).

Lightning's ``TorchCheckpointIO`` saves through fsspec, which writes to a temporary file in the
system temp folder and then moves it. Across filesystems the move is a copy into the destination,
so a full disk, a quota or a kill during that copy leaves a truncated ``last.ckpt``: the one file a
resume needs. :class:`AtomicCheckpointIO` writes local checkpoints with
:func:`partwhole.common.safe_files.atomic_write_bytes` instead: a temporary file in the checkpoint's
own folder, flushed and fsynced, then ``os.replace``. A failed save leaves the previous file whole
and raises :class:`~partwhole.common.errors.OutputWriteError` (folder, file, space needed).
Remote paths (``s3://``, ...) keep Lightning's fsspec path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from partwhole.common.safe_files import atomic_write_bytes


def is_local_path(path: Any) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic on the destination's filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # the whole file in memory first, as Lightning does
        atomic_write_bytes(Path(str(path).removeprefix("file://")), buffer.getbuffer())
