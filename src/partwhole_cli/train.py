"""Stage 3 CLI: pretrain, fine-tune, test, freeze and draw the Agglomerator.

    python src/main.py --flagfile config/config_IMAGENETTE.cfg                     # sam_distill pretraining
    python src/main.py --flagfile config/config_IMAGENETTE.cfg --supervise \\
        --resume_training --load_checkpoint_dir runs/.../checkpoints/last.ckpt      # fine-tune the classifier
    python src/main.py --flagfile ... --mode test|freeze|islands --load_checkpoint_dir CKPT

Thin wiring: flags -> plain configs -> ``agglomerator`` (model, data, Lightning module, engine).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from absl import flags

from partwhole_cli import (
    run_cli,
    train_flags,  # defines the flags
    user_error,
)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(train_flags)  # --help lists the stage-3 flags, not only --helpfull
log = logging.getLogger("main")
ISLANDS_SCORED_IMAGES = 4  # the first val (test) images, whose islands are scored against their stage-1 masks


# Config fields no flag sets, and why; every other field is set from the flags below, by name (tests/test_main.py
# checks both, and that every flag is read).
FIELDS_NOT_FROM_FLAGS = {
    "AgglomeratorConfig": {"contrastive_head": "the objective's (Objective.contrastive_head)",
                           "head_dropout": "the reference's value"},
    "DataConfig": {"val_fraction": "the reference's 10 % of train (torchvision datasets)"},
    "TrainingConfig": {},
}
UNUSED_FLAGS = {"lr_speed": "unused by the reference too; kept so its flagfiles parse"}
FLAG_OF = {  # settings whose flag has another name (the islands ones: partwhole.islands.checkpoint's)
    "objective": "pretrain_objective", "checkpoint": "load_checkpoint_dir", "split": "islands_split",
    "count": "islands_count", "images": "islands_images", "animate": "islands_animate", "html": "islands_html",
}


def objective_from_flags() -> str:
    return "classify" if FLAGS.supervise else FLAGS.pretrain_objective


def model_input_size() -> int:
    """The reference resizes smallNORB to --image_size (48) and crops 4*conv_image_size (32) px."""
    return FLAGS.conv_image_size * 4 if FLAGS.dataset == "smallNORB" else FLAGS.image_size


def floats(name: str) -> list[float]:
    """A list flag of numbers, or a one-line error naming it."""
    try:
        return [float(x) for x in getattr(FLAGS, name)]
    except ValueError:
        raise ValueError(f"--{name}={','.join(getattr(FLAGS, name))}: give comma-separated numbers") from None


def model_config():
    """The model's architecture (validated), field by field."""
    from partwhole.agglomerator.model import AgglomeratorConfig

    config = AgglomeratorConfig(
        image_size=model_input_size(), conv_image_size=FLAGS.conv_image_size, patch_size=FLAGS.patch_size,
        patch_dim=FLAGS.patch_dim, levels=FLAGS.levels, n_channels=FLAGS.n_channels, n_classes=FLAGS.n_classes,
        iters=FLAGS.iters, denoise_iter=FLAGS.denoise_iter, levels_encoder=FLAGS.levels_encoder,
        levels_encoder_dim=FLAGS.levels_encoder_dim, levels_encoder_norm=FLAGS.levels_encoder_norm,
        contr_dim=FLAGS.contr_dim, dropout=FLAGS.dropout,
    )
    config.validate()
    return config


