"""The toy pipeline that the demo (``src/demo.py``) and the toy study (``experiments/toy_study.py``) share.

It runs the project's own CLIs as steps of a longer job, each one a subprocess run exactly as a user
would run it: the toy data (``make_toy_dataset.py``), stage 2 with one of the stage-2 teachers
(``masks_to_embeds.py``) and the training steps (``main.py``). A training step whose ``results.json``
exists is reused and an unfinished one resumes from its ``last.ckpt``, so a killed demo or study,
rerun, picks up where it stopped. The toy set's sizes and folders are named here once, or where they
are defined (``partwhole.toy.dataset``, ``partwhole.common.image_folders``, ``config/config_TOY.cfg``).
It is not part of the library: only scripts import it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from partwhole.common.image_folders import EMBEDS_SUFFIX, MASKS_SUFFIX
from partwhole.embeds.encoder_weights import OFFLINE_TEACHER_PACKAGE
from partwhole.toy.dataset import TOY_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]  # the checkout (src/partwhole_cli/toy_pipeline.py): the demo and the study run in it
CLI_MODULES = {  # the console scripts (pyproject.toml) that steps run, each as ``python -m <module>`` (no PATH needed)
    "partwhole-toy": "partwhole_cli.make_toy", "partwhole-masks": "partwhole_cli.masks", "partwhole-embeds": "partwhole_cli.embeds",
    "partwhole-train": "partwhole_cli.train",
}
TOY_CONFIG = "config/config_TOY.cfg"  # every toy training step's --flagfile (relative to REPO, where steps run)
TEACHER_WEIGHTS = {  # stage-2 teacher -> (masks_to_embeds.py's weight flags, how a summary names those weights)
    "package": ([f"--encoder_checkpoint={OFFLINE_TEACHER_PACKAGE}"],
                f"PRETRAINED (ImageNet weights of the {OFFLINE_TEACHER_PACKAGE} package, offline)"),
    "random": (["--pretrained=False"], "RANDOM-INIT (the control: the teacher is a random network)"),
    "hub": (["--pretrained=True"], "PRETRAINED (timm's weights from the hub)"),
}
# The islands scores (islands_cli's scores.json) that the demo and the study tabulate, and their row labels.
ISLANDS_REFERENCES = (("stage1_masks", "stage-1 masks"), ("ground_truth", "GT parts / object / all objects"))


def toy_config_value(name: str) -> str:
    """The value that ``config/config_TOY.cfg`` gives ``--<name>`` (an error if it gives none)."""
    for line in (REPO / TOY_CONFIG).read_text().splitlines():
        if line.startswith(f"--{name}="):
            return line.split("=", 1)[1].strip()
    raise KeyError(f"{TOY_CONFIG} sets no --{name}")


def teacher_embeds_suffix(teacher: str, encoder: str) -> str:
    """Where a teacher's embeddings go, beside a split: ``_masks_embeds`` for the packaged weights, else
    ``_masks_embeds_<teacher>_<encoder>`` (e.g. ``_masks_embeds_random_tf_efficientnet_lite0``)."""
    return EMBEDS_SUFFIX if teacher == "package" else f"{EMBEDS_SUFFIX}_{teacher}_{encoder}"


def run_step(step: str, args: list[str], quiet: bool = False) -> subprocess.CompletedProcess:
    """Run the console script ``args[0]`` (a key of :data:`CLI_MODULES`) with ``args[1:]`` in the repository; print
    its last lines (no progress bars) and its time.

    Exits with a one-line error naming the step if it fails.
    """
    print(f"\n=== {step}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", CLI_MODULES[args[0]], *args[1:]], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip() and "%|" not in line][-4:]
    if not quiet or proc.returncode != 0:
        print("\n".join(tail), flush=True)
    print(f"--- {step}: {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        sys.exit(f"error: step '{step}' failed (exit {proc.returncode}); see the output above")
    return proc


def make_toy_data(step: str, out_dir: Path, train_per_class: int, val_per_class: int, seed: int | None = None,
                  quiet: bool = False) -> None:
    """The toy set in ``out_dir`` (images, ground truth, oracle stage-1 masks); the generator's seed 0 unless ``seed``."""
    run_step(step, ["partwhole-toy", f"--out_dir={out_dir}", *([f"--seed={seed}"] if seed is not None else []),
                    f"--train_per_class={train_per_class}", f"--val_per_class={val_per_class}"], quiet=quiet)


def embed_toy_images(step: str, images: Path, teacher: str, encoder: str, embeds_suffix: str, masks_suffix: str = MASKS_SUFFIX,
                     device: str = "cpu", quiet: bool = False, extra_flags: Sequence[str] = ()) -> None:
    """Stage 2 on a toy image folder: ``<images><masks_suffix>`` -> ``<images><embeds_suffix>``, float16 files.

    ``teacher`` is a key of :data:`TEACHER_WEIGHTS`; ``quiet`` also turns the progress bar off; ``extra_flags``
    (e.g. ``--crop``) go to ``masks_to_embeds.py`` last.
    """
    run_step(step, [
        "partwhole-embeds", f"--device={device}",
        f"--in_masks_path={images.with_name(images.name + masks_suffix)}", f"--in_images_path={images}",
        f"--out_data_path={images.with_name(images.name + embeds_suffix)}", f"--encoder_model_name={encoder}",
        *TEACHER_WEIGHTS[teacher][0], "--embed_dtype=float16", f"--img_height={TOY_IMAGE_SIZE}", f"--img_width={TOY_IMAGE_SIZE}",
        *(["--progress=False"] if quiet else []), *extra_flags], quiet=quiet)


def train_once(step: str, folder: Path, args: list[str], overwrite: bool = False, quiet: bool = False,
               done: Path | None = None) -> bool:
    """Run a ``src/main.py`` training step into ``folder`` unless an earlier run finished it.

    Finished means ``done`` exists (default ``folder/results.json``). An unfinished earlier attempt
    that saved ``checkpoints/last.ckpt`` is resumed from it (same epoch, step and optimizer state);
    one that saved nothing is started again. ``overwrite`` starts from scratch. Returns True if it ran.
    """
    done = done or folder / "results.json"
    if done.is_file() and not overwrite:
        print(f"\n=== {step}: done in an earlier run ({done}); --overwrite redoes it", flush=True)
        return False
    last = folder / "checkpoints" / "last.ckpt"
    if overwrite or not last.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        resume = []
    else:
        print(f"\n=== {step}: resuming the unfinished run from {last}", flush=True)
        resume = ["--resume_training", f"--load_checkpoint_dir={last}"]  # last flags win: over a fine-tune's pretrained weights
    run_step(step, ["partwhole-train", *args, f"--output_dir={folder}", *resume], quiet=quiet)
    return True
