"""Runtime plumbing that every stage shares: stop signals, output and run folders, devices and precision.

* **Stop signals**: :data:`STOP_SIGNALS` (SIGTERM, SIGUSR1: what clusters send before a kill) and
  :class:`StopSignals`, their handlers for the length of a run. Stages 1-2's per-image runner stops
  feeding images when one arrives; stage 3's ``preemption.PreemptionCheckpoint`` (a Lightning callback)
  saves a checkpoint at the next step. Loader processes ignore them (``processes.ignore_stop_signals``).
* **Folders**: :func:`prepare_output_folder` (create it, prove it writable, remove the temporary files a
  killed run left) for stages 1-2's output folder and stage 3's run folder (:func:`make_run_dir`, which
  also chooses it: the given folder, a resumed checkpoint's, or a new timestamped one).
* **Devices**: :func:`resolve_device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) for stages 1-2; stage 3's
  Lightning ``(accelerator, devices)`` from GPU and process counts, :func:`lightning_devices`.
* **Precision**: one vocabulary, :data:`PRECISIONS` (``fp32``, ``bf16``, ``fp16``, each a torch dtype);
  stage 1 takes those names, stage 2 those and ``auto``, and stage 3 Lightning's names for the same
  choices (``32-true``, ``bf16-mixed``, ``16-mixed``, ...), mapped by :data:`LIGHTNING_PRECISION`.
  :func:`resolve_precision` checks a name and resolves ``auto`` (:func:`auto_precision`: bf16 where the
  device computes it natively, else fp32); :func:`lightning_precision` is the same for stage 3.

Errors about a setting's value are :class:`~partwhole.common.errors.SettingError` naming the setting
(a config field); the command lines turn them into their flags.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from partwhole.common.errors import SettingError
from partwhole.common.safe_files import remove_stale_temporaries

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- stop signals

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)
"""What clusters send before a kill (SLURM: SIGTERM, then SIGKILL after ``KillWait``; with sbatch's ``signal=USR1@T``
also SIGUSR1 ``T`` seconds ahead): each stage finishes what it has in hand, then stops."""

OnSignal = Callable[[int, Any, bool], None]  # (signum, frame, first: no stop signal came before)


class StopSignals:
    """Handlers for the stop signals while a run lasts: each signal is noted (:attr:`signum`, the first kept),
    then passed to ``on_signal(signum, frame, first)`` if given.

    A context manager, or :meth:`install` / :meth:`restore`. Handlers go in from the main thread only (Python's
    rule; elsewhere nothing is installed) and the previous ones come back on :meth:`restore`. With
    ``only_unhandled``, a signal that already has a handler of its own (not the default) is left alone.

    Args:
        signals: the signals to handle (default :data:`STOP_SIGNALS`).
        on_signal: what else to do on each signal, e.g. log it or pass it on.
        only_unhandled: take only signals whose handler is the default.
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, on_signal: OnSignal | None = None,
                 only_unhandled: bool = False):
        self.signals, self.on_signal, self.only_unhandled = tuple(signals), on_signal, only_unhandled
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self.installed = False

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived (or :meth:`note` recorded one)."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """The first signal's name (``SIGTERM``, ``SIGUSR1``), or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def note(self, signum: int) -> None:
        """Record ``signum`` as if it had arrived (the first one is kept)."""
        self.signum = self.signum or signum

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.note(signum)
        if self.on_signal is not None:
            self.on_signal(signum, frame, first)

    def install(self) -> bool:
        """Install the handlers (main thread only, once); True if this call installed them."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            if not self.only_unhandled or signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, self._handle)
        self.installed = True
        return True

    def restore(self) -> None:
        """Put back the handlers found by :meth:`install`; what was noted stays."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self.installed = False

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# --------------------------------------------------------------------------- folders


