"""Run plumbing for stage 3: the run folder's lock, loggers, the Lightning Trainer.

Devices (``lightning_devices``), precision (``lightning_precision``) and the run folder itself
(``make_run_dir``) are :mod:`partwhole.common.runtime`'s, shared with stages 1-2.

The Trainer writes checkpoints atomically (``checkpoint_io.AtomicCheckpointIO``) and, when training,
saves ``checkpoints/last.ckpt`` on SIGTERM/SIGUSR1 before it stops (``preemption.PreemptionCheckpoint``).

The command line turns its flags into plain values and calls these; nothing here reads flags. Errors name the
setting (:class:`~partwhole.common.errors.SettingError`), which the command line words as its flag.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.utilities import rank_zero_only

from partwhole.agglomerator.checkpoint_io import AtomicCheckpointIO
from partwhole.agglomerator.preemption import PreemptionCheckpoint, cluster_plugins
from partwhole.common.errors import SettingError

log = logging.getLogger(__name__)

def launcher_rank(devices_per_node: int) -> int:
    """This process's global rank as its launcher's environment says (0 when started by hand on one node).

    ``RANK`` (torchrun), ``SLURM_PROCID`` (srun, several tasks), else ``NODE_RANK * devices_per_node + LOCAL_RANK``
    (Lightning's own launcher, on each node; ``devices_per_node`` matters only with ``NODE_RANK``).
    """
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", env.get("GROUP_RANK", "0"))) * devices_per_node + int(env.get("LOCAL_RANK", "0"))


LOCK_NAME = "run.lock"
RUN_OUTPUTS = ("checkpoints", "logs", "islands", "results.json", "flags.cfg")  # what a training writes in its folder


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run_dir>/run.lock`` (an exclusive ``flock``) while a run writes the folder; rank 0 only under DDP.

    A second process is refused with a :class:`SettingError` naming the holder's pid and host. The
    kernel drops the lock when its holder dies, however it dies, so a lock file left by a killed run
    never blocks the next one (its text is only a note of who held it last).
    """
    if rank_zero_only.rank != 0:  # the other ranks write no checkpoints; rank 0 holds the folder for them
        yield
        return
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise SettingError("output_dir", run_dir, f"{run_dir} is in use by {holder} ({path}); wait for that run "
                               f"to end, or choose another folder") from None
        with contextlib.suppress(OSError):  # only a note for the message above (a full disk is reported where it matters)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would let a waiting opener lock a ghost)


def claim_run_dir(run_dir: Path, resume_from: str | None, overwrite: bool, resume_hint: str) -> None:
    """Refuse to train into a folder holding another run's checkpoints (call it under :func:`run_folder_lock`).

    Allowed: an empty or new folder; ``resume_from`` = this folder's own ``checkpoints/last.ckpt`` (the
    same run, continued); ``overwrite``, which first deletes what the earlier training wrote there
    (:data:`RUN_OUTPUTS`). ``resume_hint`` is the command that would continue the earlier run.
    """
    if rank_zero_only.rank != 0:
        return
    last = run_dir / "checkpoints" / "last.ckpt"
    held = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    if not held:
        return
    if resume_from is not None and Path(resume_from).resolve() == last.resolve():
        return
    if overwrite:
        for name in RUN_OUTPUTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        log.warning("overwrite: removed the earlier run in %s (%s)", run_dir, ", ".join(held))
        return
    what = f"resuming training from {resume_from}" if resume_from else "a new training"
    continue_it = f"to continue that run: {resume_hint}; " if last.is_file() else ""
    raise SettingError("overwrite", overwrite, f"{run_dir} holds the checkpoints of an earlier run "
                       f"({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}), and {what} would overwrite them; "
                       f"{continue_it}to start again there, set it; or choose another output_dir")


class DivergedError(RuntimeError):
    """A training whose loss (or monitored validation loss, or weights) turned NaN or infinite."""


class StopOnNonFinite(pl.Callback):
    """Stop at the first non-finite training loss or monitored validation loss, before a checkpoint can hold it.

    Lightning's ``EarlyStopping(check_finite=True)`` stops too, but gracefully: the checkpoint callbacks
    (which run after every other callback) would still write the NaN weights as ``last.ckpt``. Raising
    :class:`DivergedError` here, before them, leaves ``last.ckpt`` and ``best-*`` at the last finite
    state. Under DDP every rank raises together (one rank's NaN reaches all by the gradient all-reduce,
    and the decision is reduced across ranks besides).
    """

    def __init__(self, monitor: str | None):
        self.monitor = monitor

    def _stop(self, trainer: pl.Trainer, bad: bool, what) -> None:
        """Raise if ``bad`` (on any rank); ``what()`` words it, only then (no host sync on the hot path)."""
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise DivergedError(f"{what()} at epoch {trainer.current_epoch}, step {trainer.global_step}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            finite = bool(torch.isfinite(loss.detach()).all())
            self._stop(trainer, not finite, lambda: f"the training loss is {loss.detach().float().mean().item()}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        if isinstance(value, torch.Tensor):
            self._stop(trainer, not bool(torch.isfinite(value).all()), lambda: f"{self.monitor} is {value.item()}")
        if not trainer.sanity_checking:
            self._check_weights(trainer, pl_module)  # before best-* (saved at validation end) ...

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_weights(trainer, pl_module)  # ... and before last.ckpt and epoch-<N>.ckpt

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        self._stop(trainer, not finite, lambda: "the weights hold NaN or inf")


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, less its read of the epoch's metrics at a training epoch's end under DDP.

    There it computes every epoch-level metric on rank 0 alone (the other ranks' bars are off), before
    the LightningModule's epoch-end hook: a metric reduced over the processes (``train/loss``,
    ``train/accuracy``) then starts a collective on rank 0 that the others pair with another one, and
    the run hangs or mixes values. Without that read, every process computes them at the same point.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1:
            super().on_train_epoch_end(trainer, pl_module)
        elif self._leave:
            self.train_progress_bar.close()


def make_logger(kind: str, run_dir: Path, exp_name: str):
    if kind == "none":
        return False
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs")  # logs/version_N: a resumed run adds, never overwrites
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise SettingError("logger", kind, "needs the wandb package: pip install wandb (or use csv)") from None
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(project="partwhole-agglomerator", name=exp_name, save_dir=str(run_dir))


def checkpoint_callbacks(folder: Path, monitor: str | None, monitor_mode: str = "min") -> list[ModelCheckpoint]:
    """``best-<epoch>.ckpt`` (the best ``monitor`` so far) and ``last.ckpt`` (the end of every epoch), in ``folder``.

    Two callbacks, one concern each: Lightning's ``save_last=True`` writes ``last.ckpt`` only in
    the steps where a top-k checkpoint is written, i.e. only when ``monitor`` improves, so a run
    whose validation loss stopped improving would resume (or be fine-tuned) from an old epoch.
    ``last`` is here a monitor-less top-1 checkpoint named ``last``, rewritten every epoch.
    """
    callbacks = [ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, monitor=None,
                                 enable_version_counter=False)]
    if monitor:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="best-{epoch:03d}", monitor=monitor, mode=monitor_mode,
                                         save_top_k=1, auto_insert_metric_name=False))
    return callbacks