def training_config(objective: str):
    """What the LightningModule trains and how, field by field; the teacher's settings only for an objective that
    reads its embeddings (``embed_dim``, the teacher's D, from the train split's first file when reduced)."""
    from partwhole.agglomerator.data import PartWholeDataModule
    from partwhole.agglomerator.lit_module import TrainingConfig
    from partwhole.agglomerator.objectives import objective_class

    teacher = objective_class(objective).needs_embeddings
    reduced = teacher and bool(FLAGS.target_dim)
    lion_betas, level_weights = floats("lion_betas"), floats("level_weights")
    return TrainingConfig(
        objective=objective, learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
        optimizer=FLAGS.optimizer, lion_betas=lion_betas, scheduler=FLAGS.scheduler, level_weights=level_weights,
        temperature=FLAGS.temperature, finetune_backbone=FLAGS.finetune_backbone,
        teacher_norm=FLAGS.teacher_norm if teacher else "none",
        embed_dim=PartWholeDataModule(data_config(objective)).teacher_dim() if reduced else None,
        target_dim=FLAGS.target_dim if reduced else None, distill_loss=FLAGS.distill_loss,
    )


def data_config(objective: str, val_masks: bool = True):
    """The data module's settings, field by field; with ``val_masks`` the first val (test) images carry their
    stage-1 masks, for the islands scores."""
    from partwhole.agglomerator.data import DataConfig

    return DataConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size, n_channels=FLAGS.n_channels,
        batch_size=FLAGS.batch_size, num_workers=FLAGS.num_workers, objective=objective, seed=FLAGS.seed,
        crop_size=model_input_size() if model_input_size() != FLAGS.image_size else None,
        embeds_suffix=FLAGS.embeds_suffix, val_from_train=FLAGS.val_from_train,
        val_masks_items=ISLANDS_SCORED_IMAGES if val_masks else 0, embeds_in_memory=FLAGS.embeds_in_memory,
        unlabelled_dir=FLAGS.unlabelled_dir,
    )


def module_from_flags(objective: str):
    from partwhole.agglomerator.lit_module import AgglomeratorLitModule

    model = model_config().to_dict()
    return AgglomeratorLitModule(model=model, training=training_config(objective))


def module_from_checkpoint(path: str, objective: str):
    """Our checkpoints rebuild from their own hyper-parameters; reference ones from the flags."""
    from partwhole.agglomerator.checkpoints import is_own_checkpoint, read_checkpoint
    from partwhole.agglomerator.lit_module import (
        AgglomeratorLitModule,
        load_backbone_weights,
    )

    checkpoint = read_checkpoint(path)
    if is_own_checkpoint(checkpoint):
        module = AgglomeratorLitModule(**checkpoint["hyper_parameters"])
        module.load_state_dict(checkpoint["state_dict"])
        return module
    module = module_from_flags(objective)
    load_backbone_weights(module, path)
    return module


def datamodule_for(module, objective: str, val_masks: bool = True):
    """The data module for ``objective``'s batches; with ``val_masks`` the first val batch carries stage-1 masks
    for the islands scores."""
    from partwhole.agglomerator.data import PartWholeDataModule

    model = module.model
    shape = (model.config.num_patches, model.config.levels, module.objective.teacher_dim or model.embed_dim)
    datamodule = PartWholeDataModule(data_config(objective, val_masks), expected_embed_shape=shape)
    datamodule.setup()
    return datamodule


def trainer_for(run_dir: Path, train: bool, monitor: str | None = None, monitor_mode: str = "min", islands: bool = True,
                one_process: bool = False):
    """The Trainer; ``islands`` adds the islands figures (``--plot_islands``, every ``--plot_every`` steps) and scores (:class:`IslandsCallback`);
    ``one_process``: one device whatever the flags ask (``--mode freeze`` writes what it predicts itself)."""
    from partwhole.agglomerator.engine import build_trainer
    from partwhole.agglomerator.islands_callback import IslandsCallback
    from partwhole.common.runtime import lightning_precision

    accelerator, devices = devices_from_flags()
    num_nodes = 1 if one_process else FLAGS.num_nodes
    devices = 1 if one_process else devices
    callbacks = [IslandsCallback(plot=FLAGS.plot_islands, plot_every=FLAGS.plot_every, out_dir=run_dir / "islands",
                                 max_scored_images=ISLANDS_SCORED_IMAGES)] if islands else []
    return build_trainer(
        run_dir, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        precision=lightning_precision(FLAGS.precision, accelerator), max_epochs=FLAGS.max_epochs,
        limit_train=FLAGS.limit_train, limit_val=FLAGS.limit_val, limit_test=FLAGS.limit_test,
        logger=FLAGS.logger, exp_name=FLAGS.exp_name, monitor=monitor, monitor_mode=monitor_mode, train=train,
        callbacks=callbacks, keep_checkpoints_at=epochs_list("keep_checkpoints_at"), ddp_timeout=FLAGS.ddp_timeout,
    )