def prepare_output_folder(folder: str | os.PathLike, setting: str = "out_data_path", *, clean: bool = True) -> Path:
    """Create ``folder``, prove a file can be written there, and (``clean``) remove stale temporary files.

    The temporary files are those of :func:`~partwhole.common.safe_files.atomic_write_bytes` left by a
    killed run (see :func:`~partwhole.common.safe_files.remove_stale_temporaries`); several processes
    writing one folder let one of them clean it.

    Raises:
        SettingError: ``setting`` (the folder) cannot be created or written (read-only, permissions, disk full).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise SettingError(setting, str(folder), f"cannot write there ({exc.strerror}); choose a writable folder") from None
    removed = remove_stale_temporaries(folder) if clean else []
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run under %s", len(removed), folder)
    return folder


RUN_DIR_ENV = "PARTWHOLE_RUN_DIR"  # a new run's folder, for the DDP processes started after it was chosen


def make_run_dir(output_dir: str, exp_name: str, tag: str, resume_from: str | None = None) -> Path:
    """Stage 3's run folder, prepared (:func:`prepare_output_folder`; rank 0 removes the stale temporaries).

    The folder is ``output_dir`` when given, else the folder of a checkpoint being resumed
    (``<run>/checkpoints/x.ckpt``), else a new ``runs/<exp_name>/<time>-<tag>``. Under DDP the processes
    started later take rank 0's choice from the environment (:data:`RUN_DIR_ENV`).

    Raises:
        SettingError: ``output_dir`` is needed (processes started by a launcher) or not writable.
    """
    from pytorch_lightning.utilities import rank_zero_only

    if output_dir:
        run = Path(output_dir)
    elif resume_from is not None and Path(resume_from).parent.name == "checkpoints":
        run = Path(resume_from).parent.parent
    elif rank_zero_only.rank != 0:  # a DDP process: rank 0's folder (the same time stamp)
        if RUN_DIR_ENV not in os.environ:
            raise SettingError("output_dir", output_dir, "several processes started by a launcher (SLURM, torchrun) "
                               "need one: the same folder for all of them")
        run = Path(os.environ[RUN_DIR_ENV])
    else:
        run = Path("runs") / exp_name / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"
    os.environ[RUN_DIR_ENV] = str(run)  # the processes that Lightning's DDP launcher starts later inherit it
    return prepare_output_folder(run, "output_dir", clean=rank_zero_only.rank == 0)  # rank 0 writes there


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | None = "auto", setting: str = "device") -> torch.device:
    """``auto`` (or None: CUDA when a GPU is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked.

    Raises:
        SettingError: not a torch device, or CUDA asked for but absent (or that GPU index).
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SettingError(setting, device, f"not a torch device ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise SettingError(setting, device, "no CUDA GPU is visible; use cpu")
        if dev.index is not None and dev.index >= count:
            raise SettingError(setting, device, f"only {count} GPU(s) visible; use cuda:0..cuda:{count - 1}")
    return dev


def lightning_devices(num_gpus: int, num_processes: int = 1) -> tuple[str, int]:
    """Stage 3's ``(accelerator, devices)`` per node: ``num_gpus`` GPUs where one is visible and ``num_gpus >= 1``,
    else ``num_processes`` CPU processes (DDP over gloo when more than one). GPUs win when both are given."""
    if num_processes < 1:
        raise SettingError("num_processes", num_processes, "give 1 or more")
    available = torch.cuda.device_count()
    if num_gpus <= 0 or available == 0:
        if num_gpus > 0:
            log.warning("num_gpus=%d but no CUDA GPU is visible: running on CPU (%d process%s)", num_gpus,
                        num_processes, "es" if num_processes > 1 else "")
        return "cpu", num_processes
    if num_processes > 1:
        log.warning("num_processes=%d ignored: num_gpus=%d runs one process per GPU (num_gpus=0 for CPU processes)",
                    num_processes, num_gpus)
    if num_gpus > available:
        log.warning("num_gpus=%d but only %d GPU(s) are visible: using %d", num_gpus, available, available)
    return "gpu", min(num_gpus, available)


# --------------------------------------------------------------------------- precision

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # autocast of the same dtype
LIGHTNING_PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true")  # stage 3's


def bf16_native(device_type: str) -> bool:
    """Whether the device computes bf16 natively (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX).

    On other CPUs bf16 is emulated and slower than fp32, so ``auto`` precisions pick fp32 there.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:  # oneDNN's own test; torch has no public one for the CPU
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_precision(device_type: str) -> str:
    """``auto``: ``bf16`` where the device computes it natively (:func:`bf16_native`), else ``fp32``."""
    return "bf16" if bf16_native(device_type) else "fp32"


def resolve_precision(precision: str, device_type: str, choices: Sequence[str] = ("auto", *PRECISIONS),
                      setting: str = "precision") -> str:
    """``precision`` checked against ``choices``, with ``auto`` resolved for ``device_type`` (:func:`auto_precision`).

    Raises:
        SettingError: ``precision`` is not one of ``choices``.
    """
    if precision not in choices:
        raise SettingError(setting, precision, f"choose one of {', '.join(choices)}")
    return auto_precision(device_type) if precision == "auto" else precision


def lightning_precision(precision: str, accelerator: str, setting: str = "precision") -> str:
    """Stage 3's precision for Lightning (``accelerator`` ``gpu`` or ``cpu``): one of :data:`LIGHTNING_PRECISIONS`;
    ``auto`` is bf16-mixed where bf16 is native, else 32-true.

    Raises:
        SettingError: not one of those, or ``16-mixed`` on the CPU.
    """
    device_type = "cuda" if accelerator == "gpu" else "cpu"
    resolved = resolve_precision(precision, device_type, LIGHTNING_PRECISIONS, setting)
    if resolved == "16-mixed" and device_type == "cpu":
        raise SettingError(setting, precision, "needs a GPU; use bf16-mixed or 32 on CPU")
    return LIGHTNING_PRECISION.get(resolved, resolved)  # auto's fp32 / bf16 in Lightning's names


__all__ = [
    "LIGHTNING_PRECISION", "LIGHTNING_PRECISIONS", "PRECISIONS", "RUN_DIR_ENV", "STOP_SIGNALS",
    "StopSignals", "auto_precision", "bf16_native", "lightning_devices", "lightning_precision", "make_run_dir",
    "prepare_output_folder", "resolve_device", "resolve_precision",
]  # fmt: skip