class KeepCheckpointsAt(pl.Callback):
    """Keep ``epoch-<N>.ckpt`` in ``folder`` after each epoch ``N`` of ``epochs`` (1-based): one run, read at several budgets."""

    def __init__(self, folder: Path, epochs: Sequence[int]):
        self.folder, self.epochs = Path(folder), {int(e) for e in epochs}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch in self.epochs and not trainer.sanity_checking:
            trainer.save_checkpoint(self.folder / f"epoch-{epoch:03d}.ckpt")


def checkpoint_paths(trainer: pl.Trainer) -> tuple[str, str]:
    """``(best, last)`` checkpoint paths of a trainer built by :func:`build_trainer` (best = last without a monitor)."""
    last = best = ""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None:
            last = callback.best_model_path
        else:
            best = callback.best_model_path
    if best and not Path(best).is_file():
        # killed between the two callbacks' saves at an epoch's end: last.ckpt names the best file that the next save
        # replaced, and a resumed run that trains no further epoch still points there
        log.warning("the best checkpoint %s is gone (the run was killed while saving); using %s", best, last)
        best = ""
    return best or last, last


def ddp_strategy(timeout_s: float):
    """Lightning's DDP (gloo on CPU, NCCL on GPU) without ``find_unused_parameters``: the LightningModule
    freezes what its objective does not use, so every trainable parameter gets a gradient in every step
    (``bench/ddp_overhead.py`` measures what the unused-parameter search would cost). A collective that
    waits longer than ``timeout_s`` for a peer fails instead of hanging; a peer that died is noticed at once.
    """
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=timeout_s), find_unused_parameters=False)


def build_trainer(run_dir: Path, *, accelerator: str, devices: int, num_nodes: int, precision: str, max_epochs: int,
                  limit_train: float, limit_val: float, limit_test: float, logger: str, exp_name: str,
                  monitor: str | None = None, monitor_mode: str = "min", train: bool = True,
                  callbacks: Sequence[pl.Callback] = (), keep_checkpoints_at: Sequence[int] = (),
                  ddp_timeout: float = 600) -> pl.Trainer:
    """A Lightning Trainer writing logs and checkpoints (:func:`checkpoint_callbacks`) under ``run_dir``.

    Checkpoints are written atomically; a training run stopped by SIGTERM/SIGUSR1 saves
    ``checkpoints/last.ckpt`` first (:class:`PreemptionCheckpoint`). ``callbacks``: more callbacks
    (e.g. :class:`~partwhole.agglomerator.islands_callback.IslandsCallback`), run after ours; ``keep_checkpoints_at``:
    epochs after which ``checkpoints/epoch-<N>.ckpt`` is kept (:class:`KeepCheckpointsAt`).
    """
    extra_callbacks = list(callbacks)
    callbacks = []
    the_logger = make_logger(logger, run_dir, exp_name)
    if train:
        callbacks.append(StopOnNonFinite(monitor))  # first: before any callback that saves
        callbacks += checkpoint_callbacks(run_dir / "checkpoints", monitor, monitor_mode)
        callbacks.append(PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt"))
        if keep_checkpoints_at:
            callbacks.append(KeepCheckpointsAt(run_dir / "checkpoints", keep_checkpoints_at))
        if the_logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks += [*extra_callbacks, ProgressBar()]
    strategy = ddp_strategy(ddp_timeout) if devices * num_nodes > 1 else "auto"
    as_limit = lambda x: int(x) if x > 1 else float(x)  # noqa: E731  (Lightning: float = fraction, int = batches)
    return pl.Trainer(
        default_root_dir=str(run_dir),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        max_epochs=max_epochs,
        limit_train_batches=as_limit(limit_train),
        limit_val_batches=as_limit(limit_val),
        limit_test_batches=as_limit(limit_test),
        logger=the_logger,
        callbacks=callbacks,
        log_every_n_steps=10,
        enable_checkpointing=train,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
    )