@functools.cache
def devices_from_flags() -> tuple[str, int]:
    """``(accelerator, devices per node)`` from ``--num_gpus`` and ``--num_processes`` (warnings once)."""
    from partwhole.common.runtime import lightning_devices

    return lightning_devices(FLAGS.num_gpus, FLAGS.num_processes)


def set_rank_from_launcher() -> None:
    """Tell Lightning's rank-zero helpers this process's global rank before the Trainer does.

    The run folder's lock and claim (rank 0's) come before the Trainer; Lightning's guess at import reads
    ``LOCAL_RANK``, which is 0 on the first process of every node. ``NODE_RANK`` (multi-node by hand),
    ``RANK`` (torchrun) or ``SLURM_PROCID`` (srun) say more; Lightning sets the same value later.
    """
    from pytorch_lightning.utilities import rank_zero_only

    from partwhole.agglomerator.engine import launcher_rank

    if FLAGS.mode == "train" or FLAGS.mode == "test":
        if FLAGS.num_nodes > 1 and not FLAGS.output_dir:
            raise ValueError(f"--num_nodes={FLAGS.num_nodes} needs --output_dir: the same run folder, on a file system "
                             f"every node reaches (the nodes cannot agree on a new time-stamped one)")
        rank_zero_only.rank = launcher_rank(devices_from_flags()[1] if FLAGS.num_nodes > 1 else 0)


def epochs_list(name: str) -> list[int]:
    """A list flag of positive epoch numbers, or a one-line error naming it."""
    try:
        epochs = [int(x) for x in getattr(FLAGS, name)]
    except ValueError:
        epochs = [0]
    if any(e < 1 for e in epochs):
        raise ValueError(f"--{name}={','.join(getattr(FLAGS, name))}: give comma-separated epoch numbers (1 or more)")
    return epochs


def is_rank_zero() -> bool:
    """Several processes (DDP): whether this is the one that writes the run's files and prints its lines."""
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def end_quietly_unless_rank_zero() -> None:
    """Several processes, after a stop they all agreed on (a signal, a divergence): the others end with 0 and say
    nothing; rank 0 reports it and carries the exit code. (Lightning's launcher kills the whole run, rank 0
    included, as soon as one of the processes it started ends non-zero.)"""
    if not is_rank_zero():
        sys.exit(0)


def write_results(run_dir: Path, results: dict) -> None:
    """``<run>/results.json``: what a run measured, for scripts (the demo reads it); rank 0 only."""
    from partwhole.common.safe_files import atomic_write_json

    if is_rank_zero():
        atomic_write_json(run_dir / "results.json", results)  # strict JSON: a NaN metric is null


def write_flags(run_dir: Path) -> None:
    """Save the resolved flags as a flagfile: ``--flagfile <run>/flags.cfg`` reruns the same settings."""
    from partwhole.common.safe_files import atomic_write_bytes

    if not is_rank_zero():
        return
    lines = [f.serialize() for f in FLAGS.get_key_flags_for_module(train_flags)]
    atomic_write_bytes(run_dir / "flags.cfg", ("\n".join(line for line in lines if line) + "\n").encode())


def resume_command(run_dir: Path, checkpoint: Path) -> str:
    return f"python {sys.argv[0]} --flagfile {run_dir / 'flags.cfg'} --resume_training --load_checkpoint_dir {checkpoint}"


