"""The toy study's recipe sweep (issue 22, item 5): sam_distill pretraining recipes compared on a large
validation split only.

    python experiments/toy_sweep.py                          # every variant, seeds 0 and 1, then the report
    python experiments/toy_sweep.py --variants=base,lr_5e-3 --seeds=2   # more seeds of some variants
    python experiments/toy_sweep.py --report_only            # the table of what has finished

The study's validation split (100 images held out of its 1,000 train images) cannot tell recipes a few
points apart. This sweep uses its own toy set (``<data_dir>/toy``, default ``datasets/sweep/toy``): the
same generator and seed, with 150 train images per class instead of 100. Generation is seeded per
image, so the first 100 of each class are the study's train images and the rest are new; none is a
test image (the generator's ``val`` split, 300 images, never looked at here). 40 % of train is held out
per class and seed: 900 train images, as in the study, and a validation split of 600.

Every variant is one ``experiments/toy_study.py`` run (``--methods=sam_distill``, one budget, no islands
or probes) with its own ledger ``<ledger_dir>/<variant>.json``, so a killed sweep, rerun, continues
where it stopped, and a committed ledger is not run again. A variant changes one thing against
``base`` (``config/config_TOY.cfg`` at a constant learning rate). The report ranks them by validation
accuracy of the frozen-backbone classifier, with validation ``distill_r2`` beside it and the paired
difference to ``base`` (same seed, same split). Test numbers are in the ledgers but not in the report:
the recipe is chosen without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]

from seed_stats import format_mean_std  # noqa: E402

from partwhole.agglomerator.data import held_out_count  # noqa: E402
from partwhole.toy.dataset import CLASS_NAMES  # noqa: E402

FLAGS = flags.FLAGS

CONSTANT = "--scheduler=constant"
VARIANTS = {  # name -> (toy_study --pretrain_flags, what it changes against base)
    "base": ([CONSTANT], "config_TOY.cfg: features-norm levels encoder, z-scored targets, MSE, AdamW 2e-3, batch 64"),
    "encoder_norm_columns": ([CONSTANT, "--levels_encoder_norm=columns"], "levels encoder LayerNorms over the columns (the reference)"),
    "target_norm_layer": ([CONSTANT, "--teacher_norm=layer"], "each target whitened over its own D (LayerNorm, no affine)"),
    "target_norm_none": ([CONSTANT, "--teacher_norm=none"], "raw teacher embeddings (the reference)"),
    "loss_smooth_l1": ([CONSTANT, "--distill_loss=smooth_l1"], "smooth L1 (Huber, beta 1) instead of MSE"),
    "loss_cosine": ([CONSTANT, "--distill_loss=cosine"], "1 - cosine similarity instead of MSE"),
    "lr_5e-3": ([CONSTANT, "--learning_rate=0.005"], "learning rate 5e-3"),
    "lr_1e-3": ([CONSTANT, "--learning_rate=0.001"], "learning rate 1e-3"),
    "batch_32": ([CONSTANT, "--batch_size=32"], "batch 32 (twice the steps per epoch)"),
    "onecycle": (["--scheduler=onecycle"], "OneCycle schedule over the budget (warm-up, cosine decay)"),
}
flags.DEFINE_list("variants", list(VARIANTS), f"Which of {', '.join(VARIANTS)}.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (each seeds pretraining, fine-tuning and the held-out split).")
flags.DEFINE_integer("budget", 20, "Pretraining epochs of every variant.")
flags.DEFINE_string("data_dir", "datasets/sweep", "The sweep's toy set lives in <data_dir>/toy (generated if missing).")
flags.DEFINE_integer("train_per_class", 150, "Toy train images per class (the study's 100, then new ones).")
flags.DEFINE_float("val_from_train", 0.4, "Fraction of train held out per class as the validation split.")
flags.DEFINE_string("out_dir", "runs/toy_sweep", "Run folders (<out_dir>/<variant>/...) and report.md.")
flags.DEFINE_string("ledger_dir", "docs/toy_sweep", "One ledger per variant: <ledger_dir>/<variant>.json (commit them).")
flags.DEFINE_bool("report_only", False, "Run nothing: write the report from the ledgers.")


def run_variant(name: str) -> None:
    pretrain, _ = VARIANTS[name]
    command = [sys.executable, str(REPO / "experiments" / "toy_study.py"), f"--variant={name}", f"--out_dir={FLAGS.out_dir}",
               f"--data_dir={FLAGS.data_dir}", f"--train_per_class={FLAGS.train_per_class}",
               f"--val_from_train={FLAGS.val_from_train}", f"--seeds={','.join(FLAGS.seeds)}", "--methods=sam_distill",
               f"--budgets={FLAGS.budget}", "--probes=false", "--islands=false", f"--pretrain_flags={','.join(pretrain)}",
               f"--ledger={ledger_path(name)}"]
    print(f"\n##### variant {name}: {' '.join(pretrain)}", flush=True)
    if subprocess.run(command, cwd=REPO).returncode:
        sys.exit(f"error: variant {name} failed (its command: {' '.join(command)})")


def ledger_path(name: str) -> Path:
    return REPO / FLAGS.ledger_dir / f"{name}.json"


def rows_of(name: str) -> dict[int, dict]:
    """Finished rows of a variant at --budget, by seed."""
    path = ledger_path(name)
    if not path.is_file():
        return {}
    return {r["seed"]: r for r in json.loads(path.read_text())["runs"] if r["budget"] == FLAGS.budget and r["method"] == "sam_distill"}


def val_r2(row: dict, best: bool = False) -> float:
    """Validation distill_r2 after the last pretraining epoch (the learning curve's), or its best epoch's."""
    curve = row.get("curve", {})
    if best:
        return max((v["val_distill_r2"] for v in curve.values() if "val_distill_r2" in v), default=float("nan"))
    return curve.get(str(FLAGS.budget), {}).get("val_distill_r2", float("nan"))


def held_out_images() -> int:
    """The validation split's size: per class what ``PartWholeDataModule.hold_out`` holds out, times the toy classes."""
    return len(CLASS_NAMES) * held_out_count(FLAGS.train_per_class, FLAGS.val_from_train)


def report() -> str:
    base = rows_of("base")
    text = lambda values: format_mean_std(values, scale=1.0, lone_std=False)  # noqa: E731  (values in points already)
    table = []
    for name in FLAGS.variants:
        rows = rows_of(name)
        if not rows:
            continue
        seeds = sorted(rows)
        acc = [100 * rows[s]["val_accuracy"] for s in seeds]
        r2 = [val_r2(rows[s]) for s in seeds]
        best = [val_r2(rows[s], best=True) for s in seeds]
        diffs = [100 * (rows[s]["val_accuracy"] - base[s]["val_accuracy"]) for s in seeds if s in base] if name != "base" else []
        minutes = np.mean([rows[s].get("pretrain_seconds", float("nan")) for s in seeds]) / 60
        table.append((np.mean(acc), f"| {name} | {VARIANTS[name][1]} | {','.join(map(str, seeds))} | {text(acc)} "
                      f"({', '.join(f'{a:.1f}' for a in acc)}) | {text([100 * x for x in r2])} / {text([100 * x for x in best])} | "
                      f"{text(diffs) if diffs else '—'} | {minutes:.1f} |"))
    lines = [f"Recipe sweep: sam_distill (pretrained teacher), {FLAGS.budget} pretraining epochs, then the study's "
             f"frozen-backbone fine-tuning; validation = {FLAGS.val_from_train:.0%} of {FLAGS.train_per_class} train "
             f"images per class held out per seed ({held_out_images()} images); mean ± std over seeds. Ranked by validation accuracy. "
             "Test numbers are not shown: the recipe is chosen without them. distill_r2 is scored in each variant's own "
             "normalised target space, so it compares learning within a row, not targets across norms.", "",
             "| variant | change against base | seeds | val accuracy % | val distill_r2 x100, last / best epoch | val accuracy minus base, paired | "
             "pretraining min |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [line for _, line in sorted(table, key=lambda t: -t[0])]
    return "\n".join(lines) + "\n"


def main(argv) -> None:
    del argv
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not FLAGS.report_only:
        for name in FLAGS.variants:
            run_variant(name)
    text = report()
    out = REPO / FLAGS.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print("\n" + text + f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
