"""Full disks, read-only folders and cluster signals, in all three stages.

The disk tests mount a small tmpfs (root only; skipped where mounting is refused) for the outputs,
so outputs and checkpoints sit on another filesystem than the system temp folder, as in the bug
report (Lightning's fsspec save staged checkpoints in /tmp and copied them across).
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TINY_FLAGS, make_image_folder

from partwhole.common.errors import OutputWriteError
from partwhole.common.mask_io import load_embeddings, load_masks
from partwhole.common.safe_files import (
    atomic_write_bytes,
    is_stale_temporary,
    remove_stale_temporaries,
)

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "src" / "main.py"
STAGE1 = REPO / "src" / "hierarchical_masks" / "patched_masks.py"
STAGE2 = REPO / "src" / "hierarchical_masks" / "masks_to_embeds.py"
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "2m", read_only: bool = False):
    """A tmpfs of ``size`` mounted at ``folder`` (skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s filesystem with one file so that about ``leave`` bytes stay free."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free_bytes(folder) - leave))
    return filler


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --------------------------------------------------------------------------- atomic writes, temporary files


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(tmp_path):
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        target = fs / "out" / "data.bin"
        atomic_write_bytes(target, b"old" * 1000)
        fill(fs, leave=8192)
        with pytest.raises(OutputWriteError, match=r"cannot write data.bin in .*/fs/out \(No space left on device\): "
                                                    r"needs 100.0 kB, [0-9.]+ kB free; free some space") as error:
            atomic_write_bytes(target, b"x" * 100_000)
        assert error.value.size == 100_000
        assert target.read_bytes() == b"old" * 1000  # whole, not truncated
        assert sorted(p.name for p in (fs / "out").iterdir()) == ["data.bin"]  # no temporary left


def test_read_only_folder_is_a_one_line_error(tmp_path):
    with small_filesystem(tmp_path / "ro", "1m", read_only=True) as fs:
        with pytest.raises(OutputWriteError, match=r"cannot write x.bin in .*/ro/sub \(Read-only file system\); choose a writable folder"):
            atomic_write_bytes(fs / "sub" / "x.bin", b"1")


def test_only_our_stale_temporaries_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32]
    (tmp_path / "cls").mkdir()
    stale = tmp_path / "cls" / f".img1.pkl.partwhole-{host}-{dead.pid}-abcd1234.tmp"
    live = tmp_path / "cls" / f".img2.pkl.partwhole-{host}-{os.getpid()}-abcd1234.tmp"  # a writer still running
    foreign_old = tmp_path / f".last.ckpt.partwhole-othernode-12-abcd_234.tmp"
    foreign_new = tmp_path / f".best.ckpt.partwhole-othernode-13-abcd_234.tmp"
    users = [tmp_path / ".notes.tmp", tmp_path / "cls" / "img3.tmp", tmp_path / ".img1.pkl.abcd1234.tmp",
             tmp_path / "cls" / f".x.partwhole-{host}-{dead.pid}-abcd1234.tmp.bak"]
    for path in [stale, live, foreign_old, foreign_new, *users]:
        path.write_bytes(b"1")
    os.utime(foreign_old, (time.time() - 7200,) * 2)
    assert is_stale_temporary(stale) and not is_stale_temporary(live)
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, foreign_old])
    assert all(p.exists() for p in [live, foreign_new, *users])


# --------------------------------------------------------------------------- stage 1


