"""The toy study's plumbing: a killed training step resumes, and the report is built from finished steps only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import TINY_FLAGS, make_image_folder

from partwhole.common.mask_io import read_mask_record
from partwhole.masks.box_sizes import matched_box_sizes
from partwhole_cli.toy_pipeline import train_once

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_once_resumes_an_unfinished_run_instead_of_restarting(tmp_path, capsys):
    make_image_folder(tmp_path / "data")
    folder = tmp_path / "run"
    args = [*TINY_FLAGS, f"--data_dir={tmp_path / 'data'}", "--logger=csv"]
    assert train_once("first", folder, [*args, "--max_epochs=1"])
    last = folder / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 2
    (folder / "results.json").unlink()  # as if killed after its last checkpoint
    assert train_once("again", folder, [*args, "--max_epochs=2"])
    assert "resuming the unfinished run" in capsys.readouterr().out
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1  # continued: 2 more steps, not 4 from scratch
    assert len(list((folder / "logs").glob("version_*"))) == 2  # the first attempt's log is kept
    assert not train_once("done", folder, [*args, "--max_epochs=2"])  # finished: reused
    marker = folder / "checkpoints" / "epoch-003.ckpt"
    assert train_once("to epoch 3", folder, [*args, "--max_epochs=3", "--keep_checkpoints_at=3"], done=marker)
    assert marker.is_file() and torch.load(marker, weights_only=True)["global_step"] == 6


def fake_row(run: Path, accuracy: float, r2: float | None) -> None:
    """The files the report reads from a finished fine-tune (and, for sam_distill, the budget's test)."""
    fine = run.parent / run.name
    (fine / "logs" / "version_0").mkdir(parents=True)
    (fine / "results.json").write_text(json.dumps({"seconds": 10.0, "test": {"test/accuracy": accuracy}}))
    (fine / "logs" / "version_0" / "metrics.csv").write_text(f"epoch,val/accuracy\n0,{accuracy - 0.05}\n1,{accuracy}\n")
    if r2 is not None:
        budget = run.name.split("_e")[1]
        tested = run.parent / f"test_e{budget}"
        tested.mkdir()
        (tested / "results.json").write_text(json.dumps({"test": {"test/distill_r2": r2, "test/image_mean_r2": 0.7, "test/loss": 1.0}}))


@pytest.mark.slow
def test_report_only_tabulates_finished_budgets(tmp_path):
    out = tmp_path / "study" / "v"
    for seed in (0, 1):
        for method, acc in (("sam_distill", 0.6), ("sam_distill_random", 0.5)):
            fake_row(out / method / f"seed{seed}" / "finetune_e010", acc + 0.01 * seed, 0.05)
        fake_row(out / "random_init" / f"seed{seed}" / "finetune_e000", 0.3, None)
    fake_row(out / "sam_distill" / "seed0" / "finetune_e030", 0.7, 0.1)  # budget 30 half done: left out
    for name in ("pretrained", "random"):
        for seed in (0, 1):
            probe = {f"level{i}": {"test_accuracy": 0.99, "val_accuracy": 0.99, "weight_decay": 0.01} for i in range(3)}
            (out / f"teacher_probe_{name}_seed{seed}.json").write_text(json.dumps(probe))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), "--report_only", f"--out_dir={tmp_path / 'study'}",
                           "--variant=v", "--seeds=0,1", "--methods=sam_distill,sam_distill_random,random_init",
                           "--budgets=10,30"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "| 10 epochs |" in report and "30 epochs" not in report  # only whole rows
    assert "| sam_distill, pretrained teacher (the paper) | 60.5 ± 0.7 |" in report
    assert "sam_distill minus sam_distill_random at 10 epochs: +10.0 ± 0.0" in report
    assert "| no pretraining | 30.0 ± 0.0 (any budget) |" in report
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"sam_distill", "sam_distill_random", "random_init"}
    assert (out / "accuracy.png").stat().st_size > 10_000


