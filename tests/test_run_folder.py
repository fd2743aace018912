"""Reliability of a run folder: a diverging run stops before a checkpoint holds NaN, a folder belongs to
one run (refused, resumed or --overwrite), one process at a time, and every JSON written is strict."""

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fakes import TINY_FLAGS, make_image_folder

from partwhole.agglomerator.engine import (
    DivergedError,
    StopOnNonFinite,
    checkpoint_callbacks,
)
from partwhole.common.safe_files import atomic_write_json

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"


def strict(path: Path):
    """``json.load`` that refuses NaN and Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"{path}: non-strict JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def train(tmp_path: Path, run_dir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [*TINY_FLAGS, f"--data_dir={tmp_path}", f"--output_dir={run_dir}", "--logger=csv", *extra]
    return subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=timeout)


class GoesNaN(pl.LightningModule):
    """A regression whose loss turns NaN from the first step of epoch ``bad_epoch``."""

    def __init__(self, bad_epoch: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_epoch = bad_epoch

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * math.nan if self.current_epoch >= self.bad_epoch else loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_non_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    callbacks = [StopOnNonFinite("val/loss"), *checkpoint_callbacks(tmp_path, "val/loss")]
    trainer = pl.Trainer(max_epochs=5, callbacks=callbacks, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(DivergedError, match="the training loss is nan at epoch 2, step 5"):  # the 5th step (global_step 5)
        trainer.fit(GoesNaN(bad_epoch=2), data, data)
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert "last.ckpt" in saved and any(name.startswith("best-") for name in saved)
    for name in saved:
        assert all_finite(tmp_path / name), name
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1  # the last finite epoch


@pytest.mark.slow
def test_diverging_run_exits_non_zero_with_one_line_error(tmp_path):
    make_image_folder(tmp_path)
    run_dir = tmp_path / "run"
    proc = train(tmp_path, run_dir, "--max_epochs=20", "--learning_rate=1e30")
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: ") and "--learning_rate (now 1e+30)" in line, line
    assert "at epoch " in line and ", step " in line
    assert not (run_dir / "results.json").exists()  # not a finished run: the study and demo would not reuse it
    for checkpoint in run_dir.rglob("*.ckpt"):
        assert all_finite(checkpoint), checkpoint


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"test": {"test/loss": float("nan"), "a": float("inf"), "b": 1.5}, "n": torch.tensor(2.0)})
    assert strict(tmp_path / "r.json") == {"test": {"test/loss": None, "a": None, "b": 1.5}, "n": 2.0}


@pytest.mark.slow
def test_a_run_folder_belongs_to_one_run(tmp_path):
    make_image_folder(tmp_path)
    run_dir = tmp_path / "run"
    first = train(tmp_path, run_dir, "--max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    strict(run_dir / "results.json")
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    again = train(tmp_path, run_dir, "--max_epochs=1", "--supervise")  # the slip: another command, the same folder
    assert again.returncode == 1
    line = again.stderr.strip().splitlines()[-1]
    assert "holds the checkpoints of an earlier run" in line and "--resume_training --load_checkpoint_dir" in line
    assert "--overwrite" in line
    assert last.read_bytes() == before

    resumed = train(tmp_path, run_dir, "--max_epochs=2", "--resume_training", f"--load_checkpoint_dir={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 4  # continued: 2 epochs of 2 steps

    replaced = train(tmp_path, run_dir, "--max_epochs=1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 2  # a new run from scratch
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-000.ckpt", "last.ckpt"]
    assert len(list((run_dir / "logs").glob("version_*"))) == 1  # the earlier run's logs went with it


@pytest.mark.slow
def test_a_held_folder_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    make_image_folder(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"
    with open(lock, "w") as holder:  # this test process holds the folder, as a running training would
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write(f"pid {os.getpid()} on testhost since now\n")
        holder.flush()
        refused = train(tmp_path, run_dir, "--max_epochs=1")
    assert refused.returncode == 1
    assert f"is in use by pid {os.getpid()} on testhost" in refused.stderr.strip().splitlines()[-1]
    assert not (run_dir / "checkpoints").exists()
    # the holder is gone (a killed run: the kernel dropped its lock); its note is left in the file
    assert "testhost" in lock.read_text()
    taken = train(tmp_path, run_dir, "--max_epochs=1")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert "pid " in lock.read_text() and "testhost" not in lock.read_text()


@pytest.mark.slow
def test_of_two_runs_started_at_once_exactly_one_runs(tmp_path):
    make_image_folder(tmp_path)
    run_dir = tmp_path / "run"
    args = [*TINY_FLAGS, f"--data_dir={tmp_path}", f"--output_dir={run_dir}", "--logger=csv", "--max_epochs=3"]
    procs = [subprocess.Popen([sys.executable, str(MAIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    refused = next(err for code, err in outcomes if code == 1).strip().splitlines()[-1]
    assert "is in use by pid" in refused or "holds the checkpoints of an earlier run" in refused, refused
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert len(list((run_dir / "logs").glob("version_*"))) == 1
