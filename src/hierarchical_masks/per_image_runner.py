"""Shared driver of the per-image stages (1: SAM masks, 2: embeddings).

Both stages turn every image of a folder into one output file. This module holds
what they share, so each stage script only says how to compute one batch:

* :func:`launch_workers`: N processes over GPUs/nodes through Lightning Fabric
  (torch.distributed DDP), or one plain process;
* :func:`plan_work`: this rank's disjoint share of the images, minus finished
  outputs (resume after a kill), unless ``overwrite``;
* :class:`Progress`: a progress bar (images, images/s, time left) and a closing
  summary line (written, skipped, failed, time, throughput);
* :func:`record_failure`: one line per bad input in ``<out>/failed.txt``;
* :func:`prepare_output_folder`: create it, prove it writable, remove stale temporary files;
* :class:`StopOnSignal`: SIGTERM/SIGUSR1 (cluster preemption) finish the files in hand, then
  :class:`Interrupted` ends the run (a rerun resumes);
* :func:`disk_full_hint`: how much more space the remaining images need.

Devices and precision are :mod:`hierarchical_masks.devices`; loader processes and malloc settings,
which stage 3 uses too, :mod:`hierarchical_masks.processes`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from hierarchical_masks.devices import resolve_device
from hierarchical_masks.errors import InputError, OutputWriteError
from hierarchical_masks.image_folders import ImageRecord
from hierarchical_masks.processes import STOP_SIGNALS
from hierarchical_masks.safe_files import DISK_ERRNOS, describe_write_error, format_bytes, remove_stale_temporaries

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Where this process runs: its rank among ``world_size`` and its torch device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fabric: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()


def launch_workers(device: str = "cpu", num_processes: int = 1, num_nodes: int = 1) -> WorkerContext:
    """Start this rank's worker.

    With ``num_processes * num_nodes == 1`` nothing is launched and ``device`` is
    used as given. Otherwise Lightning Fabric starts the DDP processes (one per
    GPU on CUDA, ``num_processes`` CPU processes on CPU; under ``torchrun`` or
    SLURM it joins the existing ones) and each returns its own context.
    """
    dev = resolve_device(device)
    if num_processes * num_nodes <= 1 and "LOCAL_RANK" not in os.environ:
        return WorkerContext(device=dev)
    from lightning_fabric import Fabric

    accelerator = "cuda" if dev.type == "cuda" else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=num_processes, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return WorkerContext(rank=fabric.global_rank, world_size=fabric.world_size, device=fabric.device, fabric=fabric)


def prepare_output_folder(out_root: str | os.PathLike, flag: str = "--out_data_path") -> Path:
    """Create ``out_root``, prove a file can be written there, and remove stale temporary files.

    The temporary files are those of :func:`~hierarchical_masks.safe_files.atomic_write_bytes`
    left by a killed run (see :func:`~hierarchical_masks.safe_files.remove_stale_temporaries`).

    Raises:
        InputError: the folder cannot be created or written (read-only, permissions, disk full).
    """
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_root):
            pass
    except OSError as exc:
        raise InputError(f"{flag}={out_root}: cannot write there ({exc.strerror}); choose a writable folder") from None
    removed = remove_stale_temporaries(out_root)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), out_root)
    return out_root


class Interrupted(Exception):
    """The run stopped on a signal after finishing the files in hand; rerunning the command resumes."""

    def __init__(self, signum: int, written: int, remaining: int):
        self.signum, self.written, self.remaining = signum, written, remaining
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after writing {written} file(s); {remaining} image(s) left: "
                         "rerun the same command to finish them (finished files are skipped)")


class StopOnSignal:
    """Context manager: SIGTERM and SIGUSR1 (what clusters send before a kill) ask the loop to stop.

    The handlers only set :attr:`signum`; the loop checks :attr:`requested` between files, finishes
    the ones in hand and raises :class:`Interrupted`. Handlers are installed in the main thread only
    and restored on exit. A second signal of the same kind while stopping is ignored (the kill that
    follows a cluster's grace period still ends the process).
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing the files in hand, then stopping", signal.Signals(signum).name)
            self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def disk_full_hint(error: OutputWriteError, out_root: str | os.PathLike, remaining: int, file_bytes: int | None) -> OutputWriteError:
    """``error`` with how much space the ``remaining`` images need (``file_bytes`` each, as the files so far)."""
    file_bytes = file_bytes or error.size
    if not remaining or not file_bytes:
        return error
    return OutputWriteError(f"{error}; the {remaining} image(s) left need about {format_bytes(remaining * file_bytes)} "
                            f"in {out_root} (finished files are kept and skipped on rerun)", size=error.size)


def plan_work(
    records: Sequence[ImageRecord], out_root: str | os.PathLike, *, rank: int = 0, world_size: int = 1, overwrite: bool = False
) -> tuple[list[ImageRecord], int]:
    """Return ``(todo, skipped)``: this rank's share of ``records`` still to compute.

    Rank ``r`` takes ``records[r::world_size]`` (disjoint, together complete).
    Finished outputs (a file at :meth:`ImageRecord.output_path`) are skipped
    unless ``overwrite``.
    """
    share = list(records)[rank::world_size]
    if overwrite:
        return share, 0
    todo = [r for r in share if not r.output_path(out_root).is_file()]
    return todo, len(share) - len(todo)


def record_failure(out_root: str | os.PathLike, image_path: str | os.PathLike, reason: str) -> None:
    """Append ``<image path>\\t<reason>`` to ``<out_root>/failed.txt`` (one short append: safe across ranks).

    A line already in the file (the same failure met again by a rerun) is not added twice.
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    line = f"{image_path}\t{' '.join(reason.split())}\n"
    failed = out_root / "failed.txt"
    try:
        known = line in failed.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    except FileNotFoundError:
        known = False
    if not known:
        try:
            with open(failed, "a", encoding="utf-8") as handle:  # one short O_APPEND write: ranks do not mix lines
                handle.write(line)
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            raise OutputWriteError(describe_write_error(exc, failed, len(line.encode())), size=len(line.encode())) from None
    log.warning("skipped %s: %s", image_path, reason)


class Progress:
    """Progress bar over images plus a closing summary line.

    ``update(written=..., failed=..., nbytes=...)`` after each batch; ``close()`` prints
    ``<name>: N written, N skipped (already done), N failed in T s (X images/s)``.
    """

    def __init__(self, name: str, total: int, skipped: int, *, rank: int = 0, enabled: bool = True):
        self.name, self.skipped, self.rank = name, skipped, rank
        self.written = self.failed = self.bytes_written = 0
        self.start = time.perf_counter()
        desc = name if rank == 0 else f"{name}[rank {rank}]"
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, position=rank, dynamic_ncols=True)

    def update(self, written: int = 0, failed: int = 0, nbytes: int = 0) -> None:
        self.written += written
        self.failed += failed
        self.bytes_written += nbytes
        self.bar.update(written + failed)

    def close(self) -> str:
        self.bar.close()
        seconds = time.perf_counter() - self.start
        rate = self.written / seconds if seconds > 0 else 0.0
        prefix = self.name if self.rank == 0 else f"{self.name} [rank {self.rank}]"
        line = (
            f"{prefix}: {self.written} written, {self.skipped} skipped (already done), "
            f"{self.failed} failed in {seconds:.1f} s ({rate:.2f} images/s)"
        )
        sys.stdout.write(line + "\n")  # one write: lines of several ranks do not interleave
        sys.stdout.flush()
        return line

    @property
    def done(self) -> int:
        return self.written + self.failed

    @property
    def mean_file_bytes(self) -> int | None:
        return self.bytes_written // self.written if self.written else None


def batched(items: Sequence, size: int):
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