def study(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), f"--out_dir={tmp_path / 'study'}", "--variant=v",
                           "--probes=false", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_rows_in_the_ledger_need_no_run_folder_and_partial_rows_are_left_out_per_method(tmp_path):
    """A committed ledger carries a study to a machine without its runs/; a method's budget is reported
    once every seed has it, whatever the other methods have."""
    row = lambda m, s, b, acc, r2=None: {"method": m, "seed": s, "budget": b, "test_accuracy": acc, "val_accuracy": acc,  # noqa: E731
                                         "finetune_seconds": 5.0, "distill_r2": r2, "image_mean_r2": 0.7 if r2 else None}
    runs = [row("sam_distill", s, b, 0.6 + b / 1000 + 0.01 * s, 0.05) for s in (0, 1) for b in (10, 30)]
    runs += [row("sam_distill_random", s, 10, 0.5, 0.1) for s in (0, 1)] + [row("sam_distill_random", 0, 30, 0.55, 0.12)]
    runs += [row("random_init", s, 0, 0.3) for s in (0, 1)]
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"flags": {"finetune_epochs": "8", "val_from_train": "0.1"}, "runs": runs, "teachers": {}}))
    proc = study(tmp_path, "--report_only", f"--ledger={ledger}", "--seeds=0,1", "--methods=sam_distill,sam_distill_random,random_init",
                 "--budgets=10,30")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "sam_distill_random at 30 epochs (1 of 2 seeds)" in proc.stdout
    report = (tmp_path / "study" / "v" / "report.md").read_text()
    assert "| sam_distill, pretrained teacher (the paper) | 61.5 ± 0.7 | 63.5 ± 0.7 |" in report
    assert "| sam_distill, random teacher (control) | 50.0 ± 0.0 | n/a |" in report
    assert "sam_distill minus sam_distill_random at 10 epochs: +11.5 ± 0.7" in report  # the longest budget both have
    assert json.loads((tmp_path / "study" / "v" / "results.json").read_text())["runs"] == runs  # every row kept, NaN-free


@pytest.mark.slow
def test_a_ledger_of_another_recipe_is_refused(tmp_path):
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"flags": {"finetune_epochs": "5"}, "runs": [], "teachers": {}}))
    proc = study(tmp_path, "--report_only", f"--ledger={ledger}")
    assert proc.returncode != 0
    assert "--finetune_epochs: 5 there, 8 now" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_sweep_report_ranks_variants_by_validation_with_paired_differences(tmp_path):
    """experiments/toy_sweep.py --report_only: one table from the variants' ledgers, best validation accuracy first,
    each variant's paired difference to base, and no test numbers (the recipe is chosen without them)."""
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    for name, accs in (("base", (0.50, 0.54)), ("lr_5e-3", (0.56, 0.58)), ("loss_cosine", (0.40, 0.46))):
        runs = [{"method": "sam_distill", "seed": s, "budget": 10, "val_accuracy": a, "test_accuracy": 0.987, "pretrain_seconds": 120.0,
                 "curve": {"10": {"val_distill_r2": 0.05 + 0.01 * s}}} for s, a in enumerate(accs)]
        (ledgers / f"{name}.json").write_text(json.dumps({"flags": {}, "runs": runs, "teachers": {}}))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_sweep.py"), "--report_only", "--budget=10",
                           f"--ledger_dir={ledgers}", f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| lr_5e-3", "| base", "| loss_cosine"]
    assert "| 57.0 ± 1.4 (56.0, 58.0) | 5.5 ± 0.7 / 5.5 ± 0.7 | 5.0 ± 1.4 | 2.0 |" in rows[0]
    assert "| — |" in rows[1] and "| -9.0 ± 1.4 |" in rows[2]
    assert "98.7" not in proc.stdout


