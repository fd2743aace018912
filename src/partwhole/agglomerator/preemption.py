"""Preemption: on SIGTERM (or SIGUSR1) save a resumable checkpoint at the next step boundary, then stop.

Clusters send SIGTERM (SLURM: SIGTERM, then SIGKILL after ``KillWait``; with sbatch's ``signal=USR1@T``
also SIGUSR1 ``T`` seconds ahead) before they kill a job. Lightning's own SIGTERM handler sets
``trainer.received_sigterm``; its loops then raise ``SIGTERMException`` at the next boundary
(after the training step in hand, between validation batches, or at the end of an epoch), which is a
``SystemExit`` with code 0 and saves nothing. :class:`PreemptionCheckpoint` is the missing half:

* SIGUSR1 is routed to the same handler (Lightning registers it only for SLURM auto-requeue, which
  :func:`cluster_plugins` turns off: its ``hpc_ckpt_N.ckpt`` and ``scontrol requeue`` assume a run
  folder a requeued job finds by itself, while ours resume from a checkpoint the user names);
* on ``SIGTERMException`` during ``fit`` it writes ``trainer.save_checkpoint(path)`` (the loops'
  state included, so the resumed run continues at that exact step), when training advanced since
  the run started (otherwise the previous ``last.ckpt`` stays as it is);
* :attr:`signal_name` and :attr:`saved_path` tell the CLI what happened, so it can exit non-zero with
  the command that resumes;
* several processes (DDP): a signal to any of them (the launching one, or every task under SLURM) is
  only noted by the handler; all processes agree at the end of each training step (one all-reduce)
  and stop at the same step, so that the checkpoint's collective save is reached by every one of them.

The signals and their handlers are ``runtime.STOP_SIGNALS`` / ``runtime.StopSignals``, as in stages 1-2.

The checkpoint goes through the trainer's ``CheckpointIO`` (atomic: see ``checkpoint_io.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from partwhole.common.runtime import STOP_SIGNALS, StopSignals

log = logging.getLogger(__name__)

EXTRA_STOP_SIGNALS = tuple(s for s in STOP_SIGNALS if s != signal.SIGTERM)  # Lightning handles SIGTERM itself


def cluster_plugins() -> list:
    """Lightning's SLURM environment with auto-requeue off when running under SLURM (else nothing).

    Requeueing is left to the job script (sbatch's ``requeue`` option plus the resume command that
    :class:`PreemptionCheckpoint`'s message prints); the signals are handled by that callback.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class PreemptionCheckpoint(Callback):
    """Save ``path`` when training is stopped by SIGTERM or SIGUSR1 (at the next step boundary).

    Args:
        path: the checkpoint to write, e.g. ``<run>/checkpoints/last.ckpt`` (what a resume reads).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signal_name: str | None = None  # set when a stop signal arrived
        self.saved_path: Path | None = None  # set when the checkpoint was written
        self._signals: StopSignals | None = None  # the handlers while fitting
        self._distributed = False
        self._start_step = 0

    # -- signals
    @staticmethod
    def _route_to_sigterm(signum: int, frame: Any, first: bool) -> None:
        """One process, SIGUSR1 (noted by :class:`StopSignals`): run the SIGTERM handler (Lightning's, which flags
        the trainer)."""
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, frame)

    def _install_signals(self, trainer: "pl.Trainer") -> None:
        """After Lightning registered its SIGTERM handler (so its teardown, which restores the handlers it found,
        also removes ours); in the main thread only, and never over someone else's handler (one process).

        Several processes: every stop signal is only noted. Lightning's own handler runs a collective (a broadcast)
        inside the handler, which can pair with another collective of a peer; the processes agree instead at the
        end of the next step (:meth:`on_train_batch_end`), whichever of them received it."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self._signals is not None and self._signals.installed:
            return
        self._distributed = trainer.world_size > 1
        noted = self._signum
        self._signals = (StopSignals(STOP_SIGNALS) if self._distributed
                         else StopSignals(EXTRA_STOP_SIGNALS, on_signal=self._route_to_sigterm, only_unhandled=True))
        self._signals.signum = noted
        self._signals.install()

    @property
    def _signum(self) -> int | None:
        """The stop signal noted (by this process's handlers, or agreed with the others), if any."""
        return None if self._signals is None else self._signals.signum

    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._install_signals(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Several processes: stop together when any of them got a stop signal (one all-reduce per step)."""
        if not self._distributed:
            return
        import torch

        signum = int(trainer.strategy.reduce(torch.tensor(self._signum or 0, device=trainer.strategy.root_device),
                                             reduce_op="max"))
        if signum:
            self._signals.signum = signum
            # Lightning's flag: its loop raises SIGTERMException at this step's end, on every process alike.
            # There is no public setter; the attribute is what Lightning's own handler sets.
            trainer._signal_connector.received_sigterm = True

    def _restore_signals(self) -> None:
        if self._signals is not None:
            self._signals.restore()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._restore_signals()

    # -- the checkpoint
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._install_signals(trainer)
        self._start_step = trainer.global_step  # after a resume: the restored step

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._restore_signals()
        if not isinstance(exception, SIGTERMException):
            return
        self.signal_name = signal.Signals(self._signum or signal.SIGTERM).name
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return  # testing or predicting, or before the first step: nothing new to save
        if trainer.global_step <= self._start_step:
            log.warning("%s before the first training step: keeping the existing checkpoint", self.signal_name)
            return
        trainer.save_checkpoint(self.path)
        self.saved_path = self.path
        log.warning("%s: saved %s at epoch %d, step %d", self.signal_name, self.path, trainer.current_epoch, trainer.global_step)


def find_preemption_checkpoint(trainer: "pl.Trainer") -> PreemptionCheckpoint | None:
    """The :class:`PreemptionCheckpoint` among ``trainer.callbacks``, if any."""
    return next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
