"""Training throughput of the Agglomerator: the config_IMAGENETTE.cfg step, or (``--toy``) whole toy pretrainings.

``--toy``: real ``src/main.py`` sam_distill pretrainings on the toy set (``datasets/toy``, made by
``pipenv run demo`` or ``experiments/toy_study.py``), one after the other in this run: the toy
recipe of commit dbf005d (fp32, levels encoder to the teacher's D = 1280, targets read from their
files every epoch) against ``config/config_TOY.cfg`` as it is now, and optional ``--extra`` recipes.
Each prints its training seconds per epoch (``trainer.fit``; also the whole command's wall time,
start-up and target fitting included), epochs per minute, the ratio to dbf005d's, and
``val/distill_r2`` / ``test/distill_r2`` after the same epochs (learning must not get worse).

    python bench/train_throughput.py --toy                         # 5 epochs each
    python bench/train_throughput.py --toy --epochs 10 --extra=--compile_column_nets

Measures samples/s of forward + sam_distill loss + backward for
* the baseline: the reference maths (``reference_agglomerator.py``: fp32, eager,
  einsum attention, ``b n l d`` layout with rearranges, grouped Conv1d), and
* ours: ``partwhole.agglomerator.model.Agglomerator`` in fp32 and in our default precision
  (``--precision auto``: bf16 autocast where the device computes bf16 natively),
  optionally ``torch.compile``-d,
on the same weights and inputs, in the same run, and prints the ratios.

    python bench/train_throughput.py                      # CPU, batch 16
    python bench/train_throughput.py --device cuda --batch_size 128 --compile
    python bench/train_throughput.py --tiny --iters 1 --compile --compile_backend eager   # seconds: a dry run

The step benchmark measures samples/s of forward + sam_distill loss + backward at the Imagenette size.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from reference_agglomerator import ReferenceAgglomerator, reference_levels_loss  # noqa: E402
from suite_table import save_rows  # noqa: E402

from partwhole.agglomerator.model import Agglomerator, AgglomeratorConfig  # noqa: E402
from partwhole.agglomerator.objectives import levels_distill_loss  # noqa: E402
from partwhole.common.runtime import bf16_native  # noqa: E402


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


REPO = Path(__file__).resolve().parents[1]
# The toy recipe of commit dbf005d, spelled out (config_TOY.cfg then had these values).
TOY_DBF005D = ["--precision=32", "--levels_encoder=True", "--levels_encoder_dim=1280", "--levels_encoder_norm=columns",
               "--target_dim=0", "--embeds_in_memory=False", "--scheduler=onecycle"]


def toy_run(name: str, flags: list[str], args, out: Path) -> dict:
    """One sam_distill pretraining through the CLI; its timing and R² (from results.json and the CSV log)."""
    run = out / name.replace(" ", "_")
    command = [sys.executable, str(REPO / "src" / "main.py"), "--flagfile=config/config_TOY.cfg", f"--data_dir={args.data_dir}",
               f"--max_epochs={args.epochs}", "--val_from_train=0.1", "--seed=0", "--logger=csv", *flags, f"--output_dir={run}"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"error: recipe '{name}' failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    results = json.loads((run / "results.json").read_text())
    rows = [r for log in sorted((run / "logs").glob("version_*/metrics.csv")) for r in csv.DictReader(open(log))]
    val_r2 = [float(r["val/distill_r2"]) for r in rows if r.get("val/distill_r2")]
    return {"name": name, "flags": " ".join(flags) or "(config_TOY.cfg as it is)", "seconds": results["seconds"], "wall": wall,
            "epochs": results["epochs"], "val_r2": val_r2[-1] if val_r2 else float("nan"),
            "test_r2": results["test"].get("test/distill_r2", float("nan"))}


def toy_main(args) -> None:
    recipes = [("dbf005d toy recipe", TOY_DBF005D), ("config_TOY.cfg now", [])]
    recipes += [(f"config_TOY.cfg now + {extra}", shlex.split(extra)) for extra in args.extra]
    print(f"toy sam_distill pretraining, {args.epochs} epochs each, one after the other on {torch.get_num_threads()} threads "
          f"(torch {torch.__version__}); baseline: the dbf005d toy recipe ({' '.join(TOY_DBF005D)})")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [toy_run(name, flags, args, Path(tmp)) for name, flags in recipes]
    base = rows[0]
    print(f"\n| recipe | s / epoch (training) | epochs / min | vs dbf005d | wall of the command | val distill_r2 | test distill_r2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        per_epoch = row["seconds"] / row["epochs"]
        ratio = (base["seconds"] / base["epochs"]) / per_epoch
        print(f"| {row['name']} | {per_epoch:.1f} | {60 / per_epoch:.2f} | {ratio:.2f}x | {row['wall']:.0f} s | "
              f"{row['val_r2']:.4f} | {row['test_r2']:.4f} |")
        save_rows(args.summary_json, [dict(key=f"toy_{rows.index(row)}", name=f"toy pretraining, {row['name']}", value=60 / per_epoch,
                                           unit="epochs/min", baseline="dbf005d toy recipe", baseline_value=60 * base["epochs"] / base["seconds"],
                                           note=f"{args.epochs} epochs; test distill_r2 {row['test_r2']:.4f}")])
    print("\nflags: " + "; ".join(f"{row['name']}: {row['flags']}" for row in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (eager: a quick dry run of the traced path)")
    parser.add_argument("--tiny", action="store_true", help="a 32 px, 16-dim model instead of config_IMAGENETTE's (dry runs)")
    parser.add_argument("--summary_json", default=None, help="append the figures as JSON lines here (bench/suite_table.py)")
    parser.add_argument("--toy", action="store_true", help="whole toy pretrainings: the dbf005d recipe vs config_TOY.cfg now")
    parser.add_argument("--epochs", type=int, default=5, help="--toy: epochs of each pretraining")
    parser.add_argument("--data_dir", default="datasets", help="--toy: the folder holding toy/ with its stage-2 embeddings")
    parser.add_argument("--extra", action="append", default=[], help="--toy: another recipe, config_TOY.cfg plus these flags")
    args = parser.parse_args()
    if args.toy:
        return toy_main(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = AgglomeratorConfig()  # config_IMAGENETTE.cfg: 224 px, 56x56 tokens, 14x14 columns, 3 levels of 256
    if args.tiny:
        config = AgglomeratorConfig(image_size=32, conv_image_size=8, patch_size=2, patch_dim=16, levels=3, iters=2)
    model_name = "tiny model (--tiny)" if args.tiny else "config_IMAGENETTE.cfg model"
    ours = Agglomerator(config).to(device)
    reference = ReferenceAgglomerator(config).to(device)
    reference.load_state_dict(ours.state_dict())
    images = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device)
    embeds = torch.randn(args.batch_size, config.num_patches, config.levels, ours.embed_dim, device=device)
    bf16 = bf16_native(device.type)

    def reference_step():
        reference.zero_grad(set_to_none=True)
        _, _, encoded = reference(images)
        reference_levels_loss(encoded, embeds).backward()

    def our_step(model, autocast: bool):
        def step():
            model.zero_grad(set_to_none=True)
            context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
            with context:
                out = model(images)
                loss = levels_distill_loss(out.encoded, embeds)
            loss.backward()
        return step

    rows = [("reference", "baseline: reference maths, fp32 eager", reference_step), ("fp32", "ours, fp32", our_step(ours, False))]
    default_name = f"ours, default precision ({'bf16-mixed' if bf16 else 'fp32'})"
    if bf16:
        rows.append(("default", default_name, our_step(ours, True)))
    if args.compile:
        compiled = torch.compile(ours, backend=args.compile_backend)
        backend = "" if args.compile_backend == "inductor" else f" (backend {args.compile_backend})"
        rows.append(("compile", f"ours, {'bf16-mixed' if bf16 else 'fp32'} + torch.compile{backend}", our_step(compiled, bf16)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size}; {model_name} "
          f"({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters); median of {args.iters} steps")
    baseline = None
    for key, label, step in rows:
        start = time.perf_counter()
        seconds = time_steps(step, device, args.warmup, args.iters)
        warm = time.perf_counter() - start - seconds * args.iters  # the warm-up steps (with the compile, if any)
        rate = args.batch_size / seconds
        baseline = baseline or rate
        print(f"{label:<48} {rate:8.1f} samples/s   {rate / baseline:5.2f}x baseline" + (f"   (warm-up {warm:.1f} s)" if key == "compile" else ""))
        if key != "reference":
            note = f"batch {args.batch_size}, median of {args.iters} steps" + (f"; warm-up (compile) {warm:.1f} s" if key == "compile" else "")
            save_rows(args.summary_json, [dict(key=key, name=f"stage 3 train step ({model_name}), {label}", value=rate,
                                               unit="samples/s", baseline="reference maths, fp32 eager", baseline_value=baseline,
                                               note=note)])  # at once: a timed-out compile keeps the other rows


if __name__ == "__main__":
    main()
