"""Untrusted files and killed runs: nothing runs code, nothing is lost (stage 3 and the shared file formats)."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import TINY_FLAGS, make_image_folder
from hierarchical_masks.mask_io import InputError, load_embeddings, load_masks, save_embeddings

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"


class Plant:
    """A pickle whose loading would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Plant(marker)))


@pytest.mark.parametrize("loader", [load_masks, load_embeddings])
def test_malicious_pickle_is_refused_by_every_reader(tmp_path, loader):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pkl"
    plant(bad, marker)
    with pytest.raises(InputError, match="bad.pkl"):
        loader(bad)
    assert not marker.exists()


def test_training_refuses_a_malicious_embedding(tmp_path):
    base = make_image_folder(tmp_path, per_class=2)
    marker = tmp_path / "pwned"
    plant(base / "train_masks_embeds" / "b_cls" / "img1.pkl", marker)  # not the first file: hit during training
    proc = subprocess.run([sys.executable, str(MAIN), *TINY_FLAGS, f"--data_dir={tmp_path}", "--max_epochs=1",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "img1.pkl" in last and "untrusted" in last
    assert not marker.exists()


def test_malicious_checkpoint_is_refused(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Plant(marker)}, bad)
    proc = subprocess.run([sys.executable, str(MAIN), *TINY_FLAGS, "--mode=test", f"--load_checkpoint_dir={bad}",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "weights_only" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_nan_embedding_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "nan.pkl"
    embeds = np.zeros((4, 3, 8), dtype=np.float32)
    embeds[1, 2, 3] = np.nan
    save_embeddings(path, embeds)
    with pytest.raises(InputError, match="nan.pkl.*NaN"):
        load_embeddings(path)


def test_training_killed_mid_run_resumes_from_last_checkpoint(tmp_path):
    """SIGKILL a training run after its first checkpoint; the rerun continues at the same step and epoch."""
    make_image_folder(tmp_path, per_class=4)
    run_dir = tmp_path / "run"
    args = [sys.executable, str(MAIN), *TINY_FLAGS, f"--data_dir={tmp_path}", f"--output_dir={run_dir}", "--max_epochs=200"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(last, weights_only=True)  # not truncated: loads
    step, epoch = checkpoint["global_step"], checkpoint["epoch"]
    assert step >= 4 and epoch >= 1
    assert not list(run_dir.rglob("*.tmp"))
    resumed = subprocess.run([*args[:-1], f"--max_epochs={epoch + 2}", "--resume_training", f"--load_checkpoint_dir={last}"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(epoch {epoch}, step {step})" in resumed.stdout
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == step + 2 * (after["epoch"] - epoch)  # 2 steps per epoch, none redone