@pytest.mark.slow
def test_masks_full_image_study_runs_end_to_end_and_its_rows_name_masks_and_teacher(tmp_path):
    """--masks=full_image on a tiny toy set, 1 epoch: stage 1 without SAM beside the splits, stage 2 into its own folder,
    pretraining on it, and the islands still scored against the ground truth; the row says masks and teacher."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    args = ["--methods=sam_distill", "--seeds=0", "--budgets=1", "--finetune_epochs=1", "--train_per_class=3", "--val_per_class=1",
            "--probes=false", "--islands_count=2", f"--data_dir={data}", f"--out_dir={runs}"]
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), "--masks=full_image", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    toy = data / "toy"
    masks, meta = read_mask_record(next((toy / "val_masks_full_image").glob("*/*.pkl")))
    assert meta["mask_source"] == "full_image" and masks.all() and masks.shape == (64, 3, 64, 64)
    assert "--embeds_suffix=_masks_full_image_embeds " in proc.stdout and (toy / "train_masks_full_image_embeds").is_dir()
    assert not (toy / "train_masks_embeds").exists()  # the oracle masks' embeddings were not needed
    ledger = json.loads((runs / "masks_full_image" / "results.json").read_text())  # the variant follows --masks
    assert ledger["flags"]["masks"] == "full_image"
    (row,) = ledger["runs"]
    assert (row["masks"], row["teacher"], row["image_mean_r2"]) == ("full_image", "pretrained", 1.0)  # one target per image
    assert set(row["islands"]["ground_truth"]) == {"0", "1", "2"}
    assert "Stage-1 masks of the sam_distill arms: the whole image" in (runs / "masks_full_image" / "report.md").read_text()

    # extended to a longer budget in the same run folders: the new longest budget's islands come from its own checkpoint
    seed0 = runs / "masks_full_image" / "sam_distill" / "seed0"
    longer = [a.replace("--budgets=1", "--budgets=1,2") for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), "--masks=full_image", *longer],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "pretrain to epoch 1" not in proc.stdout  # the ledger's row: nothing reruns for it
    assert "seed 0: islands: partwhole-train" in proc.stdout  # scored again, at epoch 2 (a cached folder was reused before)
    rows = {r["budget"]: r for r in json.loads((runs / "masks_full_image" / "results.json").read_text())["runs"]}
    assert rows[1]["islands"] == row["islands"]  # the shorter budget's row is kept as it was
    scored = json.loads((seed0 / "islands_e002" / "islands" / "scores.json").read_text())
    assert rows[2]["islands"] == scored and "--load_checkpoint_dir=" + str(seed0 / "pretrain" / "checkpoints" / "epoch-002.ckpt") in proc.stdout

    refused = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), "--masks=boxes", "--report_only",
                              f"--ledger={runs / 'masks_full_image' / 'results.json'}", *args], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
    assert refused.returncode != 0 and "--masks: full_image there, boxes now" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_masks_boxes_study_sizes_its_boxes_like_the_oracle_masks(tmp_path):
    """--masks=boxes end to end (minutes: stage 2 embeds ~145 distinct boxes per image): the boxes' sides are those
    box_sizes.py matches to the oracle masks of train, recorded in every file, and the rows say boxes."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), "--masks=boxes", "--methods=sam_distill",
                           "--seeds=0", "--budgets=1", "--finetune_epochs=1", "--train_per_class=2", "--val_per_class=1",
                           "--probes=false", "--islands=false", f"--data_dir={data}", f"--out_dir={runs}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    sides = matched_box_sizes(data / "toy" / "train_masks")[0]
    for split in ("train", "val"):
        meta = read_mask_record(next((data / "toy" / f"{split}_masks_boxes").glob("*/*.pkl")))[1]
        assert (meta["mask_source"], meta["box_sizes"]) == ("boxes", sides)
    (row,) = json.loads((runs / "masks_boxes" / "results.json").read_text())["runs"]
    assert (row["masks"], row["teacher"]) == ("boxes", "pretrained") and row["image_mean_r2"] < 1
    assert f"nested boxes of sides {', '.join(map(str, sides))} px" in (runs / "masks_boxes" / "report.md").read_text()


@pytest.mark.slow
def test_old_ledgers_count_as_part_whole_masks_and_other_methods_are_refused_with_other_masks(tmp_path):
    ledger = tmp_path / "ledger.json"  # a ledger written before --masks: no masks flag, rows without masks or teacher
    ledger.write_text(json.dumps({"flags": {"finetune_epochs": "8"}, "runs": [], "teachers": {}}))
    proc = study(tmp_path, "--report_only", f"--ledger={ledger}", "--masks=boxes", "--methods=sam_distill")
    assert proc.returncode != 0 and "--masks: oracle there, boxes now" in proc.stderr.strip().splitlines()[-1]
    proc = study(tmp_path, "--report_only", f"--ledger={tmp_path / 'not_yet.json'}", "--methods=sam_distill")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: nothing to report: no finished row in --ledger=")
    proc = study(tmp_path, "--report_only", "--masks=full_image", "--methods=sam_distill,supcon")
    assert proc.returncode != 0 and "supcon would give the same rows" in proc.stderr
    proc = study(tmp_path, "--report_only", f"--ledger={ledger}", "--embed_flags=--crop", "--methods=sam_distill")
    assert proc.returncode != 0 and "--embed_flags: [] there, ['--crop'] now" in proc.stderr.strip().splitlines()[-1]
    crop = tmp_path / "crop.json"  # a stage-2 variant: its own default variant folder, named in the report
    crop.write_text(json.dumps({"flags": {"embed_flags": "['--crop']"}, "teachers": {}, "runs": [
        {"method": "sam_distill", "seed": 0, "budget": 10, "test_accuracy": 0.5, "val_accuracy": 0.5, "finetune_seconds": 1.0}]}))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_study.py"), f"--out_dir={tmp_path / 'study'}", "--report_only",
                           "--islands=false", f"--ledger={crop}", "--embed_flags=--crop", "--methods=sam_distill", "--seeds=0",
                           "--budgets=10", f"--data_dir={tmp_path / 'elsewhere'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "teacher probes left out: " in proc.stdout  # a ledger read on a machine without the toy set
    assert "the oracle part-whole masks, stage-2 flags --crop;" in (tmp_path / "study" / "masks_oracle_crop" / "report.md").read_text()


