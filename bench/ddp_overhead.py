"""What the several-process path costs: stage 3 on 2 CPU processes (DDP over gloo) against 1, same run.

The same sam_distill pretraining (``config/config_TOY.cfg``'s model and recipe, 64 px images, 8 x 8
columns) on a generated image folder with random teacher embeddings (D = 128), run three ways, one
after the other in this run:

* 1 process at batch B (the baseline);
* 2 processes at batch B/2 each (the same optimizer steps: what ``--num_processes=2`` does);
* the same 2 processes the other way: every head trainable, as before, and DDP's
  ``find_unused_parameters=True``, which walks the autograd graph after every forward to find the
  parameters that will get no gradient (what freezing the unused heads spares).

Each prints the training seconds (``trainer.fit``, from ``results.json``), the wall time of the
command, seconds per optimizer step, the ratio to the baseline and the final ``val/loss``, with
this machine's core count. On a 2-core CPU nobody expects a speed-up: two processes share the
cores the one had (each gets half the threads); the ratio shows the path's overhead.

    python bench/ddp_overhead.py                  # 3 epochs of 400 images, batch 64
    python bench/ddp_overhead.py --epochs 5 --images 800
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from partwhole.common.mask_io import save_embeddings  # noqa: E402

# The alternative to freezing: every head trainable, as before, and DDP's find_unused_parameters=True. A launcher
# that imports main.py, changes both, then runs it: Lightning's DDP launcher re-runs this same file (sys.argv[0])
# for the second process, so both processes get the change.
FIND_UNUSED_LAUNCHER = """import sys
from datetime import timedelta

from absl import app
from pytorch_lightning.strategies import DDPStrategy

import partwhole.agglomerator.engine as engine
import partwhole.agglomerator.lit_module as lit_module
import partwhole_cli.train as main

engine.ddp_strategy = lambda timeout_s: DDPStrategy(timeout=timedelta(seconds=timeout_s), find_unused_parameters=True)
lit_module.frozen_heads = lambda name: ()  # no other objective's head frozen
app.run(main.main)
"""


def make_folder(root: Path, images: int, dim: int = 128, seed: int = 0) -> Path:
    """``root/imagenette2/{train,val}/<class>/*.JPEG`` with random ``(64, 3, dim)`` embeddings beside them."""
    rng = np.random.default_rng(seed)
    base = root / "imagenette2"
    for split, count in (("train", images), ("val", max(images // 4, 8))):
        for label in range(2):
            for i in range(count // 2):
                path = base / split / f"class{label}" / f"img{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((rng.random((64, 64, 3)) * 120 + 100 * label).astype("uint8")).save(path)
                save_embeddings(base / f"{split}_masks_embeds" / f"class{label}" / f"img{i}.pkl",
                                rng.standard_normal((64, 3, dim)).astype("float32"))
    return base


def run(name: str, command: list[str], out: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(command + [f"--output_dir={out}"], capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"name": name, "seconds": results["seconds"], "wall": wall, "steps": results["steps"],
            "processes": results["processes"], "val_loss": val_loss(out)}


def val_loss(run_dir: Path) -> float:
    import csv

    rows = [r for f in run_dir.glob("logs/version_*/metrics.csv") for r in csv.DictReader(f.open())]
    return float([r["val/loss"] for r in rows if r.get("val/loss")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=400, help="train images (two classes)")
    parser.add_argument("--batch_size", type=int, default=64, help="B: one process's batch; two processes take B/2 each")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(REPO / "src")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "data", args.images)
        launcher = tmp / "find_unused_main.py"
        launcher.write_text(FIND_UNUSED_LAUNCHER.format())
        common = ["--flagfile=config/config_TOY.cfg", "--dataset=IMAGENETTE", f"--data_dir={tmp / 'data'}", "--n_classes=2",
                  f"--max_epochs={args.epochs}", "--num_gpus=0", "--logger=csv", "--scheduler=constant"]
        half = [f"--batch_size={args.batch_size // 2}", "--num_processes=2"]
        rows = [
            run("1 process, batch B", [sys.executable, "src/main.py", *common, f"--batch_size={args.batch_size}"],
                tmp / "one", env),
            run("2 processes, B/2 each", [sys.executable, "src/main.py", *common, *half], tmp / "two", env),
            run("2 processes, heads trainable, find_unused_parameters", [sys.executable, str(launcher), *common, *half], tmp / "unused", env),
        ]
    base = rows[0]
    print(f"\nstage 3 on {os.cpu_count()} CPU cores: sam_distill, config_TOY.cfg model, {args.images} train images, "
          f"{args.epochs} epochs, B = {args.batch_size}\n")
    print("| run | processes | steps | training s | s / step | vs 1 process | wall s | final val/loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['processes']} | {r['steps']} | {r['seconds']:.1f} | {r['seconds'] / r['steps']:.3f} | "
              f"{r['seconds'] / base['seconds']:.2f}x | {r['wall']:.1f} | {r['val_loss']:.4f} |")
    print(f"\nfind_unused_parameters=True with every head trainable, against the frozen heads, both on 2 processes: "
          f"{rows[2]['seconds'] / rows[1]['seconds']:.2f}x the training time")


if __name__ == "__main__":
    main()
