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
* :func:`disk_full_hint`: how much more space the remaining images need;
* :func:`keep_freed_memory`: glibc malloc settings for CPU runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from hierarchical_masks.mask_io import (
    DISK_ERRNOS,
    ImageRecord,
    InputError,
    OutputWriteError,
    describe_write_error,
    format_bytes,
    remove_stale_temporaries,
)

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

    The temporary files are those of :func:`~hierarchical_masks.mask_io.atomic_write_bytes`
    left by a killed run (see :func:`~hierarchical_masks.mask_io.remove_stale_temporaries`).

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

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

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


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the process (thread) that started it ends.

    A loader process ignores SIGTERM (see :func:`ignore_stop_signals`), so nothing else would end it
    if the main process were killed outright (``kill -9``, the OOM killer): it would stay behind,
    holding memory, possibly blocked forever on a queue nobody reads. Elsewhere: nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: the atexit reaper still covers a normal exit
        return


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader processes ignore SIGTERM/SIGUSR1 (a cluster signals the whole
    process group); the main process decides when to stop and shuts them down. They die with it.

    Use it with :func:`end_loader_workers_at_exit` in the main process.
    """
    for signum in StopOnSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()


def shut_down_loader_workers(loaders: Iterable) -> None:
    """End the worker processes of ``loaders``' persistent iterators now, and drop those iterators.

    First the iterator's own orderly shutdown (each worker is told to stop and joined); a worker still
    alive after it gets SIGKILL (ours ignore the SIGTERM that torch falls back to). For a training run
    stopped by a signal: Lightning's teardown shuts down only the active loop's loaders (not those of
    the fit loop when the signal came during validation), so their workers would outlive the run.
    """
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if isinstance(iterator, _MultiProcessingDataLoaderIter):
            iterator._shutdown_workers()
            for worker in iterator._workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=10)
        if iterator is not None:
            loader._iterator = None


_LOADER_REAPER_REGISTERED = False


def end_loader_workers_at_exit() -> None:
    """Make sure DataLoader processes that ignore SIGTERM end when this process exits (register once).

    At exit, multiprocessing terminates the daemonic processes still running (SIGTERM) and waits
    for them; loader processes started with :func:`ignore_stop_signals` would make it wait forever
    (Lightning does not always shut a loader down when training stops on an exception). This exit
    handler, registered after multiprocessing's and so run before it, kills them (SIGKILL) first:
    every daemonic multiprocessing child still alive, which in this project means loader processes
    (DDP ranks are started by Lightning as subprocesses, not multiprocessing children). torch's
    SIGCHLD handler is put back to the default first: it would raise "DataLoader worker is killed"
    in the middle of this handler, which would leave the other workers alive and the exit hung.
    """
    global _LOADER_REAPER_REGISTERED
    if _LOADER_REAPER_REGISTERED:
        return
    import atexit
    import multiprocessing

    def kill_loader_workers() -> None:
        children = [child for child in multiprocessing.active_children() if child.daemon]
        if not children:
            return
        if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=10)

    atexit.register(kill_loader_workers)
    _LOADER_REAPER_REGISTERED = True


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


# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True if it took effect.

    By default glibc serves every allocation above a threshold (at most 32 MB)
    with a fresh ``mmap`` and unmaps it on free, and trims the heap's top; a CPU
    forward pass that allocates and frees the same large activations every
    batch then pays a page fault per 4 KB each time (30-50% of stage 2's CPU
    time in bench/RESULTS.md). With mmap off and trimming raised to 2 GB, freed
    blocks are reused (allocations a thread arena cannot hold fall back to the
    main heap). The cost: the process keeps its peak memory until it exits.
    Left alone when the user set ``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables,
    and off Linux or without glibc.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has its own malloc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


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