def comparison_ledger(path: Path, masks: str | None, accuracies: dict, flags: dict | None = None) -> str:
    """A ledger of sam_distill rows: ``accuracies[(teacher, budget)]`` per seed; ``masks`` None: an older ledger without it."""
    methods = {"pretrained": "sam_distill", "random": "sam_distill_random"}
    runs = []
    for (teacher, budget), values in accuracies.items():
        for seed, acc in enumerate(values):
            row = {"method": methods[teacher], "seed": seed, "budget": budget, "test_accuracy": acc, "val_accuracy": acc - 0.1,
                   "distill_r2": 0.1, "finetune_seconds": 5.0}
            if budget == 100:
                row["islands"] = {"ground_truth": {str(i): {"ari": 0.3 + 0.1 * i, "pair_corr": 0.5} for i in range(3)}}
            runs.append(row if masks is None else {**row, "masks": masks, "teacher": teacher})
    recorded = {"pretrain_flags": "['--scheduler=constant']", **({"masks": masks} if masks else {}), **(flags or {})}
    path.write_text(json.dumps({"flags": recorded, "runs": runs + [{"method": "supcon", "seed": 0, "budget": 100}], "teachers": {}}))
    return str(path)


@pytest.mark.slow
def test_compare_ledgers_tabulates_mask_sources_by_teacher_with_paired_differences(tmp_path):
    part_whole = comparison_ledger(tmp_path / "budgets.json", None, {("pretrained", 30): (0.6, 0.62, 0.64), ("random", 30): (0.5, 0.5, 0.5),
                                                                    ("pretrained", 100): (0.7, 0.8, 0.7), ("pretrained", 10): (0.5, 0.5, 0.5)})
    boxes = comparison_ledger(tmp_path / "boxes.json", "boxes", {("pretrained", 30): (0.5, 0.55, 0.5), ("random", 30): (0.4, 0.5, 0.45),
                                                                ("pretrained", 100): (0.6, 0.6, 0.6)})
    full = comparison_ledger(tmp_path / "full.json", "full_image", {("pretrained", 30): (0.3, 0.3, 0.3)})
    proc = study(tmp_path, f"--compare_ledgers={boxes},{part_whole},{full}", "--budgets=30,100")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "study" / "v" / "report.md").read_text()
    assert "| part_whole | pretrained | 3 | 62.0 ± 2.0 | 52.0 ± 2.0 | 0.100 ± 0.000 | n/a |" in report  # missing fields: part_whole
    assert "| boxes | random | 3 | 45.0 ± 5.0 |" in report
    assert "| boxes | pretrained | 3 | 60.0 ± 0.0 | 50.0 ± 0.0 | 0.100 ± 0.000 | 0.30 ± 0.00 / 0.40 ± 0.00 / 0.50 ± 0.00 |" in report
    assert report.index("| part_whole | pretrained | 3 | 62.0") < report.index("| boxes | pretrained | 3 | 51.7")  # part_whole first
    assert "10 epochs" not in report and "| full_image | random" not in report
    assert "- pretrained teacher, 30 epochs: part_whole minus boxes +10.3 ± 3.5 (seeds: +10.0, +7.0, +14.0)" in report
    assert "- random teacher, 30 epochs: part_whole minus boxes +5.0 ± 5.0" in report
    assert "- pretrained teacher, 30 epochs: part_whole minus full_image +32.0 ± 2.0" in report
    assert "- pretrained teacher, 100 epochs: part_whole minus boxes +13.3 ± 5.8" in report
    assert (tmp_path / "study" / "v" / "masks.png").stat().st_size > 10_000

    straight = comparison_ledger(tmp_path / "straight.json", None, {("pretrained", 100): (0.75, 0.7, 0.8)})  # same source, run otherwise
    proc = study(tmp_path, f"--compare_ledgers={part_whole},{straight}", "--budgets=100")
    assert proc.returncode != 0 and "both hold part_whole rows" in proc.stderr and "NAME=PATH" in proc.stderr
    proc = study(tmp_path, f"--compare_ledgers={part_whole},straight={straight},{boxes}", "--budgets=100")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "study" / "v" / "report.md").read_text()
    assert "| part_whole [straight] | pretrained | 3 | 75.0 ± 5.0 |" in report
    assert "- pretrained teacher, 100 epochs: part_whole minus part_whole [straight] -1.7 ± 10.4 (seeds: -5.0, +10.0, -10.0)" in report
    assert "- pretrained teacher, 100 epochs: part_whole [straight] minus boxes +15.0 ± 5.0 (seeds: +15.0, +10.0, +20.0)" in report

    other = comparison_ledger(tmp_path / "other.json", "boxes", {("pretrained", 30): (0.5,)}, {"pretrain_flags": "['--scheduler=onecycle']"})
    proc = study(tmp_path, f"--compare_ledgers={part_whole},{other}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --compare_ledgers: ") and "differ in --pretrain_flags" in proc.stderr
