"""The whole method on the embedded toy dataset, on a laptop CPU, with no download.

    pipenv run demo            # = python src/demo.py

generate toy data -> stage-1 masks (oracle masks, or SAM with --sam_checkpoint) ->
stage-2 embeddings (a small timm backbone) -> sam_distill pretraining -> supcon
pretraining (the paper's baseline) -> fine-tune a classifier on each, and on a
random-init backbone -> test -> islands figures and scores. Ends with a table
(also written to <out_dir>/summary.md). Every step is one of the project's own
CLIs, run as a subprocess, so the demo runs exactly what a user would.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

SRC = Path(__file__).resolve().parent
REPO = SRC.parent
FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "runs/demo", "Where runs, figures and summary.md go.")
flags.DEFINE_string("data_dir", "datasets", "The toy set is written to <data_dir>/toy.")
flags.DEFINE_integer("train_per_class", 100, "Toy training images per class.")
flags.DEFINE_integer("val_per_class", 30, "Toy validation (= test) images per class.")
flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of each pretraining.")
flags.DEFINE_integer("finetune_epochs", 8, "Epochs of each classifier fine-tuning.")
flags.DEFINE_string("encoder", "test_convnext.r160_in1k", "timm backbone of stage 2 (its features are the teacher's D).")
flags.DEFINE_enum("pretrained_encoder", "auto", ["auto", "yes", "no"],
                  "Stage-2 weights: yes (download), no (random init), auto (download when the hub is reachable).")
flags.DEFINE_string("sam_checkpoint", "", "Run stage 1 with this SAM checkpoint instead of the oracle masks.")
flags.DEFINE_string("sam_model_type", "vit_b", "SAM model type of --sam_checkpoint.")
flags.DEFINE_string("device", "cpu", "Device for stages 1 and 2.")
flags.DEFINE_string("readme_figure", "", "Also copy the sam_distill islands figure here (e.g. img/demo_islands.png).")
flags.DEFINE_list("extra_main_flags", [], "Extra flags for every src/main.py call (e.g. --limit_train=2 for a smoke test).")
flags.DEFINE_bool("overwrite", False, "Redo training steps whose results.json already exists (default: reuse them).")


def run(step: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run one CLI, streaming its output; stop the demo with its error if it fails."""
    print(f"\n=== {step}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip() and "%|" not in line][-4:]  # no progress bars
    print("\n".join(tail), flush=True)
    print(f"--- {step}: {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        sys.exit(f"error: demo step '{step}' failed (exit {proc.returncode}); see the output above")
    return proc


def train_once(step: str, folder: Path, args: list[str]) -> None:
    """Run a src/main.py training step unless an earlier demo run finished it (its results.json exists)."""
    if (folder / "results.json").is_file() and not FLAGS.overwrite:
        print(f"\n=== {step}: done in an earlier run ({folder}/results.json); --overwrite redoes it", flush=True)
        return
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished earlier attempt
    run(step, ["src/main.py", *args, f"--output_dir={folder}"])


def hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        with socket.create_connection((host, 443), timeout=3):
            return True
    except OSError:
        return False


def main(argv) -> None:
    del argv
    start = time.perf_counter()
    out = Path(FLAGS.out_dir)
    toy = Path(FLAGS.data_dir) / "toy"
    config = ["--flagfile=config/config_TOY.cfg", f"--data_dir={FLAGS.data_dir}", *FLAGS.extra_main_flags]

    run("generate the toy dataset", [str(SRC / "make_toy_dataset.py"), f"--out_dir={toy}",
                                     f"--train_per_class={FLAGS.train_per_class}", f"--val_per_class={FLAGS.val_per_class}"])
    masks_suffix = "_masks"
    if FLAGS.sam_checkpoint:
        masks_suffix = "_masks_sam"
        for split in ("train", "val"):
            run(f"stage 1 (SAM {FLAGS.sam_model_type}) on {split}", [
                str(SRC / "hierarchical_masks" / "patched_masks.py"), f"--device={FLAGS.device}", f"--split={split}",
                f"--in_data_path={toy / split}", f"--out_data_path={toy / (split + masks_suffix)}",
                f"--sam_checkpoint={FLAGS.sam_checkpoint}", f"--sam_model_type={FLAGS.sam_model_type}",
                "--img_size=64", "--patch_size=8"])
        mask_note = f"SAM {FLAGS.sam_model_type} masks ({FLAGS.sam_checkpoint})"
    else:
        mask_note = "oracle masks (toy ground truth in the stage-1 format; pass --sam_checkpoint to run SAM)"

    pretrained = FLAGS.pretrained_encoder == "yes" or (FLAGS.pretrained_encoder == "auto" and hub_reachable())
    weights_note = "pretrained" if pretrained else "RANDOM-INIT (no hub reachable: the teacher is a random network)"
    print(f"\nstage-2 encoder {FLAGS.encoder}: {weights_note}", flush=True)
    for split in ("train", "val"):
        run(f"stage 2 embeddings on {split}", [
            str(SRC / "hierarchical_masks" / "masks_to_embeds.py"), f"--device={FLAGS.device}",
            f"--in_masks_path={toy / (split + masks_suffix)}", f"--in_images_path={toy / split}",
            f"--out_data_path={toy / (split + '_masks_embeds')}", f"--encoder_model_name={FLAGS.encoder}",
            f"--pretrained={pretrained}", "--img_height=64", "--img_width=64"])

    runs = {}
    for objective in ("sam_distill", "supcon"):
        train_once(f"pretrain ({objective})", out / objective,
                   [*config, f"--pretrain_objective={objective}", f"--max_epochs={FLAGS.pretrain_epochs}"])
        runs[objective] = out / objective / "checkpoints" / "last.ckpt"
    accuracy = {}
    for name, checkpoint in (("sam_distill", runs["sam_distill"]), ("supcon", runs["supcon"]), ("random init", None)):
        folder = out / f"finetune_{name.replace(' ', '_')}"
        resume = ["--resume_training", f"--load_checkpoint_dir={checkpoint}"] if checkpoint else []
        train_once(f"fine-tune on {name}", folder, [*config, "--supervise", *resume, f"--max_epochs={FLAGS.finetune_epochs}"])
        accuracy[name] = json.loads((folder / "results.json").read_text())["test"].get("test/accuracy", float("nan"))

    scores = {}
    for name, checkpoint in (("sam_distill", runs["sam_distill"]), ("supcon", runs["supcon"])):
        folder = out / f"islands_{name}"
        run(f"islands of {name}", ["src/main.py", *config, "--mode=islands", f"--load_checkpoint_dir={checkpoint}",
                                   "--islands_count=20", f"--output_dir={folder}"])
        scores[name] = json.loads((folder / "islands" / "scores.json").read_text())
    figure = sorted((out / "islands_sam_distill" / "islands").glob("*.png"))
    if FLAGS.readme_figure and figure:
        Path(FLAGS.readme_figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure[len(figure) // 2], FLAGS.readme_figure)

    lines = [f"Toy demo: {FLAGS.train_per_class * 10} train / {FLAGS.val_per_class * 10} test images, 10 classes; "
             f"stage 1: {mask_note}; stage 2: {FLAGS.encoder}, {weights_note}; sam_distill targets z-scored "
             f"per dimension (--teacher_norm=dataset, config/config_TOY.cfg).", "",
             "| backbone (frozen) | test accuracy |", "| --- | --- |"]
    lines += [f"| {name} | {100 * acc:.1f} % |" for name, acc in accuracy.items()]
    lines += ["", "| pretraining | against | " + " | ".join(f"L{i} pair_corr / ARI" for i in range(3)) + " |",
              "| --- | --- | --- | --- | --- |"]
    for name, result in scores.items():
        for key, label in (("stage1_masks", "stage-1 masks"), ("ground_truth", "GT parts / object / all objects")):
            if key in result:
                cells = [f"{result[key][str(i)]['pair_corr']:.2f} / {result[key][str(i)]['ari']:.2f}" for i in range(3)]
                lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Islands figures: {out}/islands_*/islands/*.png. Total time {time.perf_counter() - start:.0f} s."]
    summary = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)


if __name__ == "__main__":
    app.run(main)
