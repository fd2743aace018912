"""The one per-image driver of stages 1 (SAM masks) and 2 (embeddings).

Both stages turn every image of a folder into one output file. :func:`run_per_image` runs either,
given a :class:`PerImageStage` that says how to read its images (``load``), compute their results
(``compute``, batching several images per model call as it likes) and save one file (``save``).
The driver owns the rest:

* :func:`plan_work`: this rank's disjoint share of the images, minus finished
  outputs (resume after a kill), unless ``overwrite``;
* bad inputs: a :class:`ReadFailure` from ``load`` stops the run with a one-line error (after the
  images in hand are written), or with ``skip_bad_images`` goes to ``<out>/failed.txt``
  (:func:`record_failure`) and the run carries on;
* stop signals (:class:`~partwhole.common.runtime.StopSignals`: SIGTERM/SIGUSR1, cluster preemption) stop
  feeding images, the ones in hand are finished, then :class:`Interrupted` ends the run (a rerun resumes);
* :func:`disk_full_hint`: a full disk's error says how much more space the remaining images need;
* :class:`Progress`: a progress bar (images, images/s, time left) and a closing
  summary line (written, skipped, failed, time, throughput).

Around it: :func:`launch_workers` (N processes over GPUs/nodes through Lightning Fabric, or one plain
process). The output folder (``runtime.prepare_output_folder``), stop signals, devices and precision are
:mod:`partwhole.common.runtime`; loader processes and malloc settings, which stage 3 uses too,
:mod:`partwhole.common.processes`.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from partwhole.common.errors import InputError, OutputWriteError
from partwhole.common.image_folders import ImageRecord
from partwhole.common.runtime import StopSignals, resolve_device
from partwhole.common.safe_files import (
    DISK_ERRNOS,
    describe_write_error,
    format_bytes,
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


class Interrupted(Exception):
    """The run stopped on a signal after finishing the files in hand; rerunning the command resumes."""

    def __init__(self, signum: int, written: int, remaining: int):
        self.signum, self.written, self.remaining = signum, written, remaining
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after writing {written} file(s); {remaining} image(s) left: "
                         "rerun the same command to finish them (finished files are skipped)")


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
        self.summary = ""  # the closing line, once closed
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
        self.summary = line
        return line

    @property
    def done(self) -> int:
        return self.written + self.failed

    @property
    def mean_file_bytes(self) -> int | None:
        return self.bytes_written // self.written if self.written else None


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` elements of ``items`` (any iterable, taken lazily)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, max(1, size))):
        yield batch


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class ReadFailure:
    """An image whose inputs :meth:`PerImageStage.load` could not read, and one line saying why."""

    record: ImageRecord
    reason: str


class PerImageStage:
    """What a stage supplies to :func:`run_per_image`: how to read, compute and save one image's file.

    ``load`` and ``compute`` are streams, so a stage reads ahead (threads, DataLoader workers) and
    batches images per model call as it likes; results must come out in input order. The driver
    checks for a stop signal between the images it feeds ``compute``, and saves each result.

    Attributes:
        name: the progress bar's and summary line's name (``patched_masks``, ``masks_to_embeds``).
        out_root: the output folder: ``record.output_path(out_root)`` is an image's file, and
            ``failed.txt`` lists the skipped images.
        skip_bad_images: a :class:`ReadFailure` is listed in ``failed.txt`` (else it ends the run).
        save_threads: threads that run :meth:`save` in the background (0: in the calling thread).
        saves_in_flight: with ``save_threads``, results handed to them but not yet saved, at most
            (bounds the memory they hold; the oldest is waited for beyond).
    """

    name: str
    out_root: Path
    skip_bad_images: bool = False
    save_threads: int = 0
    saves_in_flight: int = 1

    def load(self, records: Sequence[ImageRecord]) -> Iterator[tuple[ImageRecord, Any] | ReadFailure]:
        """``(record, inputs)`` for each of ``records`` in order, or a :class:`ReadFailure`."""
        raise NotImplementedError

    def compute(self, items: Iterator[tuple[ImageRecord, Any]]) -> Iterator[tuple[ImageRecord, Any]]:
        """``(record, result)`` for each ``(record, inputs)`` of ``items``, in order."""
        raise NotImplementedError

    def save(self, record: ImageRecord, result: Any) -> int:
        """Write ``record``'s file under :attr:`out_root`; return its size in bytes.

        Raises:
            OutputWriteError: the disk is full (or the folder read-only).
        """
        raise NotImplementedError


def run_per_image(
    stage: PerImageStage, records: Sequence[ImageRecord], *, worker: WorkerContext | None = None,
    overwrite: bool = False, show_progress: bool = True,
) -> Progress:
    """Run ``stage`` over this worker's share of ``records``; return the closed :class:`Progress`.

    Finished files are skipped unless ``overwrite`` (:func:`plan_work`). A SIGTERM or SIGUSR1
    (:class:`~partwhole.common.runtime.StopSignals`) stops feeding images; the ones in hand are finished and written.

    Raises:
        InputError: a bad input (a :class:`ReadFailure`, unless ``stage.skip_bad_images``), after
            the images in hand are written; or what ``compute`` or ``save`` raise.
        OutputWriteError: the disk is full (or the folder read-only): the message says how much
            the remaining images need; finished files are kept.
        Interrupted: a stop signal came before the last image.
    """
    worker = worker or WorkerContext()
    todo, skipped = plan_work(records, stage.out_root, rank=worker.rank, world_size=worker.world_size, overwrite=overwrite)
    progress = Progress(stage.name, len(todo), skipped, rank=worker.rank, enabled=show_progress and bool(todo))
    bad_input: list[str] = []  # a bad input ends the stream; the images in hand are still written
    with StopSignals(on_signal=_announce_stop) as stop:
        try:
            if todo:
                loaded = stage.load(todo)
                try:
                    _save_results(stage, stage.compute(_readable(loaded, stage, progress, stop, bad_input)), progress)
                finally:
                    getattr(loaded, "close", lambda: None)()  # end its reader threads or processes now
        except OutputWriteError as exc:
            progress.bar.close()
            raise disk_full_hint(exc, stage.out_root, len(todo) - progress.done, progress.mean_file_bytes) from None
        except BaseException:
            progress.bar.close()  # leave the error message as the last line
            raise
    progress.close()
    if bad_input:
        raise InputError(bad_input[0])
    if stop.requested and progress.done < len(todo):
        raise Interrupted(stop.signum, progress.written, len(todo) - progress.done)
    return progress


def _announce_stop(signum: int, frame: Any, first: bool) -> None:
    """A stop signal: say so once. A second one while stopping is ignored (the kill that follows a cluster's grace
    period still ends the process)."""
    if first:
        log.warning("received %s: finishing the files in hand, then stopping", signal.Signals(signum).name)


def _readable(loaded: Iterator, stage: PerImageStage, progress: Progress, stop: StopSignals, bad_input: list[str]) -> Iterator:
    """The inputs of ``loaded`` that were read, until a stop signal or a bad input (unless skipped) ends the stream."""
    try:
        for item in loaded:
            if stop.requested:  # stop feeding; the images already in ``compute`` are still written
                return
            if not isinstance(item, ReadFailure):
                yield item
            elif stage.skip_bad_images:
                record_failure(stage.out_root, item.record.path, item.reason)
                progress.update(failed=1)
            else:
                hint = "" if "skip_bad_images" in item.reason else " (or set skip_bad_images to skip it)"
                bad_input.append(item.reason + hint)
                return
    except RuntimeError:  # a reader process (DataLoader worker) killed by the same signal, sent to the process group
        if not stop.requested:
            raise


def _save_results(stage: PerImageStage, results: Iterator[tuple[ImageRecord, Any]], progress: Progress) -> None:
    """Save each result as it comes, in this thread or in ``stage.save_threads`` background threads."""
    if not stage.save_threads:
        for record, result in results:
            progress.update(written=1, nbytes=stage.save(record, result))
        return
    with ThreadPoolExecutor(max_workers=stage.save_threads) as writer:  # on an error, waits for the files in flight
        in_flight: deque = deque()
        for record, result in results:
            in_flight.append(writer.submit(stage.save, record, result))
            while in_flight and (len(in_flight) > stage.saves_in_flight or in_flight[0].done()):
                progress.update(written=1, nbytes=in_flight.popleft().result())
        for future in in_flight:
            progress.update(written=1, nbytes=future.result())