@contextlib.contextmanager
def stops_reported(trainer, run_dir: Path, finished: bool = False):
    """Turn a signal stop (Lightning's SIGTERMException, exit code 0) and a full disk into one line each.

    Stopped by SIGTERM/SIGUSR1: print where the checkpoint is and the command that resumes, and exit
    with ``128 + signal`` (never 0 before the last epoch). Disk full, quota or read-only folder while
    training: an ``OutputWriteError`` naming the folder and the space needed, plus the resume command
    (the previous ``last.ckpt`` is whole: checkpoints are written atomically).
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from partwhole.agglomerator.preemption import find_preemption_checkpoint
    from partwhole.common.errors import OutputWriteError
    from partwhole.common.safe_files import DISK_ERRNOS, describe_write_error

    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        yield
    except SIGTERMException:
        end_quietly_unless_rank_zero()
        callback = find_preemption_checkpoint(trainer)
        name = (callback.signal_name if callback else None) or "SIGTERM"
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if finished:
            line = f"train: stopped by {name} after training finished (checkpoints in {last.parent}), during the test; " \
                   f"run --mode test --load_checkpoint_dir <checkpoint> for it"
        elif callback is not None and callback.saved_path is not None:
            line = f"train: stopped by {name} at {where}; saved {callback.saved_path}; resume with: {resume_command(run_dir, callback.saved_path)}"
        elif last.is_file():
            line = f"train: stopped by {name} at {where}; nothing new to save; resume with: {resume_command(run_dir, last)}"
        else:
            line = f"train: stopped by {name} before the first step; nothing to resume: rerun the same command"
        print(line, file=sys.stderr, flush=True)
        sys.exit(128 + getattr(signal, name, signal.SIGTERM))
    except OSError as exc:  # a logger's file (metrics.csv, ...): Lightning writes those itself
        if exc.errno not in DISK_ERRNOS:
            raise
        hint = f"; then resume with: {resume_command(run_dir, last)}" if last.is_file() and not finished else ""
        raise OutputWriteError(describe_write_error(exc, exc.filename or run_dir / "?") + hint) from None
    except OutputWriteError as exc:  # a checkpoint (or another file of ours)
        hint = f"; then resume with: {resume_command(run_dir, last)}" if last.is_file() and not finished else ""
        raise OutputWriteError(f"{exc}{hint}", size=exc.size) from None


DIVERGED_EXIT_CODE = 3  # not 0 (done), 1 (bad input) nor 128 + signal (stopped, requeue): a scheduler should not retry


def diverged_message(what: str, run_dir: Path) -> str:
    """The one line for a training stopped by :class:`~partwhole.agglomerator.engine.StopOnNonFinite`."""
    last = run_dir / "checkpoints" / "last.ckpt"
    kept = (f"{last} is the last finite state; resume from it with other settings: {resume_command(run_dir, last)} ..."
            if last.is_file() else "no checkpoint was written")
    tries = [f"a lower --learning_rate (now {FLAGS.learning_rate:g})"]
    if FLAGS.precision != "32":
        tries.append("--precision=32")
    from partwhole.agglomerator.objectives import objective_class

    if objective_class(objective_from_flags()).needs_embeddings and FLAGS.teacher_norm == "none" and not FLAGS.target_dim:
        tries.append("--teacher_norm=dataset (z-scored targets)")
    return f"training diverged: {what}; try {', or '.join(tries)}; {kept}"


def run_train() -> None:
    from partwhole.agglomerator.checkpoints import is_own_checkpoint, read_checkpoint
    from partwhole.agglomerator.engine import claim_run_dir, run_folder_lock
    from partwhole.agglomerator.lit_module import load_backbone_weights
    from partwhole.agglomerator.objectives import objective_class
    from partwhole.common.runtime import make_run_dir

    objective = objective_from_flags()
    module = module_from_flags(objective)
    resume_path = checkpoint = None
    if FLAGS.resume_training:
        checkpoint = read_checkpoint(FLAGS.load_checkpoint_dir)
        same_run = is_own_checkpoint(checkpoint) and checkpoint["hyper_parameters"]["objective"] == objective
        if same_run:
            resume_path = FLAGS.load_checkpoint_dir  # continue: same epoch, step, optimizer state
            print(f"resuming {objective} from {resume_path} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('global_step')})")
        else:
            load_backbone_weights(module, FLAGS.load_checkpoint_dir)
            print(f"loaded backbone weights from {FLAGS.load_checkpoint_dir} for {objective}")
    elif objective_class(objective).fine_tunes:
        log.warning("--supervise without --resume_training: fine-tuning a randomly initialised backbone (a baseline)")
    run_dir = make_run_dir(FLAGS.output_dir, FLAGS.exp_name, objective, resume_path)
    with run_folder_lock(run_dir):  # one run per folder; a second process is refused, naming the holder
        claim_run_dir(run_dir, resume_path, FLAGS.overwrite, resume_command(run_dir, run_dir / "checkpoints" / "last.ckpt"))
        train_in(run_dir, module, resume_path, checkpoint)


def train_in(run_dir: Path, module, resume_path: str | None, checkpoint: dict | None) -> None:
    """Train ``module`` in ``run_dir`` (held by this process), test its best checkpoint, write ``results.json``."""
    from partwhole.agglomerator.engine import DivergedError, checkpoint_paths

    objective = module.objective.name
    datamodule = datamodule_for(module, objective)
    write_flags(run_dir)
    if FLAGS.compile:
        module.model.compile()  # in place: parameter names (and so checkpoints) stay the same
    elif FLAGS.compile_column_nets:
        module.model.compile_column_nets()
    note = module.objective.prepare_training(module, datamodule, checkpoint["state_dict"] if resume_path else None,
                                             precompute=FLAGS.embeds_in_memory)
    if note:
        print(note)
    monitor, mode = module.objective.monitor
    trainer = trainer_for(run_dir, train=True, monitor=monitor, monitor_mode=mode)
    start = time.perf_counter()
    with stops_reported(trainer, run_dir):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
        except DivergedError as exc:
            end_quietly_unless_rank_zero()
            raise DivergedError(diverged_message(str(exc), run_dir)) from None
    seconds = time.perf_counter() - start
    best, last = checkpoint_paths(trainer)
    with stops_reported(trainer, run_dir, finished=True):
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=True) if best else []
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in (results[0] if results else {}).items())
    write_results(run_dir, {"objective": objective, "epochs": trainer.current_epoch, "steps": trainer.global_step,
                            "seconds": seconds, "processes": trainer.world_size, "best": best, "last": last,
                            "test": results[0] if results else {}})
    if is_rank_zero():
        print(f"train ({objective}): {trainer.current_epoch} epochs, {trainer.global_step} steps in {seconds:.1f} s; "
              f"run {run_dir}; best {best}; last {last}" + (f"; test {metrics}" if metrics else ""))


def run_test() -> None:
    from partwhole.common.runtime import make_run_dir

    module = module_from_checkpoint(FLAGS.load_checkpoint_dir, objective_from_flags())
    datamodule = datamodule_for(module, module.objective.name)
    run_dir = make_run_dir(FLAGS.output_dir, FLAGS.exp_name, "test")
    trainer = trainer_for(run_dir, train=False)
    results = trainer.test(module, datamodule=datamodule, verbose=True)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in results[0].items())
    write_results(run_dir, {"objective": module.objective.name, "checkpoint": FLAGS.load_checkpoint_dir,
                            "processes": trainer.world_size, "test": results[0]})
    if is_rank_zero():
        print(f"test ({module.objective.name}) of {FLAGS.load_checkpoint_dir}: {metrics}")


def run_freeze() -> None:
    from partwhole.common.runtime import make_run_dir
    from partwhole.common.safe_files import atomic_write_bytes

    module = module_from_checkpoint(FLAGS.load_checkpoint_dir, objective_from_flags())
    datamodule = datamodule_for(module, "classify", val_masks=False)  # eval transforms, no teacher embeddings needed
    run_dir = make_run_dir(FLAGS.output_dir, FLAGS.exp_name, "freeze")
    trainer = trainer_for(run_dir, train=False, islands=False, one_process=True)
    for split in ("train", "val", "test"):
        batches = trainer.predict(module, dataloaders=datamodule.eval_loader(split))
        features = np.concatenate([b["features"].numpy() for b in batches])
        labels = np.concatenate([b["labels"].numpy() for b in batches])
        for name, array in ((f"features_{split}.npy", features), (f"labels_{split}.npy", labels)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            atomic_write_bytes(run_dir / name, buffer.getvalue())
        print(f"freeze: {split} features {features.shape} labels {labels.shape} -> {run_dir}")


def run_islands() -> None:
    from partwhole.common.runtime import make_run_dir
    from partwhole.islands.checkpoint import draw_islands_for_checkpoint, pick_images

    module = module_from_checkpoint(FLAGS.load_checkpoint_dir, objective_from_flags())
    records = pick_images(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=FLAGS.islands_split,
                          count=FLAGS.islands_count, images=FLAGS.islands_images, html=FLAGS.islands_html)
    run_dir = make_run_dir(FLAGS.output_dir, FLAGS.exp_name, "islands")
    drawn = draw_islands_for_checkpoint(
        module, records, run_dir, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, split=FLAGS.islands_split,
        given=bool(FLAGS.islands_images), embeds_suffix=FLAGS.embeds_suffix, animate=FLAGS.islands_animate,
        html=FLAGS.islands_html, checkpoint=FLAGS.load_checkpoint_dir)
    print("\n".join(drawn.summary))


def one_line(exc: BaseException) -> str:
    """The last non-empty line of an error (DataLoader workers wrap ours in a traceback), a setting's named by its
    flag."""
    lines = [line.strip() for line in user_error(exc, FLAG_OF).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of a DDP run died or hung."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or "/gloo/" in text or "NCCL" in text


def peer_failure_message(exc: BaseException) -> str:
    from partwhole.common.runtime import RUN_DIR_ENV

    run = os.environ.get(RUN_DIR_ENV)  # this run's folder (make_run_dir sets it)
    last = Path(run) / "checkpoints" / "last.ckpt" if run else None
    kept = f"; resume from its last checkpoint: {resume_command(last.parent.parent, last)}" if last and last.is_file() else ""
    return (f"another process of this run died or stopped answering, so this one stopped too (it saw: "
            f"{one_line(exc)[:200]}){kept}")


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags take the form --name=value")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # tiny CPU runs set num_workers=0
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from partwhole.agglomerator.engine import DivergedError
    from partwhole.common.errors import InputError
    from partwhole.common.safe_files import DISK_ERRNOS, describe_write_error

    pl.seed_everything(FLAGS.seed, workers=True)
    try:
        set_rank_from_launcher()
        {"train": run_train, "test": run_test, "freeze": run_freeze, "islands": run_islands}[FLAGS.mode]()
    except (InputError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("PARTWHOLE_DEBUG"):
            raise
        sys.exit(f"error: {one_line(exc)}")
    except DivergedError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(DIVERGED_EXIT_CODE)
    except RuntimeError as exc:
        if not peer_failure(exc) or os.environ.get("PARTWHOLE_DEBUG"):
            raise
        sys.exit(f"error: {peer_failure_message(exc)}")
    except SIGTERMException:  # --mode test/freeze/islands (training reports its own stop): Lightning would exit 0
        print("stopped by SIGTERM before the end; nothing is half-written: rerun the same command", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)
    except OSError as exc:  # disk full, quota, read-only folder: where Lightning or we write outside atomic_write_bytes
        if exc.errno not in DISK_ERRNOS or os.environ.get("PARTWHOLE_DEBUG"):
            raise
        sys.exit(f"error: {describe_write_error(exc, exc.filename or FLAGS.output_dir or '.')}")


def cli() -> None:
    """Console script ``partwhole-train``."""
    run_cli(main, __doc__, sys.modules[__name__], train_flags)


if __name__ == "__main__":
    cli()