def stage1_images(root: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / ("a" if i % 2 else "b") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return root


def stage1_args(images: Path, out: Path, model_type: str = "vit_tiny") -> list[str]:
    return ["--device=cpu", f"--sam_model_type={model_type}", "--img_size=64", "--batch_size=1",
            f"--in_data_path={images}", f"--out_data_path={out}"]


# the teachers' small test models and their maskers (module, class), for tests of both
STAGE1_TEACHERS = {"vit_tiny": ("sam_points", "PointGridMasker"), "sam2.1_hiera_test": ("sam2_points", "Sam2PointGridMasker")}


@pytest.mark.slow
def test_stage1_full_disk_is_one_line_and_a_rerun_finishes(tmp_path):
    images = stage1_images(tmp_path / "images", 6)
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        out = fs / "masks"
        out.mkdir()
        filler = fill(fs, leave=12 * 1024)  # room for one or two mask files of about 6 kB
        result = subprocess.run([sys.executable, str(STAGE1), *stage1_args(images, out)], capture_output=True,
                                text=True, env=ENV, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        line = last_line(result.stderr)
        assert line.startswith("error: cannot write img") and f"in {out}/" in line and "No space left on device" in line
        assert re.search(r": needs \d+\.\d kB, \d+\.\d kB free; .* the \d image\(s\) left need about \d+\.\d kB in ", line), line
        assert "Traceback" not in result.stderr
        kept = sorted(out.rglob("*.pkl"))
        assert 0 < len(kept) < 6 and not list(out.rglob("*.tmp"))
        for path in kept:
            assert load_masks(path).shape == (16, 3, 64, 64)
        filler.unlink()
        rerun = subprocess.run([sys.executable, str(STAGE1), *stage1_args(images, out)], capture_output=True,
                               text=True, env=ENV, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"{6 - len(kept)} written, {len(kept)} skipped" in rerun.stdout
        assert len(list(out.rglob("*.pkl"))) == 6


@pytest.mark.parametrize("model_type", list(STAGE1_TEACHERS))
@pytest.mark.slow
def test_stage1_sigterm_finishes_the_file_in_hand_and_a_rerun_completes(tmp_path, model_type):
    """The real CLI, with SIGTERM sent to itself while SAM (1 or 2.1) computes the second image."""
    module, masker = STAGE1_TEACHERS[model_type]
    images, out = stage1_images(tmp_path / "images", 5), tmp_path / "masks"
    out.mkdir()
    (out / ".img9.pkl.partwhole-nohost-1-abcd1234.tmp").write_bytes(b"")  # a dead writer's leftover (old, foreign)
    os.utime(out / ".img9.pkl.partwhole-nohost-1-abcd1234.tmp", (time.time() - 7200,) * 2)
    driver = (
        "import os, runpy, signal, sys\n"
        f"from partwhole.masks.{module} import {masker} as Masker\n"
        "real, calls = Masker.predict_model_inputs, []\n"
        "def predict(self, inputs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, inputs)\n"
        "Masker.predict_model_inputs = predict\n"
        f"sys.argv = [{str(STAGE1)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(STAGE1)!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", driver, *stage1_args(images, out, model_type)], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert last_line(result.stderr) == ("patched_masks: stopped by SIGTERM after writing 2 file(s); 3 image(s) left: "
                                        "rerun the same command to finish them (finished files are skipped)")
    written = sorted(out.rglob("*.pkl"))
    assert len(written) == 2 and not list(out.rglob("*.tmp"))  # the image in hand was finished; the leftover removed
    for path in written:
        assert load_masks(path).shape == (16, 3, 64, 64)
    from stage1 import run_stage1

    rerun = run_stage1(in_data_path=str(images), out_data_path=str(out), sam_model_type=model_type,
                       sam_checkpoint=None, img_size=64, batch_size=2, show_progress=False)
    assert (rerun.written, rerun.skipped) == (3, 2)


# --------------------------------------------------------------------------- stage 2


def stage2_inputs(root: Path, count: int) -> tuple[Path, Path]:
    from PIL import Image

    from partwhole.common.mask_io import save_masks

    images, masks = root / "images", root / "masks"
    rng = np.random.default_rng(1)
    for i in range(count):
        path = images / "cls" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        save_masks(masks / "cls" / f"im{i}.pkl", rng.random((4, 3, 32, 32)) < 0.5, grid=2, img_size=32, patch_size=16)
    return images, masks


def stage2_args(images: Path, masks: Path, out: Path) -> list[str]:
    return [str(STAGE2), "--device=cpu", f"--in_masks_path={masks}", f"--in_images_path={images}", f"--out_data_path={out}",
            "--encoder_model_name=test_convnext", "--pretrained=False", "--img_height=32", "--img_width=32",
            "--progress=False", "--batch_size=4"]


@pytest.mark.slow
def test_stage2_full_disk_is_one_line_and_a_rerun_finishes(tmp_path):
    images, masks = stage2_inputs(tmp_path, 6)
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        out = fs / "embeds"
        (out / "cls").mkdir(parents=True)
        filler = fill(fs, leave=3 * 4096)  # embedding files of test_convnext: (4, 3, 64) float32, 3.2 kB: 3 fit
        result = subprocess.run([sys.executable, *stage2_args(images, masks, out)], capture_output=True, text=True,
                                env=ENV, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        line = last_line(result.stderr)
        assert line.startswith(f"error: cannot write im3.pkl in {out}/cls (No space left on device): needs 3.2 kB, "), line
        assert "the 3 image(s) left need about 9.7 kB" in line and "Traceback" not in result.stderr
        assert len(list(out.rglob("*.pkl"))) == 3 and not list(out.rglob("*.tmp"))
        filler.unlink()
        rerun = subprocess.run([sys.executable, *stage2_args(images, masks, out)], capture_output=True, text=True,
                               env=ENV, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert len(list(out.rglob("*.pkl"))) == 6


def test_stage2_sigterm_finishes_the_image_in_hand_and_a_rerun_completes(tmp_path, monkeypatch):
    from partwhole.common.per_image_runner import Interrupted
    from partwhole.embeds import embed_folder as ef

    images, masks = stage2_inputs(tmp_path, 6)
    out = tmp_path / "embeds"
    cfg = ef.EmbedFolderConfig(in_masks_path=masks, in_images_path=images, out_data_path=out,
                               encoder_model_name="test_convnext", pretrained=False, img_height=32, img_width=32,
                               batch_size=4, progress=False)
    real_save = ef.save_embeddings

    def save_then_signal(path, embeds):  # SIGTERM arrives while the first file is written
        size = real_save(path, embeds)
        if path.name == "im0.pkl":
            os.kill(os.getpid(), signal.SIGTERM)
        return size

    monkeypatch.setattr(ef, "save_embeddings", save_then_signal)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM after writing (\d) file\(s\); (\d) image\(s\) left: rerun") as stop:
        ef.embed_folder(cfg, ef.check_inputs(cfg))
    written = sorted(out.rglob("*.pkl"))
    assert 1 <= len(written) == stop.value.written < 6 and stop.value.remaining == 6 - len(written)
    assert not list(out.rglob("*.tmp"))
    for path in written:
        assert load_embeddings(path).shape == (4, 3, 64)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    monkeypatch.undo()
    line = ef.embed_folder(cfg, ef.check_inputs(cfg))
    assert f"{6 - len(written)} written, {len(written)} skipped" in line


# --------------------------------------------------------------------------- stage 3


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(MAIN), *TINY_FLAGS, f"--data_dir={data}", f"--output_dir={run_dir}", *extra]


@pytest.mark.slow
def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    with small_filesystem(tmp_path / "fs", "4m") as fs:
        run_dir = fs / "run"
        first = subprocess.run(train_args(tmp_path, run_dir, "--max_epochs=1"), capture_output=True, text=True, env=ENV, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        last = run_dir / "checkpoints" / "last.ckpt"
        before = last.read_bytes()
        size = len(before)
        filler = fill(fs, leave=size // 2)  # less than one checkpoint
        resume = ["--resume_training", f"--load_checkpoint_dir={last}"]
        full = subprocess.run(train_args(tmp_path, run_dir, "--max_epochs=3", *resume), capture_output=True, text=True,
                              env=ENV, timeout=300)
        assert full.returncode == 1, full.stderr[-2000:]
        line = last_line(full.stderr)
        assert line.startswith("error: cannot write ") and str(run_dir) in line and "No space left on device" in line, line
        assert f"resume with: python {MAIN} --flagfile {run_dir}/flags.cfg --resume_training --load_checkpoint_dir {last}" in line
        if "cannot write last.ckpt" in line or "cannot write best-" in line:
            assert re.search(r"needs \d+\.\d (kB|MB), \d+\.\d kB free", line), line
        assert "Traceback" not in full.stderr
        assert last.read_bytes() == before  # the previous checkpoint is whole and unchanged
        assert torch.load(last, weights_only=True)["global_step"] == 1  # 4 images, batch 4: 1 step per epoch
        assert not list(run_dir.rglob("*.tmp"))
        filler.unlink()
        again = subprocess.run(train_args(tmp_path, run_dir, "--max_epochs=3", *resume), capture_output=True, text=True,
                               env=ENV, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "(epoch 0, step 1)" in again.stdout and "3 epochs, 3 steps" in again.stdout
        assert torch.load(last, weights_only=True)["global_step"] == 3


@pytest.mark.slow
def test_training_into_a_read_only_folder_is_one_line(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    with small_filesystem(tmp_path / "ro", "1m", read_only=True) as ro:
        result = subprocess.run(train_args(tmp_path, ro / "run", "--max_epochs=1"), capture_output=True, text=True,
                                env=ENV, timeout=300)
    assert result.returncode == 1
    assert last_line(result.stderr) == f"error: --output_dir={ro / 'run'}: cannot write there (Read-only file system); choose a writable folder"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_during_training_saves_a_checkpoint_and_the_printed_command_resumes_at_that_step(tmp_path, workers):
    make_image_folder(tmp_path, per_class=4)  # 2 steps per epoch
    run_dir = tmp_path / "run"
    # The signal to the whole process group, as a cluster sends it (with loader processes too, when workers > 0).
    proc = subprocess.Popen(train_args(tmp_path, run_dir, "--max_epochs=200", f"--num_workers={workers}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the second epoch or later: a step, validation or an epoch end
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # leave no hung run behind
        proc.communicate()
        raise
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]  # not 0: the run is not finished
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert not processes_of_group(proc.pid)  # no loader process left behind
    line = last_line(stderr)
    match = re.fullmatch(r"train: stopped by SIGTERM at epoch (\d+), step (\d+); saved (\S+); resume with: (.+)", line)
    assert match, line
    checkpoint = torch.load(last, weights_only=True)  # whole
    epoch, step = checkpoint["epoch"], checkpoint["global_step"]
    assert (int(match[1]), int(match[2]), match[3]) == (epoch, step, str(last)) and step >= 2
    command = shlex.split(match[4])
    assert command[:2] == ["python", str(MAIN)] and command[-3:] == ["--resume_training", "--load_checkpoint_dir", str(last)]
    resumed = subprocess.run([sys.executable, *command[1:], f"--max_epochs={epoch + 2}"], capture_output=True, text=True,
                             env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(epoch {epoch}, step {step})" in resumed.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 2 * (epoch + 2)  # no step lost or redone
    logged = [int(row["step"]) for row in csv.DictReader(open(run_dir / "logs" / "version_1" / "metrics.csv")) if row["step"]]
    assert logged and min(logged) >= step


def processes_of_group(pgid: int, wait: float = 5.0) -> list[str]:
    """The processes still in process group ``pgid`` after up to ``wait`` seconds."""
    deadline = time.time() + wait
    while True:
        found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not found or time.time() > deadline:
            return found
        time.sleep(0.1)


LOADER_SCRIPT = """
import sys, time, torch
from torch.utils.data import DataLoader, Dataset
from partwhole.common.processes import end_loader_workers_at_exit, ignore_stop_signals

class Items(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        if index >= 2 and {stall}:
            time.sleep(600)  # a stalled read (a hung network file system): the worker never polls its queues
        return index

end_loader_workers_at_exit()
def init(worker_id):
    time.sleep({init_delay} if worker_id else 0)  # a slow start: the main process may be killed before its setup
    ignore_stop_signals(worker_id)

loader = DataLoader(Items(), batch_size=2, num_workers={workers}, worker_init_fn=init)
iterator = iter(loader)  # not persistent: nothing but the exit handler ends its workers
next(iterator)
print("workers", *[w.pid for w in iterator._workers], flush=True)
{then}
"""


def run_loader_script(then: str, workers: int, stall: bool = False, init_delay: float = 0.0) -> subprocess.Popen:
    script = LOADER_SCRIPT.format(then=then, workers=workers, stall=stall, init_delay=init_delay)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)


@pytest.mark.slow
def test_loader_processes_that_ignore_sigterm_do_not_hang_the_exit():
    # Workers ignoring SIGTERM would make multiprocessing's exit handler wait forever; ours kills them first,
    # all of them: torch's SIGCHLD check used to raise in the middle of it, leaving the others alive and the
    # exit hung (a race: about half of such exits failed, hence three at once).
    procs = [run_loader_script("sys.exit(0)", workers=4) for _ in range(3)]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0 and "Exception ignored" not in stderr and "Traceback" not in stderr, stderr[-2000:]
            assert not processes_of_group(proc.pid)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
@pytest.mark.parametrize("init_delay", [0.0, 3.0], ids=["started", "killed_while_starting"])
@pytest.mark.slow
def test_loader_processes_die_with_a_killed_main_process(init_delay):
    # killed_while_starting: worker 1 is still in its worker_init_fn when the main process dies, so the kernel's
    # parent-death signal (asked for after the death) never comes; on a loaded CI machine this happened by chance
    proc = run_loader_script("time.sleep(600)", workers=2, stall=True, init_delay=init_delay)
    try:
        workers = proc.stdout.readline().split()[1:]
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else workers
        os.kill(proc.pid, signal.SIGKILL)  # the main process only (kill -9, the OOM killer)
        proc.communicate(timeout=60)
        assert not processes_of_group(proc.pid)  # no orphan left, even one stuck in a read
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_main_help_lists_the_stage3_flags():
    result = subprocess.run([sys.executable, str(MAIN), "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    for flag in ("--max_epochs", "--resume_training", "--load_checkpoint_dir", "--output_dir", "--patch_dim", "--flagfile"):
        assert flag in result.stdout, flag


# --------------------------------------------------------------------------- the Lightning pieces alone, in-process


class TinyRegression:
    """A LightningModule of one linear layer that sends ``signum`` to its own process during step ``at_step``."""

    @staticmethod
    def build(at_step: int | None = None, signum: int = signal.SIGTERM):
        import pytorch_lightning as pl

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)
                self.steps_run: list[int] = []

            def training_step(self, batch, batch_idx):
                self.steps_run.append(self.global_step)
                if self.global_step == at_step:
                    os.kill(os.getpid(), signum)
                return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def train_dataloader(self):
                data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
                return torch.utils.data.DataLoader(data, batch_size=2)  # 4 steps per epoch

        return Module()


def tiny_trainer(folder: Path, callback):
    import pytorch_lightning as pl

    from partwhole.agglomerator.checkpoint_io import AtomicCheckpointIO

    return pl.Trainer(default_root_dir=folder, max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                      plugins=[AtomicCheckpointIO()])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoint_saves_at_the_step_boundary_and_resumes_there(tmp_path, signum):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from partwhole.agglomerator.preemption import PreemptionCheckpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    callback = PreemptionCheckpoint(path)
    module = TinyRegression.build(at_step=5, signum=signum)  # step 5 is the second of epoch 1
    with pytest.raises(SIGTERMException):
        tiny_trainer(tmp_path, callback).fit(module)
    assert callback.signal_name == signal.Signals(signum).name and callback.saved_path == path
    assert module.steps_run[-1] == 5  # the step in hand finished, no other began
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint["global_step"], checkpoint["epoch"]) == (6, 1)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    resumed_module = TinyRegression.build()
    trainer = tiny_trainer(tmp_path, PreemptionCheckpoint(path))
    trainer.fit(resumed_module, ckpt_path=path)
    assert resumed_module.steps_run == list(range(6, 12)) and trainer.global_step == 12  # none lost, none redone


def test_atomic_checkpoint_io_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    from partwhole.agglomerator.checkpoint_io import AtomicCheckpointIO

    io_plugin = AtomicCheckpointIO()
    with small_filesystem(tmp_path / "fs", "1m") as fs:
        path = fs / "checkpoints" / "last.ckpt"
        io_plugin.save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, path)
        fill(fs, leave=16 * 1024)
        with pytest.raises(OutputWriteError, match=r"cannot write last.ckpt in .*/checkpoints \(No space left on device\): needs 40\d.\d kB"):
            io_plugin.save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, path)
        assert io_plugin.load_checkpoint(path, weights_only=True)["step"] == 1
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_slurm_auto_requeue_is_off_under_slurm(monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from partwhole.agglomerator.preemption import cluster_plugins

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert cluster_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    [environment] = cluster_plugins()
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
