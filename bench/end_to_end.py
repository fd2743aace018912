"""End-to-end wall time of stages 1-3 on generated images, each stage through its own CLI.

Generates the toy set (``src/make_toy_dataset.py``: 64 px images, 10 classes),
then runs, as a user would, one process per step:
stage 1 ``patched_masks.py`` (SAM, random weights unless ``--sam_checkpoint``)
on train and val, stage 2 ``masks_to_embeds.py`` (random-init encoder unless
``--pretrained``) on both, and stage 3 ``main.py`` (``config_TOY.cfg``,
``sam_distill`` pretraining for ``--epochs``). Reports each stage's wall time
(process starts and model builds included) and images/s; there is no
baseline: the reference pipeline does not run on today's stack.

    python bench/end_to_end.py --device cuda --sam_model_type vit_h           # 400 images
    python bench/end_to_end.py --device cpu --sam_model_type vit_tiny --encoder test_convnext \\
        --train_per_class 2 --val_per_class 1                                   # seconds
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

from suite_table import save_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sam_model_type", default="vit_h")
    parser.add_argument("--sam_checkpoint", default="none", help="SAM weights (default none: random, times the same)")
    parser.add_argument("--precision", default="bf16", help="stage 1 precision")
    parser.add_argument("--attention", default="sdpa", help="stage 1 image-encoder attention")
    parser.add_argument("--stage1_batch", type=int, default=16, help="stage 1 images per encoder forward")
    parser.add_argument("--encoder", default="maxvit_rmlp_pico_rw_256", help="stage 2 timm model")
    parser.add_argument("--pretrained", action="store_true", help="stage 2: download the encoder's weights")
    parser.add_argument("--train_per_class", type=int, default=30)
    parser.add_argument("--val_per_class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1, help="stage 3 pretraining epochs")
    parser.add_argument("--num_workers", type=int, default=4, help="stage 3 data-loader workers")
    parser.add_argument("--work_dir", default=None, help="where the data and runs go (default: a temporary folder)")
    parser.add_argument("--summary_json", default=None, help="append the figures as JSON lines here (bench/suite_table.py)")
    return parser.parse_args(argv)


def run_step(name: str, args: list[str]) -> tuple[float, float | None]:
    """Run one CLI of the project: its wall seconds, and the seconds its own summary line reports
    (``<stage>: N written, ... in T s``; None if it has none). A failure stops the benchmark with its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    print(f"--- {name}: {seconds:.1f} s (exit {proc.returncode})\n" + "\n".join(lines[-3:]), flush=True)
    if proc.returncode != 0:
        sys.exit(f"error: step '{name}' failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))
    own = [float(m.group(1)) for line in lines if (m := re.search(r" written, .* in ([0-9.]+) s \(", line))]
    return seconds, (own[-1] if own else None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = {"train": 10 * args.train_per_class, "val": 10 * args.val_per_class}
    n_images = sum(counts.values())
    what = {
        "data": f"generate {n_images} toy images (64 px)",
        "stage1": f"stage 1: SAM {args.sam_model_type} masks ({args.precision}, {args.attention}), {n_images} images x 64 points",
        "stage2": f"stage 2: {args.encoder} embeddings, {n_images} x 64 x 3 masked images",
        "stage3": f"stage 3: config_TOY sam_distill pretraining, {args.epochs} epoch(s) on {counts['train']} images + val",
    }
    total = 0.0
    print(f"end to end on {args.device}, {n_images} images", flush=True)

    def record(key: str, runs: list[tuple[float, float | None]]) -> None:
        """Print and save one stage's figure at once (a later stage that fails keeps it)."""
        nonlocal total
        seconds = sum(wall for wall, _ in runs)
        total += seconds
        note = "wall time, process start and model build included"
        if key in ("stage1", "stage2"):
            note = f"{n_images / seconds:.1f} images/s; " + note
            if all(own is not None for _, own in runs):
                loop = sum(own for _, own in runs)
                note += f"; the stage's own loop {loop:.1f} s ({n_images / loop:.1f} images/s)"
        print(f"=== {what[key]}: {seconds:.1f} s; {note}", flush=True)
        save_rows(args.summary_json, [dict(key=key, name=f"end to end, {what[key]}", value=seconds, unit="s", note=note)])

    with tempfile.TemporaryDirectory(prefix="end_to_end_") as tmp:
        work = Path(args.work_dir or tmp)
        data = work / "data"
        toy = data / "toy"
        record("data", [run_step("generate the toy set", [
            SRC / "make_toy_dataset.py", f"--out_dir={toy}", f"--train_per_class={args.train_per_class}",
            f"--val_per_class={args.val_per_class}", "--image_size=64", "--patch_size=8"])])
        record("stage1", [run_step(f"stage 1 on {split}", [
            SRC / "hierarchical_masks" / "patched_masks.py", f"--device={args.device}", f"--in_data_path={toy / split}",
            f"--out_data_path={toy / (split + '_masks_sam')}", f"--sam_model_type={args.sam_model_type}",
            f"--sam_checkpoint={args.sam_checkpoint}", "--img_size=64", "--patch_size=8", f"--precision={args.precision}",
            f"--attention={args.attention}", f"--batch_size={args.stage1_batch}"]) for split in counts])
        record("stage2", [run_step(f"stage 2 on {split}", [
            SRC / "hierarchical_masks" / "masks_to_embeds.py", f"--device={args.device}",
            f"--in_masks_path={toy / (split + '_masks_sam')}", f"--in_images_path={toy / split}",
            f"--out_data_path={toy / (split + '_masks_embeds')}", f"--encoder_model_name={args.encoder}",
            f"--pretrained={args.pretrained}", "--img_height=64", "--img_width=64"]) for split in counts])

        from partwhole.common.mask_io import load_embeddings

        dim = load_embeddings(next((toy / "train_masks_embeds").rglob("*.pkl"))).shape[-1]  # the teacher's D
        record("stage3", [run_step("stage 3 (sam_distill pretraining)", [
            SRC / "main.py", "--flagfile=config/config_TOY.cfg", f"--data_dir={data}", f"--max_epochs={args.epochs}",
            "--levels_encoder", f"--levels_encoder_dim={dim}", f"--num_workers={args.num_workers}",
            f"--num_gpus={1 if args.device.startswith('cuda') else 0}", "--logger=none", f"--output_dir={work / 'run'}"])])

    print(f"=== total: {total:.1f} s")
    save_rows(args.summary_json, [dict(key="total", name=f"end to end, stages 1-3 and data, {n_images} images", value=total,
                                       unit="s", note="wall time of the CLIs run one after another")])


if __name__ == "__main__":
    main()
